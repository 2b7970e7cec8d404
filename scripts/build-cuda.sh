#!/usr/bin/env bash
# Builds `flowmatch` with CUDA (`--features cuda`) on a machine that has no nvcc and no GPU.
#
#   scripts/build-cuda.sh            # -> target-cuda/release/flowmatch{,.xz} (+ .cuda/ toolchain)
#   CUDA_FEATURES=cuda scripts/build-cuda.sh   # without cuDNN (the default is `cudnn`)
#
# 1. Installs a CUDA 13.0 toolchain and cuDNN 9 from PyPI wheels into .cuda/venv (the GPU machines
#    run driver 580 = CUDA 13.0; PTX from a newer nvcc would not load there, so the series is
#    pinned). cuDNN is PyTorch's own wheel, nvidia-cudnn-cu13, which the GPU machines also hold.
# 2. Lays the wheels out as one CUDA root, .cuda/root/{bin,include,lib}, with the unversioned
#    library names the linker looks for, and a stub libcuda.so (soname libcuda.so.1) generated
#    from cudarc's driver bindings: candle's `cuda` feature forces cudarc's dynamic linking, so
#    the binary needs -lcuda at link time, but the real driver library is only needed at run
#    time, on the GPU machine.
# 3. Builds with CUDA_COMPUTE_CAP=90 (H100 / H200) into a target dir of its own, with the
#    `cudnn` feature (candle's convolutions through cuDNN) unless CUDA_FEATURES says otherwise.
#
# Environment: CUDA_SERIES (default 13.0.2, the cuda-toolkit meta-package version), CUDNN_VERSION
# (default 9.13.0.50, of nvidia-cudnn-cu13), CUDA_FEATURES (default cudnn),
# CUDA_COMPUTE_CAP (default 90), CUDA_TARGET_DIR (default $HOME/.cache/flowmatch-target-cuda).
# Run the binary on the GPU machine with LD_LIBRARY_PATH pointing at CUDA 13 libcublas, libcurand
# and libnvrtc (the system CUDA, or PyTorch's nvidia wheels); `ldd` on it lists what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$(pwd)
CUDA_SERIES=${CUDA_SERIES:-13.0.2}
CUDNN_VERSION=${CUDNN_VERSION:-9.13.0.50}
CUDA_FEATURES=${CUDA_FEATURES:-cudnn}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
TARGET=${CUDA_TARGET_DIR:-$HOME/.cache/flowmatch-target-cuda}
VENV=$ROOT_DIR/.cuda/venv
CROOT=$ROOT_DIR/.cuda/root

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
if [ ! -f "$VENV/.installed-$CUDA_SERIES" ]; then
  echo "== installing CUDA $CUDA_SERIES wheels from PyPI"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "cuda-toolkit[nvcc,cudart,nvrtc,cublas,curand,crt,cccl,nvvm]==$CUDA_SERIES"
  touch "$VENV/.installed-$CUDA_SERIES"
fi
if [ "$CUDA_FEATURES" = cudnn ] && [ ! -f "$VENV/.installed-cudnn-$CUDNN_VERSION" ]; then
  echo "== installing cuDNN $CUDNN_VERSION wheels from PyPI"
  "$VENV/bin/pip" install -q --no-deps "nvidia-cudnn-cu13==$CUDNN_VERSION"
  touch "$VENV/.installed-cudnn-$CUDNN_VERSION"
fi

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# CUDA 13 wheels install under nvidia/cu13/; older ones under nvidia/<component>/.
mapfile -t PARTS < <(find "$SITE/nvidia" -mindepth 1 -maxdepth 2 -type d \( -name bin -o -name include -o -name lib -o -name nvvm \) -printf '%h\n' | sort -u)
[ ${#PARTS[@]} -gt 0 ] || { echo "error: no CUDA wheels found under $SITE/nvidia" >&2; exit 1; }

echo "== laying out $CROOT"
rm -rf "$CROOT" && mkdir -p "$CROOT/bin" "$CROOT/include" "$CROOT/lib"
for p in "${PARTS[@]}"; do
  for d in bin include lib nvvm; do
    [ -d "$p/$d" ] || continue
    if [ "$d" = nvvm ]; then ln -sfn "$p/nvvm" "$CROOT/nvvm"; continue; fi
    cp -rsf "$p/$d/." "$CROOT/$d/"
  done
done
chmod +x "$CROOT"/bin/* 2>/dev/null || true
# Unversioned names for the linker: libcublas.so -> libcublas.so.13 and so on.
for lib in "$CROOT"/lib/lib*.so.*; do
  base=${lib##*/}
  stem=${base%%.so.*}
  [ -e "$CROOT/lib/$stem.so" ] || ln -s "$base" "$CROOT/lib/$stem.so"
done

echo "== generating the libcuda stub"
CUDARC=$(cargo metadata --format-version 1 --manifest-path "$ROOT_DIR/Cargo.toml" --features flowmatch-experiments/cuda 2>/dev/null |
  "$VENV/bin/python" -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
grep -ohE '^\s+pub fn (cu[A-Za-z0-9_]+)\(|^\s+fn (cu[A-Za-z0-9_]+)\(' "$CUDARC/src/driver/sys/mod.rs" |
  sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
  awk '{ printf "int %s(void) { return 999; /* CUDA_ERROR_UNKNOWN: stub */ }\n", $1 }' > "$ROOT_DIR/.cuda/libcuda_stub.c"
mkdir -p "$CROOT/lib/stubs"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CROOT/lib/stubs/libcuda.so" "$ROOT_DIR/.cuda/libcuda_stub.c"
echo "   $(grep -c . "$ROOT_DIR/.cuda/libcuda_stub.c") driver entry points"

export CUDA_HOME=$CROOT CUDA_PATH=$CROOT CUDA_ROOT=$CROOT
export PATH=$CROOT/bin:$PATH
export LIBRARY_PATH=$CROOT/lib:$CROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -2

echo "== cargo build --release --features $CUDA_FEATURES (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP) -> $TARGET"
CARGO_TARGET_DIR=$TARGET cargo build --release -p flowmatch-experiments --features "$CUDA_FEATURES"
BIN=$TARGET/release/flowmatch
mkdir -p target-cuda/release
cp "$BIN" target-cuda/release/flowmatch
# The embedded sm_90 kernels make the binary ~80 MB; a stripped, xz-compressed copy (~13 MB)
# is what travels to a GPU machine (`xz -d flowmatch.xz` there).
strip -o target-cuda/release/flowmatch.stripped target-cuda/release/flowmatch
xz -T0 -6 -f -c target-cuda/release/flowmatch.stripped > target-cuda/release/flowmatch.xz
rm target-cuda/release/flowmatch.stripped
echo "== built target-cuda/release/flowmatch ($(du -h target-cuda/release/flowmatch | cut -f1)," \
  "compressed: target-cuda/release/flowmatch.xz, $(du -h target-cuda/release/flowmatch.xz | cut -f1)); it links:"
readelf -d target-cuda/release/flowmatch | grep NEEDED
