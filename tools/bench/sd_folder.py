#!/usr/bin/env python3
"""Writes one random-weight Stable Diffusion folder (diffusers layout) that both sides of a
benchmark load: `pnd` (`pnd generate --model DIR`, `bench_unet --model DIR`) and diffusers
(`StableDiffusionPipeline.from_pretrained(DIR)`, `UNet2DConditionModel.from_pretrained(DIR,
subfolder="unet")`). Drawn once, by PyTorch's own initializers, on the device given (a GPU draws
the SD 1.5 UNet's 860 M weights in well under a second), and saved in the dtype given.

  --config sd15     the real SD 1.5 UNet, VAE and CLIP ViT-L/14 text-encoder configurations
  --config DIR      the configurations of an existing folder (e.g. what `pnd tiny-model` writes)
  --tokenizer DIR   vocab.json + merges.txt (e.g. the `tokenizer/` of `pnd tiny-model`'s folder,
                    whose vocabulary is the real CLIP one built into pnd)

Prints one JSON line: the folder, its size and the seconds taken.
Run: python3 tools/bench/sd_folder.py --out /tmp/sd15 --tokenizer TINY/tokenizer [--config sd15]
     [--dtype f16] [--device cuda]
"""

import argparse
import json
import os
import shutil
import sys
import time

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
    # As runwayml/stable-diffusion-v1-5's text_encoder/config.json has them.
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# SD 1.5's scheduler, as DDIM.
SD15_DDIM = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# What the CLIP tokenizer of SD 1.5 says about itself (`model_max_length` sets the padding).
TOKENIZER_CONFIG = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}

DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def write_tokenizer(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(src, f)):
            sys.exit(f"{src} holds no {f}: give a CLIP tokenizer folder (vocab.json + merges.txt)")
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)


def write(out: str, tokenizer: str, config: str = "sd15", dtype: str = "f32", device: str = "cpu",
          seed: int = 0) -> dict:
    """Writes the folder `out` (replaced if it exists) and returns what the JSON line prints."""
    start = time.time()
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"))
    torch.manual_seed(seed)
    dt = getattr(torch, DTYPES[dtype])
    with torch.device(device):
        if config == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
            scheduler = DDIMScheduler(**SD15_DDIM)
        else:
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config, subfolder="unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config, subfolder="vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder"))
            scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(config, subfolder="scheduler"))
    drawn = time.time()
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        m.to(dt).save_pretrained(os.path.join(tmp, name), safe_serialization=True)
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return {
        "out": out,
        "config": config,
        "dtype": dtype,
        "device": device,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "bytes": folder_size(out),
        "draw_s": round(drawn - start, 2),
        "total_s": round(time.time() - start, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True, help="folder with vocab.json + merges.txt")
    p.add_argument("--config", default="sd15", help="sd15, or a diffusers folder to copy the configs of")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(write(a.out, a.tokenizer, a.config, a.dtype, a.device, a.seed)))


if __name__ == "__main__":
    main()
