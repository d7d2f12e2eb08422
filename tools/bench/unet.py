#!/usr/bin/env python3
"""UNet benchmark: candle (crates/diffusion/examples/bench_unet.rs) vs PyTorch + diffusers.

The real SD 1.5 UNet configuration with random weights, 256x256 (latent 32x32), batch 1, f32, CPU,
the same thread count on both sides, each side in its own process (so VmHWM is its own peak):
  fwd     no-grad forward (diffusers' default SDPA attention; candle's fused kernels)
  fwdbwd  forward with a latent that requires grad, capturing the up_blocks.2.attentions.0 cross-
          attention probabilities (diffusers' AttnProcessor at that site, to expose them) and that
          transformer block's output; loss = sum(map[..., 5]) + mean(block); backward to the latent.
Weights never require grad on either side. Ratio = PyTorch median time / candle median time
(> 1: candle is faster).

Build first:  cargo build --release -p diffusion --example bench_unet
Run:          ~/.venvs/ref/bin/python tools/bench/unet.py [--threads N] [--iters 3] [--warmup 1] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
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
    if device == "cuda":
        torch.cuda.synchronize()


def worker(mode, iters, warmup, threads, device="cpu", dtype="f32", size=256, batch=1):
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    unet = UNet2DConditionModel(**SD15).eval().to(device=device, dtype=dt)
    for p in unet.parameters():
        p.requires_grad_(False)
    after_load = vm_hwm_kb()
    g = torch.Generator().manual_seed(1)
    lat = size // 8
    sample = torch.randn(batch, 4, lat, lat, generator=g).to(device=device, dtype=dt)
    context = torch.randn(batch, 77, 768, generator=g).to(device=device, dtype=dt)

    store = {}
    if mode == "fwdbwd":
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

        attn.set_processor(recording_processor)
        block = dict(unet.named_modules())[BLOCK_SITE]
        block.register_forward_hook(lambda m, i, o: store.__setitem__("block", o))

    times = []
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                eps = unet(sample, 500, context).sample
                eps.float().sum().item()
        else:
            z = sample.clone().requires_grad_(True)
            unet(z, 500, context)
            loss = store["map"][..., 5].float().sum() + store["block"].float().mean()
            loss.backward()
            z.grad.float().square().sum().item()
            store.clear()
        sync(device)
        secs = time.perf_counter() - start
        if i >= warmup:
            times.append(secs)
        print(f"torch {mode} run {i}: {secs:.3f} s", file=sys.stderr)
    median = sorted(times)[len(times) // 2]
    print(
        json.dumps(
            dict(
                side="torch",
                mode=mode,
                device=device,
                dtype=dtype,
                size=size,
                batch=batch,
                threads=torch.get_num_threads(),
                times=times,
                median=median,
                vm_hwm_after_load_kb=after_load,
                vm_hwm_kb=vm_hwm_kb(),
            )
        )
    )


def run(cmd, threads):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[k] = str(threads)
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the summary as JSON to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.iters, args.warmup, args.threads, args.device, args.dtype,
               args.size, args.batch)
        return
    if not os.path.exists(BIN):
        sys.exit(f"missing {BIN}: cargo build --release -p diffusion --example bench_unet")
    # Rounds alternate the two sides so that a change in machine load hits both.
    results = {m: {"torch": [], "candle": []} for m in args.modes.split(",")}
    for _ in range(args.rounds):
        for mode in results:
            shape = ["--device", args.device, "--dtype", args.dtype, "--size", str(args.size),
                     "--batch", str(args.batch)]
            t = run([sys.executable, __file__, "--worker", mode, "--threads", str(args.threads),
                     "--iters", str(args.iters), "--warmup", str(args.warmup)] + shape, args.threads)
            c = run([BIN, mode, str(args.iters), str(args.warmup)] + shape, args.threads)
            results[mode]["torch"].append(t)
            results[mode]["candle"].append(c)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    lat = args.size // 8
    summary = dict(device=args.device, dtype=args.dtype, size=args.size, batch=args.batch,
                   threads=args.threads, rounds=args.rounds, iters=args.iters, modes={})
    for mode, r in results.items():
        tt = [x for run_ in r["torch"] for x in run_["times"]]
        ct = [x for run_ in r["candle"] for x in run_["times"]]
        summary["modes"][mode] = dict(torch_median=median(tt), candle_median=median(ct),
                                      ratio=median(tt) / median(ct))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print(f"\nSD 1.5 UNet, {args.size}x{args.size} (latent {lat}x{lat}), batch {args.batch}, "
          f"{args.dtype}, {args.device}, {args.threads} threads, "
          f"{args.rounds} round(s) x {args.iters} timed runs per side (after {args.warmup} warm-up each)")
    print(f"{'mode':8} {'torch med':>9} {'candle med':>10} {'ratio':>6}  {'torch min':>9} {'candle min':>10} "
          f"{'ratio':>6}  {'torch peak MiB':>14} {'candle peak MiB':>15}")
    for mode, r in results.items():
        tt = [x for run_ in r["torch"] for x in run_["times"]]
        ct = [x for run_ in r["candle"] for x in run_["times"]]
        tpeak = max(x["vm_hwm_kb"] for x in r["torch"]) / 1024
        cpeak = max(x["vm_hwm_kb"] for x in r["candle"]) / 1024
        print(f"{mode:8} {median(tt):9.3f} {median(ct):10.3f} {median(tt) / median(ct):5.2f}x  "
              f"{min(tt):9.3f} {min(ct):10.3f} {min(tt) / min(ct):5.2f}x  {tpeak:14.0f} {cpeak:15.0f}")
    for mode, r in results.items():
        tw = max(x["vm_hwm_kb"] - x["vm_hwm_after_load_kb"] for x in r["torch"]) / 1024
        cw = max(x["vm_hwm_kb"] - x["vm_hwm_after_load_kb"] for x in r["candle"]) / 1024
        print(f"{mode}: peak above the loaded weights: torch {tw:.0f} MiB, candle {cw:.0f} MiB")
    print("ratio = torch time / candle time (> 1: candle faster; targets: fwd >= 1.0, fwdbwd >= 0.8)")

if __name__ == "__main__":
    main()
