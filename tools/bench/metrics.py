"""PyTorch + transformers side of crates/metrics/examples/bench_embed.rs: images/s of DINO ViT-S/16
(ViTModel, CLS of last_hidden_state) and CLIP ViT-B/32 image embeddings (vision tower + projection)
at real size with random weights.

Usage: python tools/bench/metrics.py BATCH ITERS THREADS  (the Rust example calls it).
Prints `torch_dino <images/s>` and `torch_clip <images/s>`.
"""

import sys
import time

import torch
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel


def bench(f, batch: int, iters: int) -> float:
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        f(x)
        t = time.perf_counter()
        for _ in range(iters):
            f(x)
        return batch * iters / (time.perf_counter() - t)


def main() -> None:
    batch, iters, threads = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dino = ViTModel(
        ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                  intermediate_size=1536, image_size=224, patch_size=16),
        add_pooling_layer=True,
    ).eval()
    clip = CLIPModel(CLIPConfig()).eval()  # defaults = openai/clip-vit-base-patch32

    d = bench(lambda x: dino(pixel_values=x).last_hidden_state[:, 0], batch, iters)
    c = bench(lambda x: clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output),
              batch, iters)
    print(f"torch_dino {d:.2f} images/s (threads {torch.get_num_threads()}, "
          f"attn {dino.config._attn_implementation})")
    print(f"torch_clip {c:.2f} images/s")


if __name__ == "__main__":
    main()
