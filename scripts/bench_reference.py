#!/usr/bin/env python3
"""PyTorch (CPU) reference for flowmatch's benchmarks, written from the seeds' code.

    scripts/bench_reference.py                 # all workloads, one JSON line each
    scripts/bench_reference.py --only hungarian
    scripts/bench_reference.py --lesson-run    # one whole lesson run (for peak memory)
    scripts/bench_reference.py --lesson-run --metrics   # … with flowmatch's evaluation (end to end)

Workloads (the same as flowmatch's criterion benches, see scripts/bench.sh):
  train_step/blog     VelocityNet h=64 (GELU), gaussian -> spiral, batch 2048, Adam 3e-3
  train_step/lesson   VelocityMLP h=128 (SiLU, 64-dim sinusoidal time), gaussian -> moons,
                      batch 256, Adam 1e-3
  train_step/otcfm    the lesson step with minibatch OT (SciPy linear_sum_assignment)
  hungarian/nN        linear_sum_assignment alone on squared distances, gaussian vs moons
  sample/euler100     10,000 points, 100 Euler steps, lesson VelocityMLP
  sample/rk4_20       10,000 points, 20 RK4 steps, lesson VelocityMLP
  unet/lesson_h32     the lesson's VelocityUNet (hidden 32), forward + backward of mean(v²),
                      batch 64 x 1 x 28 x 28
  unet/flowmatch_h16  flowmatch's `unet` (hidden 16) rebuilt here, the same pass
  gemm/sgemm_512      one 512 x 512 x 512 torch.mm: the core's sgemm rate as PyTorch reaches it
Threads: torch.set_num_threads(BENCH_THREADS) (default 1, as flowmatch runs small models).
Run it through scripts/bench.sh, which installs torch, numpy and scipy into .venv-bench.
"""
import argparse
import json
import math
import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
torch.manual_seed(0)
RNG = np.random.default_rng(0)


# --- data: the blog's create_spiral_data, sklearn's make_moons (noise 0.05) as in the lesson ---
def spiral(n, scale=1.0):
    noise = 0.1 * scale
    theta = 6 * np.pi * torch.rand(n)
    r = theta / (2 * np.pi) * scale
    x = r * torch.cos(theta) + noise * torch.randn(n)
    y = r * torch.sin(theta) + noise * torch.randn(n)
    return torch.stack([x, y], dim=1)


def moons(n, noise=0.05):
    n_out = n // 2
    n_in = n - n_out
    a = torch.linspace(0, math.pi, n_out)
    b = torch.linspace(0, math.pi, n_in)
    x = torch.cat([torch.stack([torch.cos(a), torch.sin(a)], 1),
                   torch.stack([1 - torch.cos(b), 1 - torch.sin(b) - 0.5], 1)])
    return (x + noise * torch.randn_like(x))[torch.randperm(n)]


# --- models, as in the seeds ---
class VelocityNet(nn.Module):
    def __init__(self, dim=2, h=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, h), nn.GELU(), nn.Linear(h, h), nn.GELU(),
                                 nn.Linear(h, h), nn.GELU(), nn.Linear(h, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def sinusoidal(t, dims=64):
    half = dims // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    a = t[:, None] * f[None]
    return torch.cat([a.sin(), a.cos()], 1)


class VelocityMLP(nn.Module):
    def __init__(self, dim=2, h=128, layers=3):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(64, h), nn.SiLU())
        mods = [nn.Linear(dim + h, h), nn.SiLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(h, h), nn.SiLU()]
        mods.append(nn.Linear(h, dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x, t):
        return self.net(torch.cat([x, self.time_embed(sinusoidal(t))], 1))


# --- the image U-Nets, forward + backward of mean(v²) on a batch 64 × 1 × 28 × 28 ---
class LessonUNet(nn.Module):
    """The lesson's VelocityUNet, as written in the seed (hidden 32 here)."""

    def __init__(self, channels=1, hidden=32):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(64, hidden), nn.SiLU())
        self.enc1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.enc2 = nn.Conv2d(hidden, hidden * 2, 3, stride=2, padding=1)
        self.enc3 = nn.Conv2d(hidden * 2, hidden * 2, 3, stride=2, padding=1)
        self.dec3 = nn.ConvTranspose2d(hidden * 2, hidden * 2, 4, stride=2, padding=1)
        self.dec2 = nn.ConvTranspose2d(hidden * 4, hidden, 4, stride=2, padding=1)
        self.dec1 = nn.Conv2d(hidden * 2, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x, t):
        t_emb = self.time_mlp(sinusoidal(t))[:, :, None, None]
        h1 = self.act(self.enc1(x)) + t_emb
        h2 = self.act(self.enc2(h1))
        h3 = self.act(self.enc3(h2))
        d3 = self.act(self.dec3(h3))
        d2 = self.act(self.dec2(torch.cat([d3, h2], dim=1)))
        return self.dec1(torch.cat([d2, h1], dim=1))


