#!/usr/bin/env python3
"""Whole-image benchmark (issues 13 and 24): `pnd generate` against diffusers' StableDiffusionPipeline.

Both sides load the same Stable Diffusion 1.5-shaped folder with random weights (real SD 1.5 UNet,
VAE and CLIP text-encoder configurations, the CLIP tokenizer, DDIM with SD's configuration),
written once (`sd_folder.py`), and make one image: 256×256 by default, 50 DDIM steps,
classifier-free guidance 7.5, f32 on the CPU, the same thread count. Each side runs in its own
process and the rounds alternate the two sides. With `--guided` a third process makes the same
image with Pick-and-Draw (`pnd generate --pick-and-draw --reference IMG --class NOUN`, the paper's
windows unless `--guidance-config` says otherwise); diffusers has no Pick-and-Draw, so that image
has no diffusers counterpart.

Reported per side: the wall time of the whole process (start, load, sampling, decoding, PNG); for
diffusers also the pipeline call alone (its load time beside); for pnd the denoising time its
progress lines give (from the latents to the last step; guided: with the inversion, palette and
layout template, whose times pnd prints and are given apart). On CUDA, each process's peak GPU
memory, measured from outside the same way for both sides (`gpumem.py`), and diffusers'
`torch.cuda.max_memory_allocated`. Ratio = diffusers time / pnd time (> 1: pnd faster).
`--json FILE` is rewritten after every process.

Build first:  cargo build --release --bin pnd   (or PND_BIN=BIN)
Run:          ~/.venvs/ref/bin/python tools/bench/pipeline.py [--size 256] [--steps 50]
              [--threads 2] [--rounds 2] [--model-dir /tmp/pnd-bench-sd15/model]
              [--device cuda --dtype f16 --guided --reference IMG --json FILE]
The model folder (4.3 GB in f32) is written on the first run and reused.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpumem  # noqa: E402
import sd_folder  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PND = os.environ.get("PND_BIN", os.path.join(ROOT, "target", "release", "pnd"))
PROMPT = "a photo of a dog on the beach"


def make_model(path: str) -> None:
    """The f32 CPU folder of the CPU benchmark, with the real CLIP tokenizer's files."""
    tok_dir = os.environ.get("PND_CLIP_TOKENIZER", os.path.join(ROOT, "..", "shared", "clip-tokenizer"))
    sd_folder.write(path, tok_dir, "sd15", "f32", "cpu")


def torch_child(args) -> None:
    """One diffusers image in this process; prints a JSON line."""
    start = time.perf_counter()
    import torch
    from diffusers import StableDiffusionPipeline

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from unet import set_tf32

    torch.set_num_threads(args.threads)
    flags = set_tf32(args.tf32)
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=dt).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            PROMPT,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator(args.device).manual_seed(0),
        ).images[0]
    generated = time.perf_counter()
    image.save(os.path.join(args.out_dir, "diffusers.png"))
    print(json.dumps({
        "load": loaded - start,
        "generate": generated - loaded,
        "tf32": flags,
        "alloc_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
    }))


