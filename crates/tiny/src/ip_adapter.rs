//! A tiny IP-Adapter for the tiny Stable Diffusion model (`pnd tiny-model`, the demo, the tests):
//! a folder laid out as `h94/IP-Adapter`, `models/image_encoder/` (a small
//! `CLIPVisionModelWithProjection`), `models/ip-adapter_sd15.safetensors` (4 tokens) and
//! `models/ip-adapter-plus_sd15.safetensors` (a depth-4 resampler, 16 tokens, heads of 64 as
//! diffusers infers them), in the original checkpoints' key layout, with weights drawn like the
//! other tiny models (LayerNorm scales around 1).

use crate::{config, io, make_weights, save, write_json, TinyError, TinySpec};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The image encoder's config (`CLIPVisionConfig` fields and `projection_dim`).
pub fn image_encoder_config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_channels": 3, "image_size": 32, "patch_size": 8, "projection_dim": 24,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5
    })
}

/// The width of each cross-attention layer of the tiny UNet in the order adapter files number
/// them (diffusers' `attn_processors`: down blocks, up blocks, mid block).
fn attn2_widths(spec: &TinySpec) -> Vec<usize> {
    let ch = &spec.unet_block_out_channels;
    let n = ch.len();
    let mut w = Vec::new();
    for &c in &ch[..n - 1] {
        w.extend(std::iter::repeat_n(c, spec.unet_layers_per_block));
    }
    for c in ch.iter().rev().skip(1) {
        w.extend(std::iter::repeat_n(*c, spec.unet_layers_per_block + 1));
    }
    w.push(ch[n - 1]);
    w
}

/// LayerNorm scales are drawn around 1 by name (`norm` in it); the resampler's feed-forward
/// LayerNorm (`layers.{i}.1.0.weight`) has no such name, so 1 is added here.
fn ff_norm_scales_around_one(
    mut t: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, TinyError> {
    for (k, v) in t.iter_mut() {
        if k.contains(".1.0.weight") {
            *v = (&*v + 1.0)?;
        }
    }
    Ok(t)
}

fn adapter(
    seed: u64,
    spec: &TinySpec,
    image_proj: impl FnOnce(&candle_nn::VarBuilder) -> candle_core::Result<()>,
) -> Result<BTreeMap<String, Tensor>, TinyError> {
    let cross = spec.text_hidden_size;
    let widths = attn2_widths(spec);
    let t = make_weights(seed, |vb| {
        image_proj(&vb.pp("image_proj"))?;
        for (k, w) in widths.iter().enumerate() {
            let l = vb.pp(format!("ip_adapter.{}", 2 * k + 1));
            l.get((*w, cross), "to_k_ip.weight")?;
            l.get((*w, cross), "to_v_ip.weight")?;
        }
        Ok(())
    })?;
    ff_norm_scales_around_one(t)
}

/// Writes the tiny IP-Adapter folder `dir` for the tiny model of `spec`, from `seed`; returns it.
pub fn write_tiny_ip_adapter(dir: &Path, seed: u64, spec: &TinySpec) -> Result<PathBuf, TinyError> {
    let models = dir.join("models");
    let enc = models.join("image_encoder");
    std::fs::create_dir_all(&enc).map_err(io(&enc))?;
    let enc_json = image_encoder_config_json();
    write_json(&enc.join("config.json"), &enc_json)?;
    let enc_cfg: metrics::clip::ClipVisionWithProjectionConfig = config(&enc_json)?;
    save(
        &enc.join("model.safetensors"),
        make_weights(seed, |vb| {
            metrics::clip::ClipVision::with_projection(&enc_cfg, vb)
        })?,
    )?;
    let cross = spec.text_hidden_size;
    let embed = enc_cfg.projection_dim;
    let plain = adapter(seed.wrapping_add(1), spec, |vb| {
        vb.get((4 * cross, embed), "proj.weight")?;
        vb.get(4 * cross, "proj.bias")?;
        vb.get(cross, "norm.weight")?;
        vb.get(cross, "norm.bias")?;
        Ok(())
    })?;
    save(&models.join("ip-adapter_sd15.safetensors"), plain)?;
    let hidden = enc_cfg.vision.hidden_size;
    let (dim, inner, queries) = (32, 64, 16);
    let plus = adapter(seed.wrapping_add(2), spec, |vb| {
        vb.get((1, queries, dim), "latents")?;
        vb.get((dim, hidden), "proj_in.weight")?;
        vb.get(dim, "proj_in.bias")?;
        vb.get((cross, dim), "proj_out.weight")?;
        vb.get(cross, "proj_out.bias")?;
        vb.get(cross, "norm_out.weight")?;
        vb.get(cross, "norm_out.bias")?;
        for i in 0..4 {
            let l = vb.pp(format!("layers.{i}"));
            for n in ["0.norm1", "0.norm2", "1.0"] {
                l.get(dim, &format!("{n}.weight"))?;
                l.get(dim, &format!("{n}.bias"))?;
            }
            l.get((inner, dim), "0.to_q.weight")?;
            l.get((2 * inner, dim), "0.to_kv.weight")?;
            l.get((dim, inner), "0.to_out.weight")?;
            l.get((4 * dim, dim), "1.1.weight")?;
            l.get((dim, 4 * dim), "1.3.weight")?;
        }
        Ok(())
    })?;
    save(&models.join("ip-adapter-plus_sd15.safetensors"), plus)?;
    Ok(dir.to_path_buf())
}