class ResBlock(nn.Module):
    """flowmatch's residual block: GroupNorm+SiLU, conv, + time, GroupNorm+SiLU, conv, skip."""

    def __init__(self, c_in, c_out, t_dim, groups=8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.skip(x) if self.skip is not None else x) + h


class FlowmatchUNet(nn.Module):
    """flowmatch's `unet` (crates/models/src/unet.rs VelocityUNet) rebuilt in PyTorch."""

    def __init__(self, channels=1, hidden=16):
        super().__init__()
        h, td = hidden, 4 * hidden
        self.time1 = nn.Linear(64, td)
        self.time2 = nn.Linear(td, td)
        self.conv_in = nn.Conv2d(channels, h, 3, padding=1)
        self.enc1 = ResBlock(h, h, td)
        self.down1 = nn.Conv2d(h, 2 * h, 3, stride=2, padding=1)
        self.enc2 = ResBlock(2 * h, 2 * h, td)
        self.down2 = nn.Conv2d(2 * h, 2 * h, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * h, 2 * h, td)
        self.up2 = nn.Conv2d(2 * h, 2 * h, 3, padding=1)
        self.dec2 = ResBlock(4 * h, 2 * h, td)
        self.up1 = nn.Conv2d(2 * h, h, 3, padding=1)
        self.dec1 = ResBlock(2 * h, h, td)
        self.norm_out = nn.GroupNorm(8, h)
        self.conv_out = nn.Conv2d(h, channels, 3, padding=1)

    def forward(self, x, t):
        temb = self.time2(F.silu(self.time1(sinusoidal(t))))
        up = lambda z: F.interpolate(z, scale_factor=2, mode="nearest")
        h1 = self.enc1(self.conv_in(x), temb)
        h2 = self.enc2(self.down1(h1), temb)
        m = self.mid(self.down2(h2), temb)
        d2 = self.dec2(torch.cat([self.up2(up(m)), h2], 1), temb)
        d1 = self.dec1(torch.cat([self.up1(up(d2)), h1], 1), temb)
        return self.conv_out(F.silu(self.norm_out(d1)))


def unet_step(model):
    x = torch.randn(64, 1, 28, 28)
    t = torch.rand(64)

    def step():
        model.zero_grad(set_to_none=True)
        (model(x, t) ** 2).mean().backward()
    return step


# --- one training step (the seeds' loop body) ---
def make_step(model, target, batch, lr, ot=False):
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step():
        x0 = torch.randn(batch, 2)
        x1 = target(batch)
        if ot:
            c = torch.cdist(x0, x1) ** 2
            _, col = linear_sum_assignment(c.numpy())
            x1 = x1[torch.from_numpy(col)]
        t = torch.rand(batch)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = ((model(xt, t) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


@torch.no_grad()
def sample(model, x, steps, method):
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt)
        if method == "euler":
            x = x + dt * model(x, t)
        else:
            k1 = model(x, t)
            k2 = model(x + 0.5 * dt * k1, t + 0.5 * dt)
            k3 = model(x + 0.5 * dt * k2, t + 0.5 * dt)
            k4 = model(x + dt * k3, t + dt)
            x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def timeit(fn, min_time=3.0, warmup=1.0, max_iter=10_000):
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    times = []
    end = time.perf_counter() + min_time
    while (time.perf_counter() < end or len(times) < 10) and len(times) < max_iter:
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return statistics.median(times) * 1e3, len(times)


def workloads():
    yield "train_step/blog", make_step(VelocityNet(h=64), spiral, 2048, 3e-3)
    yield "train_step/lesson", make_step(VelocityMLP(), moons, 256, 1e-3)
    yield "train_step/otcfm", make_step(VelocityMLP(), moons, 256, 1e-3, ot=True)
    for n in (256, 512, 1024):
        x0 = RNG.standard_normal((n, 2))
        x1 = moons(n).double().numpy()
        c = ((x0[:, None, :] - x1[None, :, :]) ** 2).sum(-1)
        yield f"hungarian/n{n}", (lambda c=c: linear_sum_assignment(c))
    net = VelocityMLP().eval()
    x = torch.randn(10_000, 2)
    yield "sample/euler100", lambda: sample(net, x, 100, "euler")
    yield "sample/rk4_20", lambda: sample(net, x, 20, "rk4")
    yield "unet/lesson_h32", unet_step(LessonUNet(hidden=32))
    yield "unet/flowmatch_h16", unet_step(FlowmatchUNet(hidden=16))
    a, b = torch.full((512, 512), 0.5), torch.full((512, 512), 0.25)
    yield "gemm/sgemm_512", lambda: torch.mm(a, b)


def w2_exact(a, b):
    """Exact empirical W2 between equal-size samples (SciPy's Hungarian on squared costs)."""
    c = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r, col = linear_sum_assignment(c)
    return float(np.sqrt(c[r, col].mean()))


def mmd_rbf(a, b, sigma):
    """Squared MMD (biased V-statistic) with a Gaussian kernel, as flowmatch's mmd_rbf."""
    g = 1.0 / (2.0 * sigma * sigma)
    k = lambda x, y: np.exp(-g * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)).mean()
    return max(k(a, a) + k(b, b) - 2.0 * k(a, b), 0.0)


