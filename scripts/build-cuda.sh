#!/usr/bin/env bash
# Builds the release plipd with `--features cuda` on a machine with no GPU and no system CUDA,
# and packs what it needs at run time into a bundle that runs on a GPU machine with CUDA 13.0 /
# driver 580 (or newer) at any checkout path:
#
#   target/cuda-bundle/            plipd (stripped), plipd-cuda (the wrapper to run), lib/
#                                  (nvrtc 13.0; a driver stub used only where no driver is
#                                  installed), include/ (headers nvrtc needs at run time),
#                                  dfdx-out/ (dfdx's kernel headers), paths.env
#   target/cuda-bundle.tar.xz      the same, one file (what scripts/gpu-check.sh unpacks)
#
# Steps (idempotent: a second run reuses the toolkit prefix and cargo's build cache):
#   1. the CUDA 13.0 toolkit pieces from PyPI into .cuda/wheels (git-ignored; ~1.1 GB);
#   2. the layout dfdx's and cudarc's build scripts look for (CUDA_ROOT with include/ and
#      lib64/ with unversioned library links), cicc where nvcc.profile expects it;
#   3. a link-time stub of the driver library (libcuda.so.1, every cu* function cudarc 0.9
#      declares, each returning CUDA_ERROR_NO_DEVICE) — the linker needs libcuda, the GPU
#      machine's driver provides the real one;
#   4. a stand-in nvidia-smi for dfdx's build script (it asks for the compute capability and
#      panics without one) and CUDA_COMPUTE_CAP (default 90: H100/H200);
#   5. cargo build --release --features cuda into target/cuda;
#   6. the bundle, and a smoke check here: the CPU path of the CUDA binary works, and asking it
#      for CUDA on this GPU-less machine fails with a message, not a panic.
#
# dfdx compiles some kernels with nvrtc at run time (non-contiguous reshapes — attention and the
# patch split use them — concat, stack, dtype casts) and bakes two include paths into the
# binary at build time: $CUDA_ROOT/include and its own OUT_DIR. paths.env records both;
# plipd-cuda recreates them on the GPU machine (as links into the bundle) when they are missing.
# nvrtc 13.2 emits PTX 9.2, which driver 580 refuses, so the bundle's nvrtc 13.0 goes first on
# the library path. cuBLAS (550 MB) is not bundled: plipd-cuda finds the GPU machine's
# (/usr/local/cuda, or PyTorch's nvidia/cu13/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PREFIX="${PLIP_CUDA_PREFIX:-$REPO/.cuda}"
WHEELS="$PREFIX/wheels"
CU="$WHEELS/nvidia/cu13"
ROOTDIR="$PREFIX/root"
TARGET_DIR="$REPO/target/cuda"
BUNDLE="$REPO/target/cuda-bundle"
CAP="${CUDA_COMPUTE_CAP:-90}"
PINS=(
  nvidia-cuda-nvcc==13.0.48 nvidia-nvvm==13.0.48 nvidia-cuda-crt==13.0.48
  nvidia-cuda-cccl==13.0.50 nvidia-cuda-runtime==13.0.48 nvidia-cuda-nvrtc==13.0.48
  nvidia-cublas==13.0.0.19
)
say() { echo "build-cuda: $*" >&2; }
die() { echo "build-cuda: error: $*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo is missing (install Rust 1.85 or newer)"
command -v python3 >/dev/null || die "python3 is missing (it installs the CUDA wheels from PyPI)"
command -v cc >/dev/null || die "a C compiler (cc) is missing; it builds the driver stub"

# 1. The toolkit from PyPI (one pip call: pip --target does not merge into an existing nvidia/).
if [ -x "$CU/bin/nvcc" ] && [ "$(cat "$WHEELS/.pins" 2>/dev/null)" = "${PINS[*]}" ]; then
  say "reusing the CUDA 13.0 toolkit in $WHEELS"
else
  say "installing the CUDA 13.0 toolkit pieces from PyPI into $WHEELS"
  rm -rf "$WHEELS"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$WHEELS" "${PINS[@]}" \
    || die "pip could not install the CUDA wheels (PyPI must be reachable)"
  echo "${PINS[*]}" > "$WHEELS/.pins"
fi

# 2. Layout. nvcc.profile looks for cicc in nvvm/bin; the nvvm wheel puts it in bin/.
mkdir -p "$CU/nvvm/bin" "$ROOTDIR/lib64" "$PREFIX/stub" "$PREFIX/bin"
ln -sfn ../../bin/cicc "$CU/nvvm/bin/cicc"
ln -sfn "$CU/include" "$ROOTDIR/include"
for lib in cublas cublasLt nvrtc; do
  ln -sfn "$CU/lib/lib$lib.so.13" "$ROOTDIR/lib64/lib$lib.so"
done

# 3. The driver stub, generated from the functions cudarc declares.
cargo fetch --locked -q
CARGO_HOME_DIR="${CARGO_HOME:-$HOME/.cargo}"
SYS=$(ls -d "$CARGO_HOME_DIR"/registry/src/*/cudarc-0.9.15/src/driver/sys.rs 2>/dev/null | head -1)
[ -n "$SYS" ] || die "cudarc 0.9.15's sources are not in $CARGO_HOME_DIR/registry (cargo fetch failed?)"
if [ ! -f "$PREFIX/stub/libcuda.so.1" ] || [ "$SYS" -nt "$PREFIX/stub/libcuda.so.1" ] || [ "$0" -nt "$PREFIX/stub/libcuda.so.1" ]; then
  say "generating the link-time driver stub from $(basename "$(dirname "$(dirname "$(dirname "$SYS")")")")"
  {
    echo "/* Link-time stand-in for libcuda.so.1: every driver function cudarc 0.9 declares,"
    echo "   each answering CUDA_ERROR_NO_DEVICE (100). The real driver replaces it at run time. */"
    grep -oE 'pub fn cu[A-Za-z0-9_]+\(' "$SYS" | sed -E 's/pub fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
      | grep -vE '^cuGetError(String|Name)$' \
      | while read -r f; do echo "int $f(void) { return 100; }"; done
    echo 'int cuGetErrorString(int e, const char **s) { (void)e; *s = "no NVIDIA driver is installed (plip link-time stub)"; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }'
  } > "$PREFIX/stub/stub.c"
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$PREFIX/stub/libcuda.so.1" "$PREFIX/stub/stub.c"
  say "stub exports $(grep -c '^int cu' "$PREFIX/stub/stub.c") functions"
fi
ln -sfn "$PREFIX/stub/libcuda.so.1" "$ROOTDIR/lib64/libcuda.so"

# 4. A stand-in nvidia-smi for dfdx's build script.
cat > "$PREFIX/bin/nvidia-smi" <<EOF
#!/bin/sh
# Stand-in for dfdx's build script only: it asks for the compute capability.
printf 'compute_cap\n%s.%s\n' "${CAP%?}" "${CAP#"${CAP%?}"}"
EOF
chmod +x "$PREFIX/bin/nvidia-smi"

# 5. Build.
say "cargo build --release --features cuda (sm_$CAP) into $TARGET_DIR"
export CUDA_ROOT="$ROOTDIR" CUDA_COMPUTE_CAP="$CAP"
export PATH="$PREFIX/bin:$CU/bin:$PATH"
export LIBRARY_PATH="$ROOTDIR/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release --locked --features cuda -p plip-actors --target-dir "$TARGET_DIR"
BIN="$TARGET_DIR/release/plipd"

# 6. The bundle.
OUT_DIR=$(dirname "$(ls -t "$TARGET_DIR"/release/build/dfdx-*/out/cuda_utils.cuh | head -1)")
[ -d "$OUT_DIR" ] || die "dfdx's OUT_DIR with its kernel headers was not found"
grep -qa "$OUT_DIR" "$BIN" || die "the binary does not name $OUT_DIR (dfdx changed how it finds its headers?)"
INC="$ROOTDIR/include"
say "packing $BUNDLE"
rm -rf "$BUNDLE" "$BUNDLE.tar.xz"
mkdir -p "$BUNDLE/lib/stub" "$BUNDLE/include" "$BUNDLE/dfdx-out"
objcopy --strip-debug "$BIN" "$BUNDLE/plipd"
cp -L "$CU/lib/libnvrtc.so.13" "$CU/lib/libnvrtc-builtins.so.13.0" "$BUNDLE/lib/"
cp -L "$PREFIX/stub/libcuda.so.1" "$BUNDLE/lib/stub/"
# Headers nvrtc may need at run time (cuda_fp16.h and what it includes); not cccl or the
# host-only headers.
(cd "$CU/include" && cp -r --parents ./*.h ./*.hpp crt nv "$BUNDLE/include/" 2>/dev/null || true)
cp "$OUT_DIR"/*.cuh "$BUNDLE/dfdx-out/"
cat > "$BUNDLE/paths.env" <<EOF
# Paths baked into plipd at build time; plipd-cuda recreates them when missing.
BAKED_CUDA_INCLUDE_DIR=$INC
BAKED_DFDX_OUT_DIR=$OUT_DIR
COMPUTE_CAP=$CAP
EOF
cp scripts/plipd-cuda "$BUNDLE/plipd-cuda"
chmod +x "$BUNDLE/plipd-cuda"
tar -C "$(dirname "$BUNDLE")" -cJf "$BUNDLE.tar.xz" "$(basename "$BUNDLE")"
say "bundle: $(du -sh "$BUNDLE" | cut -f1) ($(du -h "$BUNDLE.tar.xz" | cut -f1) as $BUNDLE.tar.xz)"

# Smoke check on this machine: the CUDA build still trains on the CPU, and asking it for a GPU
# here fails at start with a message.
# (cuBLAS from the wheels stands in for the GPU machine's.)
export PLIP_CUDA_LIBS="$CU/lib"
"$BUNDLE/plipd-cuda" bench agree --preset test --batch 4 --device cpu >/dev/null \
  || die "the CUDA build failed on the CPU"
if msg=$("$BUNDLE/plipd-cuda" bench agree --preset test --batch 4 --device cuda 2>&1); then
  say "a GPU answered here: $msg"
else
  case "$msg" in
    *"cuda:0"*) say "no usable GPU here, as expected: $(echo "$msg" | tail -1)" ;;
    *) die "asking for CUDA without a GPU did not fail with a device message: $msg" ;;
  esac
fi
say "done: $BUNDLE/plipd-cuda (run it on the GPU machine, or scripts/gpu-check.sh)"
