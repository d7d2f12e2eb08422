#!/usr/bin/env bash
# The GPU check (issues 12 and 24): what to run first on a GPU machine, within one command of its
# lease. Made for the device machine: one NVIDIA GPU, python3 a venv's (torch + transformers, no
# diffusers), no Rust, no network, at most 10 minutes a command, and back only the output's tail
# and 8 small files from $OUT. Prepare the bundle on a machine with Rust (tools/gpu-bundle.sh),
# carry gpu-bundle/ with the checkout, then from any folder:
#
#   bash tools/gpu-check.sh [--budget SECONDS] [--only a,b,c,d] [--inversion-steps N]
#   bash tools/gpu-check.sh --rehearse [...]     the same script and steps on the CPU (below)
#
# Steps (each under its own `timeout`, capped by what is left of --budget, default 270 s: the lease
# allows about 6 minutes a try with the machine's start-up, so a second try still fits in 15):
#   setup   unpack the bundle's one binary (`pnd` + the checks) to $WORK/bin; install the wheels
#           (diffusers, importlib_metadata, zipp) with `pip install --no-deps --target` and put them
#           on PYTHONPATH (a venv built on the venv's interpreter would not see its torch); check
#           the tree + bundle size (64 MiB)
#   model   one random SD-1.5-size diffusers folder (UNet, VAE, text encoder; `pnd tiny-model`'s
#           tokenizer), drawn once on the device by PyTorch in f16 and read by both sides
#           (tools/bench/sd_folder.py); kept in $WORK for a rerun
#   a       parity on the device: the tiny fixtures against the CPU and the reference results,
#           f32 with TF32 off (NVIDIA_TF32_OVERRIDE=0), f16 and bf16 (`gpu_check parity`)
#   b       the demo on the device in f16 (`pnd demo`; its tree stays in $WORK, its table comes back)
#   c       the SD-1.5-size UNet forward and forward+backward at 512x512, f16, batch 1 and 4,
#           against diffusers on the same GPU (tools/bench/unet.py)
#   d       one unguided and one guided 512x512 image, 50 steps, the paper's windows (layout
#           [0,10), appearance [10,20), 3 updates a step), against diffusers' StableDiffusionPipeline
#           unguided (tools/bench/pipeline.py). The null-text inversion takes --inversion-steps Adam
#           iterations a step (default 1; the paper's 10 is ten times the inversion's share)
#   (e)     the peak GPU memory of each process of c and d: NVML's device memory used, sampled every
#           20 ms, above the level before the process (tools/bench/gpumem.py), for both sides
#           alike; PyTorch's max_memory_allocated beside it
# All timed steps run with TF32 off on both sides (NVIDIA_TF32_OVERRIDE=0, torch's allow_tf32
# flags false); the f16 work itself never used TF32.
#
# What comes back: $OUT/summary.json (rewritten after every step), check.log (every step's output),
# parity.json, demo.txt, unet.json, images.json, trace.jsonl: 7 files; every tree stays in $WORK
# (default /tmp/pnd-gpu-check). The last line of stdout is the summary, on one line.
# Exit status: 0 when every step passed.
#
# --rehearse: the same steps on the CPU with the CPU bundle (tools/gpu-bundle.sh --cpu: the dev
# profile) and small sizes (the tiny model's configuration, 64x64, batch 1 and 4; f32, since
# candle's and PyTorch's CPU f16 are emulations that cost the rehearsal 5-10 times as much, and
# step a checks f16 and bf16 on the CPU all the same), in an emulation
# of the device machine: python3 is the venv $PND_GPUEMU_VENV (default /work/venv-gpuemu; holds
# torch, transformers, safetensors, pillow, numpy, requests, and no diffusers), no network (the
# script re-runs itself under `unshare -n`), $OUT set (a fresh folder unless given). It fails when
# a step does not pass, when $OUT would hold more than 8 files, a file more than 2 folders down or
# over 16 MiB, when the tracked tree plus the bundle exceed 64 MiB, or when the summary was not
# rewritten after a step.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
BUDGET=${PND_CHECK_BUDGET:-270}
ONLY=a,b,c,d
INV_STEPS=1
ARGS=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --rehearse) MODE=rehearse ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --inversion-steps) INV_STEPS=$2; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# No network in the rehearsal, as on the device machine.
if [ "$MODE" = rehearse ] && [ -z "${PND_CHECK_NET:-}" ]; then
  if unshare -n true 2>/dev/null; then
    PND_CHECK_NET="unshare -n" exec unshare -n -- bash "$0" "${ARGS[@]}"
  fi
  PND_CHECK_NET="not isolated: unshare -n failed here (HF_HUB_OFFLINE=1 only)"
fi
export PND_CHECK_NET=${PND_CHECK_NET:-"the machine's own"}
# The hub lookups would try the network before the built-in fallbacks.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

