//! Deterministic tiny models for tests, CI and `pnd demo` (SPEC §3 "Tiny models").
//!
//! [`write_tiny_model`] writes a complete diffusers-layout folder (`model_index.json`, `unet/`,
//! `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) with SD 1.x's architecture at small
//! widths: a UNet with 4 levels and cross-attention at the first three (like SD 1.5), a VAE with
//! 4 levels (3 down-samplings, ×8 like SD), a 2-layer CLIP text encoder over the real CLIP
//! vocabulary, the real tokenizer files copied from a given folder, and SD's DDIM configuration.
//! [`blip::write_tiny_blip_model`] adds BLIP-Diffusion's parts to that folder, and
//! [`write_tiny_metric_models`] writes the DINO and CLIP models the metrics load, and
//! [`write_tiny_ip_adapter`] an `h94/IP-Adapter`-shaped folder (both adapters, image encoder).
//!
//! Weights are random and deterministic: every tensor is drawn from its own generator seeded by
//! `(seed, tensor name)` (FNV-1a of the name mixed into the seed, `StdRng`, `StandardNormal`), so
//! the same seed always writes the same bytes. Scales: weights N(0, 1/fan_in), norm scales
//! 1 + N(0, 0.1²), biases N(0, 0.05²), token embeddings N(0, 0.5²), position embeddings N(0, 0.1²).
//! The set of tensors and their shapes is exactly what our model constructors ask for, so the
//! folder loads by construction; the names are diffusers'/transformers' checkpoint keys.

pub mod blip;
pub mod ip_adapter;
mod metric_models;

pub use ip_adapter::write_tiny_ip_adapter;
pub use metric_models::write_tiny_metric_models;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use diffusion::text::{ClipTextConfig, ClipTextModel};
use diffusion::tokenizer::ClipTokenizer;
use diffusion::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    #[error("writing tiny model '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tiny model: tokenizer folder '{dir}' has neither tokenizer.json nor vocab.json + merges.txt")]
    NoTokenizer { dir: PathBuf },
    #[error("tiny model: reading '{path}': {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(transparent)]
    Tokenizer(#[from] diffusion::tokenizer::TokenizerError),
    #[error("tiny model: {0}")]
    Model(#[from] candle_core::Error),
    /// A weight file written: the message names it and says "writing".
    #[error("tiny model: {0}")]
    File(#[from] weights::files::FileError),
}

/// Widths of the tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    pub unet_block_out_channels: Vec<usize>,
    /// Legacy `attention_head_dim` (= heads per level, as in SD 1.x configs).
    pub unet_attention_head_dim: usize,
    pub unet_layers_per_block: usize,
    pub vae_block_out_channels: Vec<usize>,
    pub vae_layers_per_block: usize,
    pub norm_num_groups: usize,
    /// Text encoder hidden size = the UNet's cross_attention_dim.
    pub text_hidden_size: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_intermediate_size: usize,
    /// `sample_size` of the UNet config (latent side of the default image size).
    pub sample_size: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            unet_block_out_channels: vec![32, 32, 64, 64],
            unet_attention_head_dim: 4,
            unet_layers_per_block: 2,
            vae_block_out_channels: vec![16, 32, 32, 32],
            vae_layers_per_block: 1,
            norm_num_groups: 8,
            text_hidden_size: 32,
            text_layers: 2,
            text_heads: 4,
            text_intermediate_size: 64,
            sample_size: 16,
        }
    }
}

