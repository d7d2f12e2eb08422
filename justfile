# Pick-and-Draw DreamBench harness. `just --list` shows every recipe.

default:
    @just --list

# Run the whole test suite (what CI runs).
test:
    cargo test --workspace

# Verify a DreamBench copy (default: the shared one beside the checkout).
check-data data="../shared/dreambench":
    cargo run --release -p runner --bin pnd -- dataset check --data {{data}}

# Download DreamBench from google/dreambooth and verify it.
fetch-data dest="dreambench":
    cargo run --release -p runner --bin pnd -- dataset fetch --dest {{dest}}

# List subjects, classes, image counts and prompts.
list data="../shared/dreambench":
    cargo run --release -p runner --bin pnd -- dataset list --data {{data}}

# Regenerate the parity fixtures (needs the Python reference stacks, see README).
fixtures: fixtures-metrics fixtures-sd fixtures-blip fixtures-train fixtures-torchmetrics

fixtures-metrics:
    ~/.venvs/ref/bin/python tools/fixtures/metrics.py
    ~/.venvs/ref/bin/python tools/fixtures/metric_profiles.py

fixtures-sd:
    ~/.venvs/ref/bin/python tools/fixtures/sd_unet.py
    ~/.venvs/ref/bin/python tools/fixtures/sd_pipeline.py
    ~/.venvs/ref/bin/python tools/fixtures/ip_adapter.py

# The trainers: one optimizer step of each against diffusers (train_step.py), then the tiny trained
# outputs (`pnd train`, the commands of train_outputs.py's docstring, dev profile as the tests) and
# diffusers' samples of them (train_outputs.py).
fixtures-train:
    ~/.venvs/ref/bin/python tools/fixtures/train_step.py
    ~/.venvs/ref/bin/python tools/fixtures/train_outputs.py --pnd "cargo run -q -p runner --bin pnd --"

# torchmetrics 1.9's own CLIPScore (the torchmetrics profile's long prompts) runs only under
# transformers 4.x (see the script's header).
fixtures-torchmetrics:
    cd tools/fixtures && ~/.venvs/tm/bin/python torchmetrics_clip_score.py

# BLIP-Diffusion loads only with diffusers 0.32.2 + transformers 4.51.3 (see the script's header).
fixtures-blip:
    ~/.venvs/blip/bin/python tools/fixtures/blip_diffusion.py

# The whole pipeline offline on tiny models (writes ./pnd-demo).
demo out="pnd-demo":
    cargo run --release -p runner --bin pnd -- demo --out {{out}}

# Train the per-subject baselines of Table 1 (30 Textual Inversion embeddings, 30 DreamBooth
# models) that are missing; existing ones are kept, interrupted ones resume.
train-baselines *args:
    cargo run --release -p runner --bin pnd -- train baselines experiments/train-baselines.toml {{args}}

# Table 1 of the paper: the missing baselines are trained first, then every baseline with and
# without Pick-and-Draw, then the report.
reproduce-table1:
    cargo run --release -p runner --bin pnd -- train baselines experiments/train-baselines.toml
    cargo run --release -p runner --bin pnd -- sweep experiments/table1.toml --resume
    cargo run --release -p runner --bin pnd -- report results/runs/table1

# One ablation: table2-resolution, ablation-emd, ablation-losses, ablation-timesteps.
ablation name:
    cargo run --release -p runner --bin pnd -- sweep experiments/{{name}}.toml --resume
    cargo run --release -p runner --bin pnd -- report results/runs/{{name}}

# The paper's qualitative figures (Figs. 1, 4, 6, 7, 8 of experiments/figures/paper.toml) from the
# Table 1 and ablation runs: PNG (300 dpi), SVG and a LaTeX snippet per figure, into `out`.
paper-figures runs="results/runs" out="results/figures" spec="experiments/figures/paper.toml":
    cargo run --release -p runner --bin pnd -- figures {{runs}}/table1 {{runs}}/ablation-losses {{runs}}/ablation-emd --spec {{spec}} --out {{out}}

# The same on tiny models (CPU minutes): Table 1's and the two ablations' methods over four cells of
# the demo's mini benchmark (`pnd demo --paper`: runs in `out`/runs, figures in `out`/figures),
# then `pnd figures` over those runs again, with the shipped figures moved onto those cells.
paper-figures-tiny out="pnd-paper-figures":
    cargo run --release -p runner --bin pnd -- demo --paper --out {{out}}
    just paper-figures {{out}}/runs {{out}}/figures {{out}}/figures.toml

# Fig. 3 on the tiny model: the cross-attention maps of every UNet layer, the appearance masks and
# the layout loss's smoothed maps of one generation (writes {{out}}/maps.png and its tensors).
maps-tiny out="pnd-maps":
    cargo run --release -p runner --bin pnd -- tiny-model --out {{out}}/model
    cargo run --release -p runner --bin pnd -- maps --model {{out}}/model --prompt "a photo of a dog on the beach" --class dog --steps 20 --step 10 --overlay --out {{out}}

# Tables and figures of a run folder.
report run:
    cargo run --release -p runner --bin pnd -- report {{run}}

# Side-by-side benchmarks against the Python reference (needs ~/.venvs/ref, see README); run them
# on a quiet machine (`uptime` below 1.5, nothing building beside).
bench:
    cargo build --release --bin pnd
    cargo build --release -p diffusion --example bench_unet -p metrics --example bench_embed -p guidance --example bench_guidance
    ~/.venvs/ref/bin/python tools/bench/unet.py --threads 2 --iters 3 --warmup 1 --rounds 2
    RAYON_NUM_THREADS=2 target/release/examples/bench_embed 8 5
    RAYON_NUM_THREADS=2 target/release/examples/bench_guidance 3
    ~/.venvs/ref/bin/python tools/bench/pipeline.py --rounds 2