WORK=${PND_CHECK_WORK:-/tmp/pnd-gpu-check}
if [ "$MODE" = gpu ]; then
  DEV=cuda BUNDLE_MODE=cuda SIZE=512 STEPS=50 CONFIG=sd15 ITERS=2 THREADS=8 DTYPE=f16
  CAP_MODEL=60 CAP_A=45 CAP_B=60 CAP_C=75 CAP_D=240
else
  VENV=${PND_GPUEMU_VENV:-/work/venv-gpuemu}
  if [ ! -x "$VENV/bin/python3" ]; then
    echo "gpu-check --rehearse: no emulation venv at $VENV; make it with:" >&2
    echo "  python3.12 -m venv $VENV && $VENV/bin/pip install torch transformers safetensors pillow numpy requests" >&2
    exit 2
  fi
  export PATH="$VENV/bin:$PATH"
  unset PYTHONPATH
  # No Hugging Face cache either (the device machine has none).
  export HF_HOME=$WORK/hf-home
  DEV=cpu BUNDLE_MODE=cpu SIZE=64 STEPS=20 CONFIG=$WORK/tiny ITERS=2 THREADS=1 DTYPE=f32
  CAP_MODEL=120 CAP_A=240 CAP_B=300 CAP_C=300 CAP_D=600
  BUDGET=${PND_CHECK_BUDGET:-1800}
fi
if [ -z "${OUT:-}" ]; then
  if [ "$MODE" = gpu ]; then OUT=$ROOT/gpu-check-out; else OUT=$(mktemp -d /tmp/gpu-check-out.XXXXXX); fi
fi
export OUT
mkdir -p "$OUT" "$WORK/logs"
if [ "$MODE" = rehearse ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "gpu-check --rehearse: \$OUT ($OUT) must be empty, as the device machine's is" >&2
  exit 2
fi
SUMMARY=$OUT/summary.json
LOG=$OUT/check.log
S="python3 $ROOT/tools/bench/check_summary.py"
BIN=$WORK/bin
T0=$SECONDS
FAILED=()
say() { echo "gpu-check: $*"; }

$S init "$SUMMARY" --mode "$MODE" --device "$DEV" --dtype "$DTYPE" --budget_s "$BUDGET" --size "$SIZE" --sample_steps "$STEPS" \
  --network "$PND_CHECK_NET" --tf32 "off (NVIDIA_TF32_OVERRIDE=0; torch allow_tf32 false)" \
  --inversion_steps "$INV_STEPS" --out "$OUT" --work "$WORK" || { echo "gpu-check: python3 cannot write $SUMMARY" >&2; exit 2; }

# What would not come back from $OUT, after every step; the rehearsal fails on any.
out_check() {
  local r
  if ! r=$($S out-check "$OUT"); then
    say "\$OUT breaks the device machine's limits: $r"
    FAILED+=("out:$1")
  fi
}

# run_step NAME CAP STDOUT RESULT CMD...: CMD under `timeout` (CAP, or what is left of the budget),
# its stdout to STDOUT, its stderr to the step's log; then the summary is rewritten with RESULT's
# figures (and MEM's peaks, where the caller sets MEM to a `gpumem.py --json` file) and checked.
run_step() {
  local name=$1 cap=$2 stdout=$3 result=$4
  shift 4
  local left=$((BUDGET - (SECONDS - T0)))
  local steplog=$WORK/logs/$name.log
  if [ "$left" -lt 10 ]; then
    say "$name skipped: the budget (${BUDGET}s) is spent"
    $S step "$SUMMARY" "$name" --status skipped --seconds 0 --note "budget spent"
    FAILED+=("$name")
    return
  fi
  local t=$((cap < left ? cap : left))
  local before
  before=$(python3 -c "import json; print(json.load(open('$SUMMARY'))['rewrites'])")
  export PND_CHECK_DEADLINE=$(($(date +%s) + t - 4))
  say "$name: up to ${t}s: $(echo "$*" | tr -s ' \n' ' ' | cut -c1-300)"
  local start=$SECONDS status
  timeout -k 5 "$t" "$@" >"$stdout" 2>"$steplog"
  local rc=$?
  unset PND_CHECK_DEADLINE
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    126 | 127) status="cannot start (exit $rc)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  { echo "===== $name (exit $rc, $((SECONDS - start)) s): $*"; cat "$steplog"; } >>"$LOG"
  local note=""
  [ "$status" = ok ] || note=$(tail -n 6 "$steplog" | cut -c1-200)
  $S step "$SUMMARY" "$name" --status "$status" --seconds "$((SECONDS - start))" --timeout "$t" \
    ${result:+--result "$result"} ${MEM:+--mem "$MEM"} --note "$note"
  local after
  after=$(python3 -c "import json; s=json.load(open('$SUMMARY')); print(s['rewrites'] if '$name' in s['steps'] else -1)")
  if [ "$after" -le "$before" ]; then
    say "the summary was not rewritten after $name"
    FAILED+=("summary:$name")
  fi
  [ "$status" = ok ] || FAILED+=("$name")
  say "$name: $status in $((SECONDS - start)) s"
  out_check "$name"
}

only() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---- setup: the bundle, the wheels, the environment ------------------------------------------
setup_start=$SECONDS
setup_note=""
setup() {
  local m=gpu-bundle/MANIFEST.json
  [ -f "$m" ] || { echo "no $m: run tools/gpu-bundle.sh$([ "$MODE" = rehearse ] && echo ' --cpu') first"; return 1; }
  local mode
  mode=$(python3 -c "import json; print(json.load(open('$m'))['mode'])") || return 1
  [ "$mode" = "$BUNDLE_MODE" ] || { echo "gpu-bundle/ is a $mode bundle; this run needs $BUNDLE_MODE"; return 1; }
  mkdir -p "$BIN" "$WORK/site" || return 1
  # The driver's and PyTorch's CUDA 13 libraries (cuBLAS, cuRAND, cuDNN) on the library path (in
  # the rehearsal too: harmless to the CPU binary, and proven under a venv's python3).
  # shellcheck disable=SC1091
  source tools/cuda/gpu-run-env.sh
  timeout 60 xz -dc gpu-bundle/gpu_check.xz >"$BIN/gpu_check" && chmod +x "$BIN/gpu_check" || return 1
  ln -sf gpu_check "$BIN/pnd"
  # The binary must start here (its CUDA libraries found) before any step counts on it.
  "$BIN/pnd" --version || { ldd "$BIN/gpu_check" | grep -i "not found"; return 1; }
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" gpu-bundle/wheels/*.whl || return 1
  export PYTHONPATH=$WORK/site
}
if setup >"$WORK/logs/setup.log" 2>&1; then setup_status=ok; else setup_status=failed; fi
versions=$(timeout 60 python3 - "$MODE" 2>>"$WORK/logs/setup.log" <<'PY'
import json, platform, subprocess, sys
v = {"python": platform.python_version(), "venv": sys.prefix != sys.base_prefix}
for m in ("torch", "transformers", "diffusers", "huggingface_hub"):
    try:
        v[m] = __import__(m).__version__
    except Exception as e:
        v[m] = f"import failed: {e}"[:120]
try:
    import torch
    v["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception:
    pass
try:
    v["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
except Exception:
    v["gpu"] = None
print(json.dumps(v))
PY
) || versions='{"error": "python3 did not answer"}'
[ -n "$versions" ] || versions='{"error": "python3 printed nothing"}'
$S set "$SUMMARY" versions "$versions"
if [ "$setup_status" = ok ] && [[ "$versions" == *'"diffusers": "import failed'* ]]; then
  setup_status=failed
  echo "diffusers does not import from the bundle's wheels" >>"$WORK/logs/setup.log"
fi
# The emulation itself: python3 must be a venv's with torch and transformers, and diffusers must
# come only from the bundle.
if [ "$MODE" = rehearse ]; then
  emu=$(env -u PYTHONPATH python3 -c "
import importlib.util as u, sys
print('venv' if sys.prefix != sys.base_prefix else 'NOT A VENV',
      'torch' if u.find_spec('torch') else 'NO TORCH', 'transformers' if u.find_spec('transformers') else 'NO TRANSFORMERS',
      'DIFFUSERS INSTALLED' if u.find_spec('diffusers') else 'no-diffusers')")
  net=$(python3 -c "
import socket
try:
    socket.create_connection(('pypi.org', 443), timeout=3); print('NETWORK REACHABLE')
except OSError:
    print('no-network')")
  $S set "$SUMMARY" emulation "\"$emu; $net\""
  if [[ "$emu $net" =~ NOT|NO\ |INSTALLED|REACHABLE ]]; then
    setup_status=failed
    echo "the emulation is not the device machine's: $emu; $net" >>"$WORK/logs/setup.log"
  fi
fi
tree=$($S tree-size "$ROOT" --extra gpu-bundle) || { setup_status=failed; echo "over 64 MiB: $tree" >>"$WORK/logs/setup.log"; }
$S set "$SUMMARY" travels "${tree:-null}"
{ echo "===== setup ($setup_status)"; cat "$WORK/logs/setup.log"; } >>"$LOG"
[ "$setup_status" = ok ] || { setup_note=$(tail -n 6 "$WORK/logs/setup.log" | cut -c1-200); FAILED+=(setup); }
$S step "$SUMMARY" setup --status "$setup_status" --seconds "$((SECONDS - setup_start))" --note "$setup_note"
say "setup: $setup_status in $((SECONDS - setup_start)) s"
out_check setup

# ---- model: one random SD-1.5-size folder, drawn once --------------------------------------------
SD=$WORK/sd
stamp="$CONFIG $DTYPE $DEV"
if [ "$setup_status" = ok ] && { only c || only d; }; then
  if [ -f "$SD/model_index.json" ] && [ "$(cat "$SD/.stamp" 2>/dev/null)" = "$stamp" ]; then
    $S step "$SUMMARY" model --status ok --seconds 0 --note "reused $SD"
    say "model: reused $SD"
  else
    run_step model "$CAP_MODEL" "$WORK/model.json" "$WORK/model.json" bash -c "
      cd '$WORK' && '$BIN/pnd' tiny-model --out '$WORK/tiny' >&2 && cd '$ROOT' &&
      python3 '$ROOT/tools/bench/sd_folder.py' --out '$SD' --tokenizer '$WORK/tiny/tokenizer' \
        --config '$CONFIG' --dtype '$DTYPE' --device '$DEV' && echo '$stamp' > '$SD/.stamp'"
  fi
fi

if [ "$setup_status" = ok ]; then
  # ---- (a) parity ---------------------------------------------------------------------------------
  only a && MEM=$WORK/logs/a_mem.json run_step a_parity "$CAP_A" "$OUT/parity.json" "$OUT/parity.json" \
    python3 tools/bench/gpumem.py --json "$WORK/logs/a_mem.json" -- \
    env NVIDIA_TF32_OVERRIDE=0 "$BIN/gpu_check" parity --device "$DEV"
  # ---- (b) the demo in f16 --------------------------------------------------------------------------
  if only b; then
    rm -rf "$WORK/demo"
    # From $WORK: no ../shared/clip-tokenizer there, as on the device machine.
    MEM=$WORK/logs/b_mem.json run_step b_demo "$CAP_B" "$OUT/demo.txt" "" \
      python3 tools/bench/gpumem.py --json "$WORK/logs/b_mem.json" -- \
      env -C "$WORK" NVIDIA_TF32_OVERRIDE=0 "$BIN/pnd" demo --device "$DEV" --dtype "$DTYPE" --out "$WORK/demo"
  fi
  # ---- (c) the UNet against diffusers -------------------------------------------------------------
  only c && run_step c_unet "$CAP_C" "$WORK/logs/c_unet.out" "$OUT/unet.json" \
    env PND_BENCH_UNET="$BIN/gpu_check" PND_BENCH_UNET_ARGS=bench-unet \
    python3 tools/bench/unet.py --model "$SD" --device "$DEV" --dtype "$DTYPE" --size "$SIZE" \
    --batches 1,4 --iters "$ITERS" --warmup 1 --rounds 1 --threads "$THREADS" --tf32 off \
    --json "$OUT/unet.json"
  # ---- (d) one unguided and one guided image --------------------------------------------------------
  if only d; then
    rm -rf "$WORK/images"
    mkdir -p "$WORK/images"
    cat >"$WORK/guidance.toml" <<EOF
# The paper's settings (configs/guidance/paper.toml), with $INV_STEPS null-text Adam iteration(s) a step.
[guidance]
eta = 10.0
alpha = 10.0
beta = 100.0
layout_window = [0, 10]
appearance_window = [10, 20]
iterations = 3

[guidance.inversion]
inner_steps = $INV_STEPS
EOF
    run_step d_images "$CAP_D" "$WORK/logs/d_images.out" "$OUT/images.json" \
      env PND_BIN="$BIN/pnd" python3 tools/bench/pipeline.py --model-dir "$SD" --device "$DEV" \
      --dtype "$DTYPE" --size "$SIZE" --steps "$STEPS" --rounds 1 --threads "$THREADS" --tf32 off \
      --guided --reference crates/metrics/tests/fixtures/profile_images/real/0.png --class-noun dog \
      --guidance-config "$WORK/guidance.toml" --trace "$OUT/trace.jsonl" --out-dir "$WORK/images" \
      --json "$OUT/images.json"
  fi
fi

if [ "$setup_status" != ok ]; then
  for name in model a_parity b_demo c_unet d_images; do
    $S step "$SUMMARY" "$name" --status skipped --seconds 0 --note "setup failed"
  done
fi
out_check end
ok=true
[ ${#FAILED[@]} -eq 0 ] || ok=false
$S set "$SUMMARY" failed "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${FAILED[@]}")"
$S set "$SUMMARY" ok "$ok"
$S set "$SUMMARY" total_s "$((SECONDS - T0))"
# The summary, on one line, last (it is what comes back when the files do not).
$S print "$SUMMARY"
[ "$ok" = true ]
