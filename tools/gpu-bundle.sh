#!/usr/bin/env bash
# What tools/gpu-check.sh needs on the GPU machine, which has an NVIDIA GPU, python3 (a venv's,
# with torch and transformers but no diffusers) and nvcc, but no Rust and no network. Run here, on
# a machine with Rust and network, from any folder; it writes gpu-bundle/ (git-ignored) at the
# repository root:
#   gpu_check.xz    the one executable the check runs: `pnd` itself plus the parity checks and the
#                   UNet benchmark (crates/runner/examples/gpu_check.rs), stripped, xz -9
#   wheels/         diffusers and importlib_metadata + zipp, pure Python (py3-none-any), no
#                   dependencies pulled in: everything else diffusers imports is on the GPU image
#                   (torch, numpy, pillow, safetensors, huggingface_hub, filelock, regex, requests)
#   MANIFEST.json   mode, commit, sizes
# Carry it with the checkout (the device tool's `carry: ["gpu-bundle"]`); the tracked tree plus the
# bundle must stay under the device machine's 64 MiB, which tools/gpu-check.sh checks.
#
#   bash tools/gpu-bundle.sh          CUDA: cargo build --release --features cudnn (CUDA_COMPUTE_CAP,
#                                     default 90 = H100/H200), about 25 minutes on 2 cores
#   bash tools/gpu-bundle.sh --cpu    the CPU build for the rehearsal (tools/gpu-check.sh --rehearse):
#                                     the dev profile (dependencies at opt-level 3), a few minutes
#                                     when the workspace's dev build is there
#   bash tools/gpu-bundle.sh --dry-run   prints the CUDA build's commands and checks the wheels' pins
#                                     and their dependencies, without building
#
# env: CUDA_COMPUTE_CAP (default 90), CARGO_TARGET_DIR (CUDA default target/cuda-release; CPU: the
#      workspace's target/), PYVER (the GPU machine's Python, default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=cuda
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --dry-run) MODE=dry-run ;;
  "") ;;
  *) echo "usage: bash tools/gpu-bundle.sh [--cpu | --dry-run]" >&2; exit 2 ;;
esac
PYVER=${PYVER:-3.12}
# Pinned: diffusers 0.42.1 imports with transformers 5.x and huggingface_hub >= 1.32 (the image has
# 5.17 and 1.33); importlib_metadata 8.x needs only zipp (9 and later also need lazy-importer, which
# the image lacks).
WHEELS=("diffusers==0.42.1" "importlib_metadata==8.7.1" "zipp==3.23.1")
# What diffusers needs that the GPU image has (KINDS.md's package list); the check imports it there.
IMAGE_HAS="filelock huggingface-hub numpy pillow regex requests safetensors torch"
out=gpu-bundle
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

fetch_wheels() {
  mkdir -p "$stage/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform any --platform manylinux_2_28_x86_64 -d "$stage/wheels" "${WHEELS[@]}"
  # Pure Python only, and every dependency either carried or on the image.
  python3 - "$stage/wheels" "$PYVER" "$IMAGE_HAS" <<'PY'
import glob, os, re, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
folder, pyver, image = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
carried = {norm(os.path.basename(w).split("-")[0]) for w in wheels}
env = {"python_version": pyver, "python_full_version": pyver + ".0", "extra": "", "sys_platform": "linux",
       "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
       "platform_machine": "x86_64", "platform_python_implementation": "CPython"}
bad = []
for w in wheels:
    if not w.endswith("-py3-none-any.whl"):
        bad.append(f"{os.path.basename(w)} is not pure Python")
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            r = Requirement(line.split(":", 1)[1].strip())
            if r.marker is not None and not r.marker.evaluate(env):
                continue
            if norm(r.name) not in carried | image:
                bad.append(f"{os.path.basename(w)} needs {r} (neither carried nor on the GPU image)")
for b in bad:
    print("gpu-bundle:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

manifest() {
  python3 - "$stage" "$MODE" "$(git rev-parse HEAD 2>/dev/null || echo unknown)" "$1" <<'PY'
import glob, json, os, sys
stage, mode, commit, profile = sys.argv[1:]
files = {os.path.relpath(p, stage): os.path.getsize(p)
         for p in glob.glob(os.path.join(stage, "**", "*"), recursive=True) if os.path.isfile(p)}
json.dump({"mode": mode, "profile": profile, "commit": commit, "bytes": files,
           "total_mib": round(sum(files.values()) / 2**20, 2)},
          open(os.path.join(stage, "MANIFEST.json"), "w"), indent=2)
PY
}

pack() {  # pack BINARY XZ-LEVEL
  cp "$1" "$stage/gpu_check"
  strip "$stage/gpu_check"
  xz -T2 "-$2" -f "$stage/gpu_check"
}

case $MODE in
  dry-run)
    echo "CUDA build (not run):"
    echo "  eval \"\$(bash tools/cuda/toolkit.sh | grep '^export ')\""
    echo "  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda-release} \\"
    echo "    cargo build --release --features cudnn -p runner --example gpu_check"
    # The features resolve (candle's cuda + cudnn under runner's cudnn) without building.
    cargo tree -q -p runner --features cudnn -i candle-core -e features | grep -q 'candle-core feature "cudnn"'
    fetch_wheels
    ls -l "$stage/wheels"
    du -cb "$stage"/wheels/*.whl | tail -n 1
    exit 0
    ;;
  cuda)
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda-release}
    eval "$(bash tools/cuda/toolkit.sh | grep '^export ')"
    cargo build --release --features cudnn -p runner --example gpu_check
    pack "$CARGO_TARGET_DIR/release/examples/gpu_check" 9
    profile="release, features cudnn, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    ;;
  cpu)
    cargo build -p runner --example gpu_check
    pack "${CARGO_TARGET_DIR:-target}/debug/examples/gpu_check" 6
    profile="dev (CPU)"
    ;;
esac
fetch_wheels
manifest "$profile"
rm -rf "$out"
cp -r "$stage" "$out"
chmod -R a+rX "$out"
du -ab "$out" | sort -n
