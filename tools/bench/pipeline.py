#!/usr/bin/env python3
"""Whole-image benchmark (issue 13): `pnd generate` against diffusers' StableDiffusionPipeline.

Both sides load the same Stable Diffusion 1.5-shaped folder with random weights (real SD 1.5 UNet,
VAE and CLIP text-encoder configurations, the real CLIP tokenizer, DDIM with SD's configuration),
written once by diffusers' `save_pretrained`, and make one image: 256×256 by default, 50 DDIM steps,
classifier-free guidance 7.5, f32 on the CPU, the same thread count. Each side runs in its own
process and the rounds alternate the two sides.

Reported per side: the wall time of the whole process (start, load, sampling, decoding, PNG), and for
diffusers also the pipeline call alone (its load time is printed beside). Ratio = diffusers time /
pnd time (> 1: pnd faster).

Build first:  cargo build --release --bin pnd
Run:          ~/.venvs/ref/bin/python tools/bench/pipeline.py [--size 256] [--steps 50]
              [--threads 2] [--rounds 2] [--model-dir /tmp/pnd-bench-sd15]
The model folder (4.3 GB) is written on the first run and reused.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PND = os.environ.get("PND_BIN", os.path.join(ROOT, "target", "release", "pnd"))
PROMPT = "a photo of a dog on the beach"

# The real SD 1.5 UNet configuration, as the UNet benchmark pins it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet import SD15 as SD15_UNET  # noqa: E402

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def make_model(path: str) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = os.environ.get("PND_CLIP_TOKENIZER", os.path.join(ROOT, "..", "shared", "clip-tokenizer"))
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def torch_child(args) -> None:
    """One diffusers image in this process; prints a JSON line."""
    start = time.perf_counter()
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            PROMPT,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    generated = time.perf_counter()
    image.save(os.path.join(args.model_dir, "..", "bench-torch.png"))
    print(json.dumps({"load": loaded - start, "generate": generated - loaded}))


def run_torch(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model-dir", args.model_dir,
           "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    line = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, **line}


def run_pnd(args) -> dict:
    out_png = os.path.join(args.model_dir, "..", "bench-pnd.png")
    cmd = [PND, "generate", "--model", args.model_dir, "--prompt", PROMPT, "--height", str(args.size),
           "--width", str(args.size), "--steps", str(args.steps), "--seed", "0", "--device", "cpu",
           "--out", out_png, "--quiet"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return {"wall": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/pnd-bench-sd15/model")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return torch_child(args)
    if not os.path.exists(os.path.join(args.model_dir, "model_index.json")):
        print(f"writing the random SD 1.5 folder to {args.model_dir} ...", flush=True)
        make_model(args.model_dir)
    if not os.path.exists(PND):
        sys.exit(f"{PND} not found: cargo build --release --bin pnd")
    with open("/proc/loadavg") as f:
        print("load average before:", f.read().split()[:3], flush=True)
    torch_runs, pnd_runs = [], []
    for r in range(args.rounds):
        # Alternate which side goes first.
        order = [("torch", run_torch), ("pnd", run_pnd)]
        if r % 2 == 1:
            order.reverse()
        for name, f in order:
            res = f(args)
            (torch_runs if name == "torch" else pnd_runs).append(res)
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in res.items()), flush=True)
    with open("/proc/loadavg") as f:
        print("load average after:", f.read().split()[:3])
    tw = statistics.median(x["wall"] for x in torch_runs)
    tg = statistics.median(x["generate"] for x in torch_runs)
    tl = statistics.median(x["load"] for x in torch_runs)
    pw = statistics.median(x["wall"] for x in pnd_runs)
    print(f"\nSD 1.5 (random weights), {args.size}x{args.size}, {args.steps} DDIM steps, CFG 7.5, f32, "
          f"cpu, {args.threads} threads, median of {args.rounds} alternating round(s)")
    print(f"diffusers: process {tw:.2f} s (load {tl:.2f} s, pipeline call {tg:.2f} s)")
    print(f"pnd:       process {pw:.2f} s")
    print(f"ratio (diffusers process / pnd process) = {tw / pw:.2f}x; "
          f"(diffusers pipeline call alone / pnd process) = {tg / pw:.2f}x")


if __name__ == "__main__":
    main()