/// A VarBuilder backend that makes up each requested tensor from `(seed, name)` and records it.
struct SeededBackend {
    seed: u64,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl SeededBackend {
    fn draw(&self, shape: &Shape, name: &str) -> candle_core::Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(name).rotate_left(17));
        let dims = shape.dims();
        let n = shape.elem_count();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let (mean, std) = if name.contains("token_embedding") {
            (0.0, 0.5)
        } else if name.contains("position_embedding") {
            (0.0, 0.1)
        } else if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (0.0, 1.0 / (fan_in as f64).sqrt())
        } else if leaf == "weight" && name.contains("norm") {
            (1.0, 0.1)
        } else {
            (0.0, 0.05)
        };
        let data: Vec<f32> = (0..n)
            .map(|_| (mean + std * rng.sample::<f64, _>(StandardNormal)) as f32)
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu)
    }
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut made = self.made.lock().expect("tiny backend lock");
        if let Some(t) = made.get(name) {
            if t.shape() != &s {
                candle_core::bail!(
                    "tiny model: tensor {name} asked with shapes {:?} and {s:?}",
                    t.shape()
                );
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = self.draw(&s, name)?;
        made.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("tiny model: tensor {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // Always the current diffusers/transformers layout (`to_q`, `text_model.`, linear weights).
        false
    }
}

/// Builds a model with a seeded backend and returns the tensors it asked for (any candle model:
/// the demo uses it for the tiny DINO and CLIP models too).
pub fn make_weights<M>(
    seed: u64,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let made = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = SeededBackend {
        seed,
        made: made.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    build(vb)?;
    let map = made.lock().expect("tiny backend lock").clone();
    Ok(map)
}

/// A model built on [`make_weights`]' deterministic random weights, in memory (e.g. the full-size
/// SD 1.5 UNet of the benchmarks).
pub fn random_model<M>(
    seed: u64,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
) -> candle_core::Result<M> {
    random_model_on(seed, DType::F32, &Device::Cpu, build)
}

/// [`random_model`] in `dtype` on `device` (the same weights, drawn on the CPU in f32).
pub fn random_model_on<M>(
    seed: u64,
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
) -> candle_core::Result<M> {
    let tensors = make_weights(seed, &build)?;
    build(VarBuilder::from_tensors(
        tensors.into_iter().collect(),
        dtype,
        device,
    ))
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TinyError + '_ {
    move |source| TinyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), TinyError> {
    let text = serde_json::to_string_pretty(v).expect("json value");
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// Writes a weight file atomically with a new file's permissions ([`weights::files`]; candle's
/// own writer leaves mode 0600, so a demo folder could not be shared).
pub(crate) fn save(path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<(), TinyError> {
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    Ok(weights::files::save_plain(&map, path)?)
}

/// Parses a config the tiny writer made up into the model's config type.
pub(crate) fn config<T: serde::de::DeserializeOwned>(
    json: &serde_json::Value,
) -> Result<T, TinyError> {
    serde_json::from_value(json.clone())
        .map_err(|e| TinyError::Model(candle_core::Error::Msg(e.to_string())))
}

/// Copies the CLIP tokenizer files of `from` that exist (`vocab.json`, `merges.txt`,
/// `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) into the folder `to`.
pub(crate) fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<(), TinyError> {
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = from.join(f);
        if src.is_file() {
            let dst = to.join(f);
            // Written as a new file (not `fs::copy`, which keeps the input's mode): a read-only
            // input's copy stays writable, so the folder can be rebuilt in place, and gets the
            // umask's permissions like every other file here.
            let bytes = std::fs::read(&src).map_err(|e| TinyError::Read {
                path: src.clone(),
                reason: e.to_string(),
            })?;
            weights::files::write_atomic(&dst, &bytes)?;
        }
    }
    Ok(())
}

/// The tiny UNet's `config.json`.
pub fn unet_config_json(spec: &TinySpec) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": spec.sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": spec.unet_block_out_channels,
        "layers_per_block": spec.unet_layers_per_block,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": spec.norm_num_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": spec.text_hidden_size,
        "attention_head_dim": spec.unet_attention_head_dim,
        "use_linear_projection": false,
        "upcast_attention": false
    })
}

/// The tiny VAE's `config.json`.
pub fn vae_config_json(spec: &TinySpec) -> serde_json::Value {
    let n = spec.vae_block_out_channels.len();
    serde_json::json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": spec.vae_block_out_channels,
        "layers_per_block": spec.vae_layers_per_block,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": spec.norm_num_groups,
        "sample_size": spec.sample_size * 8,
        "scaling_factor": 0.18215,
        "use_quant_conv": true,
        "use_post_quant_conv": true,
        "mid_block_add_attention": true
    })
}

