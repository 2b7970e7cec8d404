#!/usr/bin/env python3
"""Reads a sweep folder's HParams data with TensorBoard itself and prints what its
HParams dashboard shows: the hyperparameters, the metrics and one line per session.

    python3 scripts/check_tensorboard_hparams.py SWEEP_DIR [--expect-sessions N]

It starts TensorBoard's own server (tensorboard.program) on a free local port, waits until
it has loaded the folder, and asks the HParams plugin's HTTP API for the experiment and the
session groups, as the dashboard does. Exits 1 when the dashboard would be empty or a
session lacks a hyperparameter or a metric; 2 when TensorBoard is not installed.
"""
import argparse
import json
import socket
import sys
import time
import urllib.request

try:
    from tensorboard import program
except ImportError:
    print("tensorboard is not installed (pip install tensorboard)", file=sys.stderr)
    sys.exit(2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    req.add_header("X-TensorBoard-Feature-Flags", "{}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep_dir")
    ap.add_argument("--expect-sessions", type=int, default=None)
    a = ap.parse_args()
    tb = program.TensorBoard()
    port = free_port()
    tb.configure(
        argv=[None, "--logdir", a.sweep_dir, "--host", "127.0.0.1", "--port", str(port),
              "--load_fast", "false", "--reload_interval", "1"]
    )
    base = tb.launch().rstrip("/")
    experiment = {}
    for _ in range(60):
        try:
            experiment = post(base + "/data/plugin/hparams/experiment", {"experimentName": ""})
        except Exception:
            experiment = {}
        if experiment.get("hparamInfos") and experiment.get("metricInfos"):
            break
        time.sleep(1)
    hparams = [h["name"] for h in experiment.get("hparamInfos", [])]
    metrics = [m["name"]["tag"] for m in experiment.get("metricInfos", [])]
    if not hparams or not metrics:
        print(f"TensorBoard shows no HParams experiment in {a.sweep_dir}", file=sys.stderr)
        sys.exit(1)
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"hparam": h} for h in hparams]
        + [{"metric": {"group": "", "tag": m}} for m in metrics],
        "startIndex": 0,
        "sliceSize": 100000,
    }
    groups = []
    for _ in range(30):
        groups = post(base + "/data/plugin/hparams/session_groups", request).get("sessionGroups", [])
        if a.expect_sessions is None or len(groups) >= a.expect_sessions:
            break
        time.sleep(1)
    print("hparams: " + ", ".join(hparams))
    print("metrics: " + ", ".join(metrics))
    bad = 0
    for g in groups:
        values = g.get("hparams", {})
        got = {m["name"]["tag"]: m["value"] for m in g.get("metricValues", [])}
        line = ", ".join(f"{h}={values.get(h)}" for h in hparams)
        scores = ", ".join(f"{m}={got[m]:.4g}" for m in metrics if m in got)
        print(f"session {g['name']}: {line} | {scores}")
        if any(h not in values for h in hparams) or not got:
            bad += 1
    print(f"{len(groups)} sessions")
    if a.expect_sessions is not None and len(groups) != a.expect_sessions:
        print(f"expected {a.expect_sessions} sessions, TensorBoard shows {len(groups)}", file=sys.stderr)
        sys.exit(1)
    if bad:
        print(f"{bad} sessions lack a hyperparameter or every metric", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