def child_env(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1")
    if args.tf32 == "off":
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    return env


def run_torch(args, sampler) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model-dir", args.model_dir,
           "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype, "--tf32", args.tf32, "--out-dir", args.out_dir]
    res = gpumem.run(cmd, args.timeout, sampler, env=child_env(args))
    out = {"wall": res["wall_s"], "rc": res["rc"], "timed_out": res["timed_out"],
           "host_peak_mib": res["host_peak_mib"], "gpu_peak_mib": res["gpu_peak_mib"]}
    lines = [l for l in res["stdout"].splitlines() if l.startswith("{")]
    if lines:
        out.update(json.loads(lines[-1]))
    return out


DENOISING = re.compile(r"denoising: step (\d+)/(\d+), ([0-9.]+)s")
PHASES = re.compile(r"pick-and-draw: inversion ([0-9.]+)s, palette ([0-9.]+)s \(cache (\w+)\), "
                    r"template ([0-9.]+)s, guided sampling ([0-9.]+)s")


def run_pnd(args, sampler, guided: bool) -> dict:
    name = "pnd-guided" if guided else "pnd"
    cmd = [PND, "generate", "--model", args.model_dir, "--prompt", PROMPT, "--height", str(args.size),
           "--width", str(args.size), "--steps", str(args.steps), "--seed", "0", "--device", args.device,
           "--dtype", args.dtype, "--out", os.path.join(args.out_dir, f"{name}.png")]
    if guided:
        cmd += ["--pick-and-draw", "--reference", args.reference, "--class", args.class_noun,
                "--palette-cache", args.cache]
        if args.guidance_config:
            cmd += ["--guidance-config", args.guidance_config]
        if args.trace:
            cmd += ["--trace", args.trace]
    res = gpumem.run(cmd, args.timeout, sampler, env=child_env(args))
    out = {"wall": res["wall_s"], "rc": res["rc"], "timed_out": res["timed_out"],
           "host_peak_mib": res["host_peak_mib"], "gpu_peak_mib": res["gpu_peak_mib"]}
    steps = DENOISING.findall(res["stderr"])
    if steps and steps[-1][0] == steps[-1][1]:
        out["denoising"] = float(steps[-1][2])
    m = PHASES.search(res["stderr"])
    if m:
        out.update(inversion=float(m[1]), palette=float(m[2]), cache=m[3], template=float(m[4]),
                   guided_sampling=float(m[5]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/pnd-bench-sd15/model")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--tf32", default="off", choices=["off", "on", "default"])
    p.add_argument("--guided", action="store_true", help="also one Pick-and-Draw image per round (pnd only)")
    p.add_argument("--reference", help="--guided: the reference image")
    p.add_argument("--class-noun", default="dog", help="--guided: the subject's class")
    p.add_argument("--guidance-config", help="--guided: TOML of guidance settings (default: the paper's)")
    p.add_argument("--cache", default=None, help="--guided: palette cache (default: a fresh one under --out-dir)")
    p.add_argument("--trace", default=None, help="--guided: where pnd writes the trace")
    p.add_argument("--out-dir", default=None, help="where the images go (default: beside the model folder)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--json", default=None, help="also write the summary as JSON to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out_dir = os.path.abspath(args.out_dir or os.path.join(args.model_dir, ".."))
    os.makedirs(args.out_dir, exist_ok=True)
    if args.child:
        return torch_child(args)
    if args.guided and not args.reference:
        sys.exit("--guided needs --reference IMG")
    args.cache = args.cache or os.path.join(args.out_dir, "palette-cache")
    if not os.path.exists(os.path.join(args.model_dir, "model_index.json")):
        print(f"writing the random SD 1.5 folder to {args.model_dir} ...", flush=True)
        make_model(args.model_dir)
    if not os.path.exists(PND):
        sys.exit(f"{PND} not found: cargo build --release --bin pnd")
    with open("/proc/loadavg") as f:
        print("load average before:", f.read().split()[:3], flush=True)
    sampler = gpumem.GpuSampler().start() if args.device.startswith("cuda") else None
    runs = {"diffusers": [], "pnd": [], "pnd-guided": []}
    summary = dict(device=args.device, dtype=args.dtype, size=args.size, steps=args.steps, cfg=7.5,
                   threads=args.threads, tf32=args.tf32, rounds=args.rounds,
                   gpu_memory=sampler.source if sampler else None, runs=runs, errors=[])

    def save():
        for side, rs in runs.items():
            ok = [r for r in rs if r["rc"] == 0]
            if ok:
                summary[f"{side}_wall_s"] = round(statistics.median(r["wall"] for r in ok), 2)
        d, q = summary.get("diffusers_wall_s"), summary.get("pnd_wall_s")
        if d and q:
            summary["ratio_process"] = round(d / q, 3)
        calls = [r["generate"] for r in runs["diffusers"] if "generate" in r]
        loops = [r["denoising"] for r in runs["pnd"] if "denoising" in r]
        if calls and loops:
            summary["ratio_sampling"] = round(statistics.median(calls) / statistics.median(loops), 3)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, args.json)

    for r in range(args.rounds):
        # Alternate which side goes first.
        order = [("diffusers", lambda: run_torch(args, sampler)), ("pnd", lambda: run_pnd(args, sampler, False))]
        if r % 2 == 1:
            order.reverse()
        if args.guided:
            order.append(("pnd-guided", lambda: run_pnd(args, sampler, True)))
        for name, f in order:
            res = f()
            runs[name].append(res)
            if res["rc"] != 0:
                why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
                summary["errors"].append(f"{name} round {r}: {why} after {res['wall']:.0f} s")
            shown = {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "rc"}
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()), flush=True)
            save()
    if sampler:
        sampler.stop()
    with open("/proc/loadavg") as f:
        print("load average after:", f.read().split()[:3])
    print(f"\nSD 1.5 (random weights), {args.size}x{args.size}, {args.steps} DDIM steps, CFG 7.5, {args.dtype}, "
          f"{args.device}, {args.threads} threads, TF32 {args.tf32}, median of {args.rounds} alternating round(s)")
    ok = {k: [x for x in v if x["rc"] == 0] for k, v in runs.items()}
    if ok["diffusers"]:
        tw = statistics.median(x["wall"] for x in ok["diffusers"])
        tg = statistics.median(x["generate"] for x in ok["diffusers"])
        tl = statistics.median(x["load"] for x in ok["diffusers"])
        print(f"diffusers: process {tw:.2f} s (load {tl:.2f} s, pipeline call {tg:.2f} s)")
    if ok["pnd"]:
        pw = statistics.median(x["wall"] for x in ok["pnd"])
        pd = [x["denoising"] for x in ok["pnd"] if "denoising" in x]
        print(f"pnd:       process {pw:.2f} s" + (f" (denoising {statistics.median(pd):.2f} s)" if pd else ""))
    if ok["pnd-guided"]:
        g = ok["pnd-guided"][-1]
        print(f"pnd guided: process {g['wall']:.2f} s (" + ", ".join(
            f"{k} {g[k]:.1f} s" for k in ("inversion", "palette", "template", "guided_sampling") if k in g) + ")")
    if "ratio_process" in summary:
        print(f"ratio (diffusers process / pnd process) = {summary['ratio_process']:.2f}x" +
              (f"; (diffusers pipeline call / pnd denoising) = {summary['ratio_sampling']:.2f}x"
               if "ratio_sampling" in summary else ""))
    if summary["errors"]:
        sys.exit("pipeline.py: " + "; ".join(summary["errors"]))


if __name__ == "__main__":
    main()
