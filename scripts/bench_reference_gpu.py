#!/usr/bin/env python3
"""PyTorch (CUDA) side of the GPU comparison (issue 32), written from the seeds' code as
bench_reference.py is for the CPU: one training step of each workload, eager mode, f32 (TF32
off, as flowmatch's default), timed with CUDA events after a warm-up, data already on the GPU.

    scripts/bench_reference_gpu.py [--device cuda] [--seconds 10]

Workloads (the flowmatch side is timed by scripts/gpu-checks.sh on the same GPU):
  lesson_mlp_b256     the lesson's VelocityMLP (h 128, 3 layers), gaussian -> moons, batch 256, Adam 1e-3
  blog_net_b65536     the blog's VelocityNet (h 64, GELU), gaussian -> spiral, batch 65,536, Adam 3e-3
  unet_lesson_h64_b128  the lesson's VelocityUNet (hidden 64) on 28x28 digits, batch 128, Adam 1e-3
  unet_h16_b64        flowmatch's `unet` (hidden 16) rebuilt in PyTorch, batch 64, Adam 2e-3
One JSON line each: {"side": "pytorch", "name", "ms", "steps_per_s", "device", "torch"}.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_reference as ref  # noqa: E402  (the models, as in the seeds)


def cfm_step(model, make_batch, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step():
        x0, x1 = make_batch()
        t = torch.rand(x0.shape[0], device=x0.device)
        tt = t.view(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - tt) * x0 + tt * x1
        loss = ((model(xt, t) - (x1 - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def workloads(dev):
    moons = ref.moons(60_000).to(dev)
    spiral = ref.spiral(200_000).to(dev)
    digits = (torch.rand(60_000, 1, 28, 28, device=dev) * 2 - 1)

    def pick(pool, n):
        return lambda: (torch.randn((n,) + pool.shape[1:], device=dev),
                        pool[torch.randint(0, pool.shape[0], (n,), device=dev)])
    yield "lesson_mlp_b256", cfm_step(ref.VelocityMLP().to(dev), pick(moons, 256), 1e-3)
    yield "blog_net_b65536", cfm_step(ref.VelocityNet(h=64).to(dev), pick(spiral, 65_536), 3e-3)
    yield "unet_lesson_h64_b128", cfm_step(ref.LessonUNet(hidden=64).to(dev), pick(digits, 128), 1e-3)
    yield "unet_h16_b64", cfm_step(ref.FlowmatchUNet(hidden=16).to(dev), pick(digits, 64), 2e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, step in workloads(dev):
        for _ in range(5):
            step()
        sync()
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds or steps < 10:
            for _ in range(10):
                step()
            steps += 10
            sync()
        secs = time.perf_counter() - start
        print(json.dumps({"side": "pytorch", "name": name, "ms": secs / steps * 1e3,
                          "steps_per_s": steps / secs, "device": str(dev),
                          "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
