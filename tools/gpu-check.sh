#!/usr/bin/env bash
# The GPU check of issue 12, for a machine with an NVIDIA GPU, PyTorch and Python but no Rust and no
# network. Prepare gpu-bundle/ first with tools/gpu-bundle.sh (on a machine with Rust), carry it with
# the checkout, then from the repository root:  bash tools/gpu-check.sh [OUT_DIR]
# In under 8 minutes on an H100/H200 it:
#  (a) runs the tiny parity fixtures on CUDA against the CPU and the reference results (gpu_check);
#  (b) runs the whole demo (tiny models, guided and unguided, scored) on CUDA in f32 and f16;
#  (c)+(d) times the SD-1.5-size UNet forward and forward+backward at 512x512, f16 and f32, batch 1
#      and 4, ours against PyTorch + diffusers on the same GPU (tools/bench/unet.py);
# and prints one JSON report (also written to OUT_DIR/gpu-check.json).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT"
B=gpu-bundle
[ -d "$B" ] || { echo "no $B/: run tools/gpu-bundle.sh on a machine with Rust first" >&2; exit 2; }
# shellcheck disable=SC1091
source tools/cuda/gpu-run-env.sh
BIN=$(mktemp -d)
for f in "$B"/*.xz; do xz -dc "$f" > "$BIN/$(basename "$f" .xz)"; chmod +x "$BIN/$(basename "$f" .xz)"; done

status=0
step() { echo "== $*" >&2; }

step "(a) parity on CUDA"
if "$BIN/gpu_check" > "$OUT/parity.json" 2> "$OUT/parity.log"; then :; else status=1; fi
tail -n 20 "$OUT/parity.log" >&2

step "(b) the demo on CUDA, f32 and f16"
for dt in f32 f16; do
  start=$SECONDS
  if "$BIN/pnd" demo --device cuda --dtype "$dt" --out "$OUT/demo-$dt" > "$OUT/demo-$dt.txt" 2> "$OUT/demo-$dt.log"; then
    echo "{\"dtype\": \"$dt\", \"ok\": true, \"seconds\": $((SECONDS - start))}" > "$OUT/demo-$dt.json"
  else
    status=1
    echo "{\"dtype\": \"$dt\", \"ok\": false}" > "$OUT/demo-$dt.json"
    tail -n 20 "$OUT/demo-$dt.log" >&2
  fi
done

step "(c)+(d) SD 1.5 UNet at 512x512 against PyTorch + diffusers"
VENV=$(mktemp -d)/venv
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-index --find-links "$B/wheels" diffusers >&2 || status=1
for dt in f16 f32; do
  for bs in 1 4; do
    PND_BENCH_UNET="$BIN/bench_unet" "$VENV/bin/python" tools/bench/unet.py --device cuda --dtype "$dt" \
      --size 512 --batch "$bs" --iters 3 --warmup 1 --rounds 1 --threads 8 \
      --json "$OUT/unet-$dt-b$bs.json" >&2 || status=1
  done
done

python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"{p}: {e}"}
report = {
    "gpu": os.popen("nvidia-smi --query-gpu=name,driver_version --format=csv,noheader").read().strip(),
    "parity": load(os.path.join(out, "parity.json")),
    "demo": [load(p) for p in sorted(glob.glob(os.path.join(out, "demo-*.json")))],
    "unet": [load(p) for p in sorted(glob.glob(os.path.join(out, "unet-*.json")))],
}
with open(os.path.join(out, "gpu-check.json"), "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report))
PY
exit $status