def median_bandwidth(x):
    sub = x[:: max(len(x) // 500, 1)]
    d = np.sqrt(((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1))
    return max(float(np.median(d[np.triu_indices(len(sub), 1)])), 1e-12)


@torch.no_grad()
def trajectory(model, x, steps):
    xs = [x]
    dt = 1.0 / steps
    for i in range(steps):
        x = x + dt * model(x, torch.full((x.shape[0],), i * dt))
        xs.append(x)
    return torch.stack(xs).double().numpy()


def lesson_run(steps, samples, metrics):
    """The lesson config end to end (lesson_moons.toml): train, then sample with Euler 100;
    with `metrics`, flowmatch's evaluation as well: exact W2 and MMD at 1, 2, 5, 10, 50 and
    100 Euler steps on `samples` points, W2 of the headline (Euler 100), straightness and
    Liu's S from its trajectory, and the source-target W2."""
    model = VelocityMLP()
    step = make_step(model, moons, 256, 1e-3)
    s = time.perf_counter()
    for _ in range(steps):
        step()
    train_s = time.perf_counter() - s
    model.eval()
    x0 = torch.randn(samples, 2)
    out = {"name": "lesson_run", "train_s": train_s, "steps_per_s": steps / train_s}
    if not metrics:
        sample(model, x0, 100, "euler")
    else:
        s = time.perf_counter()
        real = moons(samples).double().numpy()
        bw = median_bandwidth(real)
        traj = trajectory(model, x0, 100)
        gen = traj[-1]
        direct = np.linalg.norm(traj[-1] - traj[0], axis=1).sum()
        length = np.linalg.norm(np.diff(traj, axis=0), axis=2).sum()
        dt = 1.0 / 100
        chord = traj[-1] - traj[0]
        rf = sum(((chord - (traj[k + 1] - traj[k]) / dt) ** 2).sum(1).mean() * dt for k in range(100))
        table = {}
        for n in (1, 2, 5, 10, 50, 100):
            g = sample(model, x0, n, "euler").double().numpy()
            table[n] = (w2_exact(g, real), mmd_rbf(g, real, bw))
        out.update({
            "w2": w2_exact(gen, real), "mmd": mmd_rbf(gen, real, bw),
            "straightness": float(direct / length), "rf_straightness": float(rf),
            "w2_source_target": w2_exact(x0.double().numpy(), real),
            "table": {str(k): v for k, v in table.items()},
            "eval_s": time.perf_counter() - s,
        })
    out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="run workloads whose name contains this")
    ap.add_argument("--lesson-run", action="store_true")
    ap.add_argument("--metrics", action="store_true",
                    help="with --lesson-run: also flowmatch's evaluation (exact W2 at 6 step counts, MMD, straightness)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--time", type=float, default=3.0, help="seconds measured per workload")
    a = ap.parse_args()
    if a.lesson_run:
        return lesson_run(a.steps, a.samples, a.metrics)
    for name, fn in workloads():
        if a.only not in name:
            continue
        ms, n = timeit(fn, a.time)
        print(json.dumps({"name": name, "ms": ms, "iters": n, "torch": torch.__version__,
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
