#!/usr/bin/env python3
"""UNet benchmark: candle (crates/diffusion/examples/bench_unet.rs) vs PyTorch + diffusers.

The real SD 1.5 UNet configuration, by default with random weights drawn by each side (256x256,
latent 32x32, batch 1, f32, CPU, the same thread count on both sides), or with `--model DIR` the
UNet of one diffusers folder that both sides load (`tools/bench/sd_folder.py` writes one; the GPU
check does, once). Each side runs in its own process per batch size (so VmHWM and the GPU peak are
its own) and runs every mode in it:
  fwd     no-grad forward (diffusers' default SDPA attention; candle's fused kernels)
  fwdbwd  forward with a latent that requires grad, capturing the up_blocks.2.attentions.0 cross-
          attention probabilities (diffusers' AttnProcessor at that site, to expose them) and that
          transformer block's output; loss = sum(map[..., 5]) + mean(block); backward to the latent.
Weights never require grad on either side. Ratio = PyTorch median time / candle median time
(> 1: candle is faster). On CUDA: `--tf32 off` (the default) sets NVIDIA_TF32_OVERRIDE=0 for both
sides and turns off torch's `allow_tf32` flags, so neither side computes f32 in TF32; the peak GPU
memory of each mode is measured from outside the same way for both (`gpumem.py`), and PyTorch's
`max_memory_allocated` is given beside it. `--json FILE` is rewritten after every child process, so
a run cut short keeps what it measured.

Build first:  cargo build --release -p diffusion --example bench_unet   (or PND_BENCH_UNET=BIN, and
              PND_BENCH_UNET_ARGS="bench-unet" when BIN is the GPU check's `gpu_check`)
Run:          ~/.venvs/ref/bin/python tools/bench/unet.py [--threads N] [--iters 3] [--warmup 1] [--rounds 2]
              [--device cuda --dtype f16 --size 512 --batches 1,4 --model DIR --json FILE]
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
BIN = os.environ.get("PND_BENCH_UNET", os.path.join(ROOT, "target", "release", "examples", "bench_unet"))

SD15 = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
ATTN_SITE = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"
BLOCK_SITE = "up_blocks.2.attentions.0.transformer_blocks.0"


def vm_hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def set_tf32(tf32):
    """PyTorch's TF32 switches for f32 matrix products and cuDNN convolutions (`default` leaves
    them as they are); returns their values."""
    import torch
    if tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = tf32 == "on"
        torch.backends.cudnn.allow_tf32 = tf32 == "on"
    return dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32)


def worker(modes, iters, warmup, threads, device="cpu", dtype="f32", size=256, batch=1, model=None,
           tf32="default"):
    """Every mode on one model in this process; one JSON line per mode."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.set_num_threads(threads)
    flags = set_tf32(tf32)
    torch.manual_seed(0)
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    load_start = time.perf_counter()
    if model:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dt)
    else:
        unet = UNet2DConditionModel(**SD15)
    unet = unet.eval().to(device=device, dtype=dt)
    for p in unet.parameters():
        p.requires_grad_(False)
    sync(device)
    load_s = time.perf_counter() - load_start
    after_load = vm_hwm_kb()
    g = torch.Generator().manual_seed(1)
    lat = size // 8
    sample = torch.randn(batch, 4, lat, lat, generator=g).to(device=device, dtype=dt)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device=device, dtype=dt)
    cuda = device.startswith("cuda")

    store = {}
    attn = dict(unet.named_modules())[ATTN_SITE]
    inner = AttnProcessor()

    def recording_processor(attn_mod, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        original = attn_mod.get_attention_scores
        batch = hidden_states.shape[0]

        def rec(q, k, mask=None):
            p = original(q, k, mask)
            store["map"] = p.reshape(batch, attn_mod.heads, p.shape[1], p.shape[2])
            return p

        attn_mod.get_attention_scores = rec
        try:
            return inner(attn_mod, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn_mod.get_attention_scores

    default_processor = attn.processor
    block = dict(unet.named_modules())[BLOCK_SITE]
    block.register_forward_hook(lambda m, i, o: store.__setitem__("block", o))

    for mode in modes:
        # The recording processor only where the map is needed, as candle captures it only there.
        attn.set_processor(recording_processor if mode == "fwdbwd" else default_processor)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        times = []
        for i in range(warmup + iters):
            sync(device)
            start = time.perf_counter()
            if mode == "fwd":
                with torch.no_grad():
                    eps = unet(sample, 500, context).sample
                    eps.float().sum().item()
            elif mode == "fwdbwd":
                z = sample.clone().requires_grad_(True)
                unet(z, 500, context)
                loss = store["map"][..., 5].float().sum() + store["block"].float().mean()
                loss.backward()
                z.grad.float().square().sum().item()
            else:
                sys.exit(f"unknown mode {mode!r} (fwd | fwdbwd)")
            store.clear()
            sync(device)
            secs = time.perf_counter() - start
            if i >= warmup:
                times.append(secs)
            print(f"torch {mode} b{batch} run {i}: {secs:.3f} s", file=sys.stderr)
        median = sorted(times)[len(times) // 2]
        print(json.dumps(dict(
            side="torch", mode=mode, device=device, dtype=dtype, size=size, batch=batch, model=model,
            threads=torch.get_num_threads(), tf32=flags, load_s=load_s, times=times, median=median,
            t0=t0, t1=time.time(), vm_hwm_after_load_kb=after_load, vm_hwm_kb=vm_hwm_kb(),
            alloc_peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        )), flush=True)


def child_env(threads, tf32):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[k] = str(threads)
    if tf32 == "off":
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    return env


def main():
    import gpumem

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=None, help="one batch size (same as --batches N)")
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes")
    ap.add_argument("--model", default=None, help="diffusers folder whose unet/ both sides load")
    ap.add_argument("--tf32", default="off", choices=["off", "on", "default"])
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    ap.add_argument("--json", default=None, help="also write the summary as JSON to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [args.batch] if args.batch else [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    if args.worker:
        worker(args.worker.split(","), args.iters, args.warmup, args.threads, args.device, args.dtype,
               args.size, batches[0], args.model, args.tf32)
        return
    if not os.path.exists(BIN):
        sys.exit(f"missing {BIN}: cargo build --release -p diffusion --example bench_unet")
    sampler = gpumem.GpuSampler().start() if args.device.startswith("cuda") else None
    env = child_env(args.threads, args.tf32)
    model = os.path.abspath(args.model) if args.model else None
    summary = dict(device=args.device, dtype=args.dtype, size=args.size, batches=batches,
                   threads=args.threads, rounds=args.rounds, iters=args.iters, warmup=args.warmup,
                   tf32=args.tf32, model=model, gpu_memory=sampler.source if sampler else None,
                   results={}, errors=[])
    runs = {}  # (mode, batch) -> {"torch": [line...], "candle": [line...]}

    def summarize():
        for (mode, batch), r in runs.items():
            key = f"{mode}-b{batch}"
            e = {}
            for side in ("torch", "candle"):
                lines = r[side]
                if not lines:
                    continue
                ts = [x for line in lines for x in line["times"]]
                e[f"{side}_median_s"] = round(statistics.median(ts), 4)
                e[f"{side}_min_s"] = round(min(ts), 4)
                e[f"{side}_load_s"] = round(lines[0]["load_s"], 2)
                e[f"{side}_host_peak_mib"] = round(max(x["vm_hwm_kb"] for x in lines) / 1024, 1)
                gp = [x["gpu_peak_mib"] for x in lines if x.get("gpu_peak_mib") is not None]
                e[f"{side}_gpu_peak_mib"] = max(gp) if gp else None
                if side == "torch":
                    ap_ = [x["alloc_peak_mib"] for x in lines if x.get("alloc_peak_mib") is not None]
                    e["torch_alloc_peak_mib"] = max(ap_) if ap_ else None
            if "torch_median_s" in e and "candle_median_s" in e:
                e["ratio"] = round(e["torch_median_s"] / e["candle_median_s"], 3)
            summary["results"][key] = e
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, args.json)

    bench_args = os.environ.get("PND_BENCH_UNET_ARGS", "").split()
    shape = ["--device", args.device, "--dtype", args.dtype, "--size", str(args.size)]
    if model:
        shape += ["--model", model]
    for rnd in range(args.rounds):
        for batch in batches:
            cmds = {
                "torch": [sys.executable, os.path.abspath(__file__), "--worker", ",".join(modes),
                          "--threads", str(args.threads), "--iters", str(args.iters), "--warmup",
                          str(args.warmup), "--batch", str(batch), "--tf32", args.tf32] + shape,
                "candle": [BIN] + bench_args + [",".join(modes), str(args.iters), str(args.warmup),
                                                "--batch", str(batch)] + shape,
            }
            # Rounds alternate the two sides so that a change in machine load hits both.
            order = ["torch", "candle"] if rnd % 2 == 0 else ["candle", "torch"]
            for side in order:
                res = gpumem.run(cmds[side], args.timeout, sampler, env=env)
                lines = [json.loads(l) for l in res["stdout"].splitlines() if l.startswith("{")]
                for line in lines:
                    line["gpu_peak_mib"] = gpumem.window_peak_mib(sampler, res["gpu_base"], line["t0"], line["t1"])
                    runs.setdefault((line["mode"], batch), {"torch": [], "candle": []})[side].append(line)
                if res["rc"] != 0:
                    why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
                    summary["errors"].append(f"{side} b{batch} round {rnd}: {why} after {res['wall_s']:.0f} s "
                                             f"({len(lines)} of {len(modes)} modes done)")
                    print(f"unet.py: {summary['errors'][-1]}", file=sys.stderr)
                summarize()
    summarize()
    if sampler:
        sampler.stop()

    lat = args.size // 8
    print(f"\nSD 1.5 UNet, {args.size}x{args.size} (latent {lat}x{lat}), {args.dtype}, {args.device}, "
          f"{args.threads} threads, TF32 {args.tf32}, {args.rounds} round(s) x {args.iters} timed runs per side "
          f"(after {args.warmup} warm-up each)")
    print(f"{'mode':10} {'torch med':>9} {'candle med':>10} {'ratio':>6}  {'torch min':>9} {'candle min':>10}  "
          f"{'host MiB t/c':>13}  {'GPU MiB t/c':>13}")
    for key, e in summary["results"].items():
        if "ratio" not in e:
            print(f"{key:10} incomplete: {e}")
            continue
        gpu = f"{e['torch_gpu_peak_mib']}/{e['candle_gpu_peak_mib']}"
        print(f"{key:10} {e['torch_median_s']:9.3f} {e['candle_median_s']:10.3f} {e['ratio']:5.2f}x  "
              f"{e['torch_min_s']:9.3f} {e['candle_min_s']:10.3f}  "
              f"{e['torch_host_peak_mib']:6.0f}/{e['candle_host_peak_mib']:<6.0f}  {gpu:>13}")
    print("ratio = torch time / candle time (> 1: candle faster; targets: fwd >= 1.0, fwdbwd >= 0.8)")
    if summary["errors"]:
        sys.exit("unet.py: " + "; ".join(summary["errors"]))


if __name__ == "__main__":
    main()
