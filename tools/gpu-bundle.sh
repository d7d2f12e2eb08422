#!/usr/bin/env bash
# Prepares what tools/gpu-check.sh needs on a GPU machine that has nvcc, PyTorch and Python but no
# Rust and no network: the CUDA builds of `pnd`, `gpu_check` and `bench_unet` (stripped, xz) and the
# wheels of diffusers and its pure-Python dependencies, under gpu-bundle/ (git-ignored). Run here,
# on a machine with Rust and network; about 25 minutes on 2 cores. Then carry gpu-bundle/ with the
# checkout (under 64 MiB) and run `bash tools/gpu-check.sh` there.
#
# env: CUDA_COMPUTE_CAP (default 90: H100/H200), PYVER (the GPU machine's Python, default 3.11),
#      DIFFUSERS (default 0.42.1), CARGO_TARGET_DIR (default target/cuda-release)
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
PYVER=${PYVER:-3.11}
DIFFUSERS=${DIFFUSERS:-0.42.1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda-release}
eval "$(bash tools/cuda/toolkit.sh | grep '^export ')"
out=gpu-bundle
rm -rf "$out" && mkdir -p "$out/wheels"
cargo build --release --features cudnn -p runner --bin pnd --example gpu_check
cargo build --release --features cudnn -p diffusion --example bench_unet
for b in pnd examples/gpu_check examples/bench_unet; do
  name=$(basename "$b")
  cp "$CARGO_TARGET_DIR/release/$b" "$out/$name"
  strip "$out/$name"
  xz -T2 -9 -f "$out/$name"
done
# diffusers is pure Python; its dependencies besides torch/numpy/pillow, for the GPU machine's Python.
python3 -m pip download -q -d "$out/wheels" --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  "diffusers==$DIFFUSERS" huggingface_hub safetensors regex importlib_metadata filelock requests
rm -f "$out"/wheels/torch-* "$out"/wheels/numpy-* "$out"/wheels/nvidia_* "$out"/wheels/triton-*
du -sh "$out" "$out"/*
