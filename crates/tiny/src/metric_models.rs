//! Tiny DINO (ViT, transformers' `ViTModel` layout) and CLIP (`CLIPModel` layout) folders for the
//! metrics, drawn like the diffusion models (`pnd demo`, the runner's tests).

use crate::{config, copy_tokenizer_files, io, make_weights, save, TinyError};
use std::path::{Path, PathBuf};

/// Writes `config.json` as `serde_json::to_string_pretty` makes it (no trailing newline).
fn write_config(path: &Path, v: &serde_json::Value) -> Result<(), TinyError> {
    let text = serde_json::to_string_pretty(v).expect("json value");
    std::fs::write(path, text).map_err(io(path))
}

/// Writes `dir/dino` and `dir/clip` (with the tokenizer files of `tokenizer`, whose `vocab.json`
/// sets the CLIP text vocabulary) from `seed`, and returns the two folders.
pub fn write_tiny_metric_models(
    dir: &Path,
    tokenizer: &Path,
    seed: u64,
) -> Result<(PathBuf, PathBuf), TinyError> {
    let dino = dir.join("dino");
    let clip = dir.join("clip");
    std::fs::create_dir_all(&dino).map_err(io(&dino))?;
    std::fs::create_dir_all(&clip).map_err(io(&clip))?;
    let vit_json = serde_json::json!({
        "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": true
    });
    write_config(&dino.join("config.json"), &vit_json)?;
    let vit_cfg: metrics::vit::VitConfig = config(&vit_json)?;
    save(
        &dino.join("model.safetensors"),
        make_weights(seed, |vb| metrics::vit::Vit::new(&vit_cfg, vb))?,
    )?;

    let vocab_path = tokenizer.join("vocab.json");
    let vocab_text = std::fs::read_to_string(&vocab_path).map_err(|e| TinyError::Read {
        path: vocab_path.clone(),
        reason: e.to_string(),
    })?;
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&vocab_text)
        .map_err(|e| TinyError::Read {
            path: vocab_path.clone(),
            reason: e.to_string(),
        })?;
    let clip_json = serde_json::json!({
        "model_type": "clip", "projection_dim": 16,
        "text_config": {"vocab_size": vocab.len(), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "eos_token_id": 49407},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    });
    write_config(&clip.join("config.json"), &clip_json)?;
    let clip_cfg: metrics::clip::ClipConfig = config(&clip_json)?;
    let tensors = make_weights(seed.wrapping_add(1), |vb| {
        metrics::clip::ClipVision::new(&clip_cfg, vb.clone())?;
        metrics::clip::ClipText::new(&clip_cfg, vb)
    })?;
    save(&clip.join("model.safetensors"), tensors)?;
    copy_tokenizer_files(tokenizer, &clip)?;
    Ok((dino, clip))
}
