//! A tiny BLIP-Diffusion model for tests, CI and `pnd demo` (SPEC §3 "Tiny models"), in the
//! diffusers `BlipDiffusionPipeline` layout: the tiny Stable Diffusion folder of
//! [`crate::write_tiny_model`] (UNet, VAE, CLIP text encoder, whose checkpoint keys are also
//! `ContextCLIPTextModel`'s, real CLIP tokenizer, DDIM config), plus `qformer/` (a small BLIP-2
//! vision encoder and Q-Former, weights drawn the same deterministic way), the Q-Former's BERT
//! tokenizer folder `qformer/tokenizer/` (a small WordPiece vocabulary with the DreamBench class
//! words, since BERT's own is not bundled; `qformer/config.json` names it), `image_processor/`,
//! and a `model_index.json` with `ctx_begin_pos` and OpenAI CLIP's mean/std.

use crate::{config, io, make_weights, save, write_json, write_tiny_model, TinyError, TinySpec};
use diffusion::blip::image::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
use diffusion::blip::qformer::{Blip2Config, Blip2QFormerModel};
use std::path::Path;

/// Widths of the tiny BLIP parts (the SD parts come from [`TinySpec`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TinyBlipSpec {
    pub sd: TinySpec,
    pub vision_hidden_size: usize,
    pub vision_layers: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub qformer_layers: usize,
    pub num_query_tokens: usize,
}

impl Default for TinyBlipSpec {
    fn default() -> Self {
        Self {
            sd: TinySpec::default(),
            vision_hidden_size: 24,
            vision_layers: 2,
            image_size: 32,
            patch_size: 8,
            qformer_layers: 2,
            num_query_tokens: 4,
        }
    }
}

/// The tiny Q-Former's WordPiece vocabulary: BERT's special tokens, the DreamBench class words,
/// and single letters (plain and `##`) so that any lower-case word tokenizes.
pub fn tiny_wordpiece_vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(".,!?'-".chars().map(|c| c.to_string()));
    let words = "a the of and backpack boot bowl can candle cartoon cat clock dog glasses \
                 sneaker stuffed animal teapot toy vase sunglasses plushie";
    v.extend(words.split_whitespace().map(str::to_string));
    v.extend(('a'..='z').filter(|&c| c != 'a').map(|c| c.to_string()));
    v.extend(('a'..='z').map(|c| format!("##{c}")));
    v
}

/// The tiny Q-Former's `config.json` (transformers' `Blip2Config` field names).
pub fn qformer_config_json(spec: &TinyBlipSpec, vocab_size: usize) -> serde_json::Value {
    let h = spec.sd.text_hidden_size;
    let v = spec.vision_hidden_size;
    serde_json::json!({
        "architectures": ["Blip2QFormerModel"],
        "model_type": "blip-2",
        "num_query_tokens": spec.num_query_tokens,
        "tokenizer": "qformer/tokenizer",
        "vision_config": {
            "model_type": "blip_2_vision_model",
            "hidden_size": v,
            "intermediate_size": 2 * v,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": 4,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "qkv_bias": true
        },
        "qformer_config": {
            "model_type": "blip_2_qformer",
            "vocab_size": vocab_size,
            "hidden_size": h,
            "num_hidden_layers": spec.qformer_layers,
            "num_attention_heads": 4,
            "intermediate_size": 2 * h,
            "max_position_embeddings": 32,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "cross_attention_frequency": 1,
            "encoder_hidden_size": v,
            "position_embedding_type": "absolute",
            "pad_token_id": 0
        }
    })
}

/// Writes the tiny BLIP-Diffusion model to `out` (created; existing files are replaced). The same
/// seed writes the same bytes.
pub fn write_tiny_blip_model(
    out: &Path,
    seed: u64,
    tokenizer_dir: &Path,
    spec: &TinyBlipSpec,
) -> Result<(), TinyError> {
    write_tiny_model(out, seed, tokenizer_dir, &spec.sd)?;

    let tok_dir = out.join("qformer/tokenizer");
    std::fs::create_dir_all(&tok_dir).map_err(io(&tok_dir))?;
    let vocab = tiny_wordpiece_vocab();
    let vocab_path = tok_dir.join("vocab.txt");
    std::fs::write(&vocab_path, vocab.join("\n") + "\n").map_err(io(&vocab_path))?;
    write_json(
        &tok_dir.join("tokenizer_config.json"),
        &serde_json::json!({"do_lower_case": true, "tokenizer_class": "BertTokenizer"}),
    )?;

    let q_json = qformer_config_json(spec, vocab.len());
    let q_cfg: Blip2Config = config(&q_json)?;
    let weights = make_weights(seed.wrapping_add(3), |vb| {
        Blip2QFormerModel::new(&q_cfg, vb)
    })?;
    write_json(&out.join("qformer/config.json"), &q_json)?;
    save(&out.join("qformer/model.safetensors"), weights)?;

    let proc_dir = out.join("image_processor");
    std::fs::create_dir_all(&proc_dir).map_err(io(&proc_dir))?;
    write_json(
        &proc_dir.join("preprocessor_config.json"),
        &serde_json::json!({
            "image_processor_type": "BlipImageProcessor",
            "do_resize": true,
            "size": {"height": spec.image_size, "width": spec.image_size},
            "resample": 3,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
            "do_convert_rgb": true,
            "do_center_crop": true
        }),
    )?;
    write_json(
        &out.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "BlipDiffusionPipeline",
            "_pnd_tiny_seed": seed,
            "ctx_begin_pos": 2,
            "mean": OPENAI_CLIP_MEAN,
            "std": OPENAI_CLIP_STD,
            "image_processor": ["blip_diffusion", "BlipImageProcessor"],
            "qformer": ["blip_diffusion", "Blip2QFormerModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    Ok(())
}