/// The tiny text encoder's `config.json` for a vocabulary of `vocab_size`.
pub fn text_config_json(spec: &TinySpec, vocab_size: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": spec.text_hidden_size,
        "intermediate_size": spec.text_intermediate_size,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": spec.text_hidden_size,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "torch_dtype": "float32"
    })
}

/// Writes a tiny SD model in diffusers layout to `out` (created; existing files are replaced),
/// with the tokenizer files of `tokenizer_dir` (`vocab.json`, `merges.txt`, `tokenizer.json`,
/// `tokenizer_config.json`, `special_tokens_map.json`, whichever exist).
pub fn write_tiny_model(
    out: &Path,
    seed: u64,
    tokenizer_dir: &Path,
    spec: &TinySpec,
) -> Result<(), TinyError> {
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        let d = out.join(sub);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    // Tokenizer first: the text encoder's vocabulary is the tokenizer's.
    let has_json = tokenizer_dir.join("tokenizer.json").is_file();
    let has_bpe =
        tokenizer_dir.join("vocab.json").is_file() && tokenizer_dir.join("merges.txt").is_file();
    if !has_json && !has_bpe {
        return Err(TinyError::NoTokenizer {
            dir: tokenizer_dir.into(),
        });
    }
    copy_tokenizer_files(tokenizer_dir, &out.join("tokenizer"))?;
    let vocab_size = ClipTokenizer::from_folder(&out.join("tokenizer"))?.vocab_size();

    let unet_json = unet_config_json(spec);
    let unet_cfg: UNet2DConditionConfig = config(&unet_json)?;
    let unet = make_weights(seed, |vb| UNet2DConditionModel::new(&unet_cfg, vb))?;
    write_json(&out.join("unet/config.json"), &unet_json)?;
    save(&out.join("unet/diffusion_pytorch_model.safetensors"), unet)?;

    let vae_json = vae_config_json(spec);
    let vae_cfg: AutoencoderKLConfig = config(&vae_json)?;
    let vae = make_weights(seed.wrapping_add(1), |vb| AutoencoderKL::new(&vae_cfg, vb))?;
    write_json(&out.join("vae/config.json"), &vae_json)?;
    save(&out.join("vae/diffusion_pytorch_model.safetensors"), vae)?;

    let text_json = text_config_json(spec, vocab_size);
    let text_cfg: ClipTextConfig = config(&text_json)?;
    let text = make_weights(seed.wrapping_add(2), |vb| ClipTextModel::new(&text_cfg, vb))?;
    write_json(&out.join("text_encoder/config.json"), &text_json)?;
    save(&out.join("text_encoder/model.safetensors"), text)?;

    let c = diffusion::ddim::DdimConfig::stable_diffusion();
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &serde_json::json!({
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": c.num_train_timesteps,
            "beta_start": c.beta_start,
            "beta_end": c.beta_end,
            "beta_schedule": c.beta_schedule,
            "clip_sample": c.clip_sample,
            "set_alpha_to_one": c.set_alpha_to_one,
            "steps_offset": c.steps_offset,
            "prediction_type": c.prediction_type,
            "timestep_spacing": c.timestep_spacing,
            "trained_betas": null
        }),
    )?;
    write_json(
        &out.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_pnd_tiny_seed": seed,
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    Ok(())
}

/// Writes a tiny Textual Inversion file `{token: [text_hidden_size]}` drawn from `seed`.
pub fn write_tiny_embedding(
    path: &Path,
    token: &str,
    seed: u64,
    spec: &TinySpec,
) -> Result<(), TinyError> {
    let backend = SeededBackend {
        seed,
        made: Arc::default(),
    };
    let v = backend.draw(&Shape::from(spec.text_hidden_size), "token_embedding")?;
    let map = std::collections::HashMap::from([(token.to_string(), v)]);
    Ok(weights::files::save_plain(&map, path)?)
}
