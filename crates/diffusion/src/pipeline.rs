//! The Stable Diffusion pipeline (SPEC §6): loading a diffusers folder or hub id, prompt encoding,
//! seeded or given initial latents, classifier-free-guided DDIM sampling, VAE decoding.
//!
//! Sampling follows diffusers 0.42.1 `pipelines/stable_diffusion/pipeline_stable_diffusion.py`
//! (`StableDiffusionPipeline.__call__`): embeddings batched as `[negative, prompt]`, one UNet call
//! on the doubled latents, `ε = ε_uncond + s (ε_cond − ε_uncond)` (no guidance when s ≤ 1), then
//! `DDIMScheduler.step`. The step-level API ([`StableDiffusion::cfg_step`]) is what guided
//! samplers build on.
//!
//! Batches: every sampling function takes latents `[N, 4, h, w]` of N images that share the
//! prompt and the settings, with one UNet call per step on `[N uncond, N cond]` (diffusers' order
//! with `num_images_per_prompt = N`). The images do not interact (every UNet layer acts per batch
//! entry), so each image of a batch is the image of a batch-1 run from its own initial latents,
//! up to float reassociation; seeded noise of a batch is each seed's own noise
//! ([`StableDiffusion::seeded_latents`]).
//!
//! Personalized models (SPEC §3, §8):
//! - DreamBooth: a diffusers folder per subject. Components it lacks (commonly `text_encoder/`,
//!   `tokenizer/`, `vae/`, `scheduler/` when only the UNet was fine-tuned and saved) are taken from
//!   [`LoadOptions::base`]; without a base, a missing component is an error naming what was
//!   looked for.
//! - Textual Inversion: the base model plus a learned-embedding file ([`LoadOptions::embeddings`]).

use crate::ddim::{Ddim, DdimConfig, DdimError};
use crate::hooks::{Hook, NoHook};
use crate::text::{ClipTextConfig, ClipTextModel};
use crate::textual_inversion::{read_learned_embedding, LearnedToken, TextualInversionError};
use crate::tokenizer::{ClipTokenizer, TokenizerError};
use crate::unet::{UNet2DConditionModel, UNetError};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use weights::{ModelSource, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Files(#[from] WeightsError),
    #[error(transparent)]
    Unet(Box<UNetError>),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Scheduler(#[from] DdimError),
    #[error(transparent)]
    TextualInversion(#[from] TextualInversionError),
    #[error("{component} weights '{path}' do not match the config '{config}': {source}")]
    ConfigMismatch {
        component: &'static str,
        path: String,
        config: PathBuf,
        source: Box<candle_core::Error>,
    },
    #[error("model '{model}': the UNet's cross_attention_dim {unet} differs from the text encoder's hidden_size {text} (text encoder from '{text_from}')")]
    Incompatible {
        model: String,
        unet: String,
        text: usize,
        text_from: String,
    },
    #[error(
        "initial latents '{path}': expected tensor 'latents' of shape {expected:?}, got {actual}"
    )]
    LatentsShape {
        path: PathBuf,
        expected: Vec<usize>,
        actual: String,
    },
    #[error("image size {height}×{width} is not a positive multiple of {factor}")]
    Size {
        height: usize,
        width: usize,
        factor: usize,
    },
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

// candle's and the UNet's errors are large; boxing keeps every `Result` of this module small.
impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

impl From<UNetError> for PipelineError {
    fn from(e: UNetError) -> Self {
        Self::Unet(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, PipelineError>;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where components the model lacks come from (DreamBooth folders with only a UNet).
    pub base: Option<String>,
    /// A Textual Inversion file to add to the tokenizer and text encoder.
    pub embeddings: Option<PathBuf>,
    /// The token to bind the Textual Inversion vector to (the one the prompts use), as diffusers'
    /// `load_textual_inversion(path, token=…)`; `None` keeps the file's own key.
    pub embedding_token: Option<String>,
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            base: None,
            embeddings: None,
            embedding_token: None,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// Where each component was read from (for logs and run records).
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub unet: String,
    pub vae: String,
    pub text_encoder: String,
    pub tokenizer: String,
    pub scheduler: String,
    /// The loaded Textual Inversion vector: its token, id, file and the file's own key.
    pub learned_token: Option<LearnedToken>,
}

/// A loaded Stable Diffusion model (a clone shares the weights).
#[derive(Clone)]
pub struct StableDiffusion {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    pub scheduler: DdimConfig,
    pub provenance: Provenance,
    device: Device,
    dtype: DType,
}

/// Embeddings for classifier-free guidance.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// `[1, tokens, dim]` of the negative prompt.
    pub uncond: Tensor,
    /// `[1, tokens, dim]` of the prompt.
    pub cond: Tensor,
}

impl PromptEmbeddings {
    /// `[negative, prompt]` batched as diffusers does: `[2, tokens, dim]`.
    pub fn batched(&self) -> candle_core::Result<Tensor> {
        self.cfg_batch(1)
    }

    /// The embeddings of a CFG call on `n` images: `[negative × n, prompt × n]`, `[2n, tokens, dim]`.
    pub fn cfg_batch(&self, n: usize) -> candle_core::Result<Tensor> {
        Tensor::cat(
            &[repeat_batch(&self.uncond, n)?, repeat_batch(&self.cond, n)?],
            0,
        )
    }

    /// The prompt's embedding for `n` images: `[n, tokens, dim]`.
    pub fn cond_batch(&self, n: usize) -> candle_core::Result<Tensor> {
        repeat_batch(&self.cond, n)
    }
}

/// `t` (`[1, ...]`) repeated `n` times along the batch dimension.
pub fn repeat_batch(t: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(t.clone());
    }
    let mut dims = t.dims().to_vec();
    dims[0] = n;
    t.broadcast_as(dims)?.contiguous()
}

/// One classifier-free-guided DDIM step.
#[derive(Debug, Clone)]
pub struct CfgStepOutput {
    /// Latents after the step, `[N, 4, h, w]`.
    pub latents: Tensor,
    /// The guided noise prediction, `[N, 4, h, w]`.
    pub noise_pred: Tensor,
    /// The predicted x̂_0, `[N, 4, h, w]`.
    pub pred_original: Tensor,
}

/// What to sample.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub height: usize,
    pub width: usize,
    pub seed: u64,
    /// `[N, 4, height/8, width/8]`; replaces the seeded noise (N images of the prompt at once).
    pub init_latents: Option<Tensor>,
}

impl Default for SampleRequest {
    /// SPEC §6 defaults: 50 steps, guidance 7.5, 512×512, empty negative prompt, seed 0.
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 50,
            cfg_scale: 7.5,
            height: 512,
            width: 512,
            seed: 0,
            init_latents: None,
        }
    }
}

fn has(src: &ModelSource, file: &str) -> bool {
    src.file(&[file]).is_ok()
}

fn join_paths(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn source_name(src: &ModelSource) -> String {
    match src {
        ModelSource::Local(p) => p.display().to_string(),
        ModelSource::Hub { repo } => repo.clone(),
    }
}

/// Loads the text encoder of `src` (`text_encoder/config.json` + `model.safetensors`, or
/// `pytorch_model.bin`).
pub fn load_text_encoder(
    src: &ModelSource,
    dtype: DType,
    device: &Device,
) -> Result<ClipTextModel> {
    let config = src.file(&["text_encoder/config.json"])?;
    let cfg: ClipTextConfig = weights::read_json(&config)?;
    let files = src.weight_files("text_encoder", &["model", "pytorch_model"])?;
    let vb = weights::var_builder(&files, dtype, device)?;
    ClipTextModel::new(&cfg, vb).map_err(|source| PipelineError::ConfigMismatch {
        component: "text encoder",
        path: join_paths(&files),
        config,
        source: Box::new(source),
    })
}

/// Loads the VAE of `src` (`vae/config.json` + `diffusion_pytorch_model.safetensors` or `.bin`).
pub fn load_vae(src: &ModelSource, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
    let config = src.file(&["vae/config.json"])?;
    let cfg: AutoencoderKLConfig = weights::read_json(&config)?;
    let files = src.weight_files("vae", &["diffusion_pytorch_model"])?;
    let vb = weights::var_builder(&files, dtype, device)?;
    AutoencoderKL::new(&cfg, vb).map_err(|source| PipelineError::ConfigMismatch {
        component: "VAE",
        path: join_paths(&files),
        config,
        source: Box::new(source),
    })
}

impl StableDiffusion {
    /// Loads `model` (a diffusers folder or hub id); components it lacks come from `opts.base`.
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let main = ModelSource::parse(model)?;
        let base = opts.base.as_deref().map(ModelSource::parse).transpose()?;
        // The model's own component if it has one, else the base's; with neither, the model's
        // own "missing file" error.
        let pick = |marker: &str| -> Result<&ModelSource> {
            if has(&main, marker) {
                return Ok(&main);
            }
            match &base {
                Some(b) if has(b, marker) => Ok(b),
                _ => Err(main.file(&[marker]).unwrap_err().into()),
            }
        };
        let (dtype, device) = (opts.dtype, &opts.device);
        let unet_src = pick("unet/config.json")?;
        let unet = UNet2DConditionModel::load(unet_src, "unet", dtype, device)?;
        let vae_src = pick("vae/config.json")?;
        let vae = load_vae(vae_src, dtype, device)?;
        let text_src = pick("text_encoder/config.json")?;
        let mut text_encoder = load_text_encoder(text_src, dtype, device)?;
        let tok_src = if ["tokenizer/tokenizer.json", "tokenizer/vocab.json"]
            .iter()
            .any(|f| has(&main, f))
        {
            &main
        } else {
            pick("tokenizer/vocab.json").or_else(|_| pick("tokenizer/tokenizer.json"))?
        };
        let mut tokenizer = ClipTokenizer::from_source(tok_src, "tokenizer")?;
        let sched_src = pick("scheduler/scheduler_config.json")?;
        let scheduler: DdimConfig =
            weights::read_json(&sched_src.file(&["scheduler/scheduler_config.json"])?)?;
        Ddim::new(&scheduler, 1)?; // reject unsupported scheduler settings at load time

        let cross = unet.config().cross_attention_dim.clone();
        let text_dim = text_encoder.hidden_size();
        let matches = match &cross {
            crate::unet::PerBlock::One(c) => *c == text_dim,
            crate::unet::PerBlock::Each(v) => v.iter().all(|c| *c == text_dim),
        };
        if !matches {
            return Err(PipelineError::Incompatible {
                model: model.into(),
                unet: format!("{cross:?}"),
                text: text_dim,
                text_from: source_name(text_src),
            });
        }
        let mut provenance = Provenance {
            unet: source_name(unet_src),
            vae: source_name(vae_src),
            text_encoder: source_name(text_src),
            tokenizer: source_name(tok_src),
            scheduler: source_name(sched_src),
            learned_token: None,
        };
        if let Some(path) = &opts.embeddings {
            provenance.learned_token = Some(add_learned_embedding(
                &mut tokenizer,
                &mut text_encoder,
                path,
                opts.embedding_token.as_deref(),
            )?);
        }
        Ok(Self {
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler,
            provenance,
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same model (weights shared) with no IP-Adapter attached to its UNet: vanilla Stable
    /// Diffusion, e.g. for Pick-and-Draw's layout template.
    pub fn without_ip_adapter(&self) -> Self {
        let mut sd = self.clone();
        sd.unet.set_ip_adapter(None);
        sd
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The image side a generation defaults to, as diffusers' `StableDiffusionPipeline.__call__`
    /// computes it: `unet.config.sample_size × vae_scale_factor` (512 for SD 1.x, 768 for SD 2.x
    /// 768-v, 64 for the built-in tiny model); 512 when the UNet config has no `sample_size`.
    pub fn default_size(&self) -> usize {
        match self.unet.config().sample_size {
            Some(s) => s * self.vae.config().downsample_factor(),
            None => 512,
        }
    }

    /// Adds a Textual Inversion embedding under `token` (the file's own key when `None`), as
    /// diffusers' `load_textual_inversion(path, token=…)`; returns what was bound, also kept in
    /// [`Provenance::learned_token`].
    pub fn load_textual_inversion(
        &mut self,
        path: &Path,
        token: Option<&str>,
    ) -> Result<LearnedToken> {
        let r = add_learned_embedding(&mut self.tokenizer, &mut self.text_encoder, path, token)?;
        self.provenance.learned_token = Some(r.clone());
        Ok(r)
    }

    /// The DDIM schedule of this model with `steps` steps.
    pub fn ddim(&self, steps: usize) -> Result<Ddim> {
        Ok(Ddim::new(&self.scheduler, steps)?)
    }

    /// Text-encoder output for one prompt.
    ///
    /// # Shapes
    /// Output `[1, 77, hidden]`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?.ids;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// Embeddings of a prompt and its negative prompt.
    pub fn encode_prompts(&self, prompt: &str, negative_prompt: &str) -> Result<PromptEmbeddings> {
        Ok(PromptEmbeddings {
            uncond: self.encode_prompt(negative_prompt)?,
            cond: self.encode_prompt(prompt)?,
        })
    }

    /// Latent shape `[1, 4, height/8, width/8]` of an image size.
    pub fn latent_shape(&self, height: usize, width: usize) -> Result<Vec<usize>> {
        let f = self.vae.config().downsample_factor();
        if height == 0 || width == 0 || height % f != 0 || width % f != 0 {
            return Err(PipelineError::Size {
                height,
                width,
                factor: f,
            });
        }
        Ok(vec![
            1,
            self.unet.config().in_channels,
            height / f,
            width / f,
        ])
    }

    /// Seeded initial latents (see [`crate::noise`]); DDIM's initial noise sigma is 1.
    ///
    /// # Shapes
    /// Output `[1, 4, height/8, width/8]`.
    pub fn initial_latents(&self, height: usize, width: usize, seed: u64) -> Result<Tensor> {
        self.seeded_latents(height, width, &[seed])
    }

    /// The initial latents of a batch: each seed's own [`Self::initial_latents`], concatenated,
    /// so an image of the batch starts from the noise of its seed alone.
    ///
    /// # Shapes
    /// Output `[seeds.len(), 4, height/8, width/8]`.
    pub fn seeded_latents(&self, height: usize, width: usize, seeds: &[u64]) -> Result<Tensor> {
        let shape = self.latent_shape(height, width)?;
        let each = seeds
            .iter()
            .map(|&s| crate::noise::seeded_normal(s, &shape, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if each.is_empty() {
            return Err(candle_core::Error::Msg("no seeds for the initial latents".into()).into());
        }
        Ok(Tensor::cat(&each, 0)?.to_dtype(self.dtype)?)
    }

    /// Reads `--init-latents`: safetensors with tensor `latents` of shape
    /// `[batch, 4, height/8, width/8]`.
    pub fn read_init_latents(
        &self,
        path: &Path,
        height: usize,
        width: usize,
        batch: usize,
    ) -> Result<Tensor> {
        let mut expected = self.latent_shape(height, width)?;
        expected[0] = batch;
        let tensors = weights::load_tensors(&[path.to_path_buf()], &self.device)?;
        let t = tensors.get("latents").ok_or_else(|| {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            PipelineError::LatentsShape {
                path: path.into(),
                expected: expected.clone(),
                actual: format!("no tensor 'latents' (tensors: {names:?})"),
            }
        })?;
        if t.dims() != expected.as_slice() {
            return Err(PipelineError::LatentsShape {
                path: path.into(),
                expected,
                actual: format!("{:?}", t.dims()),
            });
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    /// The guided noise prediction at `timestep` (diffusers' CFG: one UNet call on
    /// `[latents, latents]` with `[uncond × N, cond × N]`; the plain conditional prediction when
    /// `cfg_scale ≤ 1`). `hook` sees the batched call's tensors: entries `0..N` are the
    /// unconditional branch of images `0..N`, entries `N..2N` their conditional branch (with
    /// `cfg_scale ≤ 1`, entries `0..N` are the conditional branch).
    ///
    /// # Shapes
    /// `latents`: `[N, 4, h, w]`; output `[N, 4, h, w]`.
    pub fn guided_noise(
        &self,
        latents: &Tensor,
        timestep: usize,
        emb: &PromptEmbeddings,
        cfg_scale: f64,
        hook: &mut dyn Hook,
    ) -> Result<Tensor> {
        let t = timestep as f64;
        let n = latents.dim(0)?;
        if cfg_scale <= 1.0 {
            return Ok(self
                .unet
                .forward_with(latents, t, &emb.cond_batch(n)?, hook)?);
        }
        let input = Tensor::cat(&[latents, latents], 0)?;
        let pred = self
            .unet
            .forward_with(&input, t, &emb.cfg_batch(n)?, hook)?;
        let uncond = pred.narrow(0, 0, n)?;
        let cond = pred.narrow(0, n, n)?;
        Ok((&uncond + ((cond - &uncond)? * cfg_scale)?)?)
    }

    /// One CFG denoising step at step index `step` of `ddim`.
    ///
    /// # Shapes
    /// `latents`: `[N, 4, h, w]`; outputs the same.
    pub fn cfg_step(
        &self,
        ddim: &Ddim,
        latents: &Tensor,
        step: usize,
        emb: &PromptEmbeddings,
        cfg_scale: f64,
        hook: &mut dyn Hook,
    ) -> Result<CfgStepOutput> {
        let t = *ddim.timesteps().get(step).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "step index {step} out of range 0..{}",
                ddim.timesteps().len()
            ))
        })?;
        let noise_pred = self.guided_noise(latents, t, emb, cfg_scale, hook)?;
        let out = ddim.step(&noise_pred, t, latents)?;
        Ok(CfgStepOutput {
            latents: out.prev_sample,
            noise_pred,
            pred_original: out.pred_original_sample,
        })
    }

    /// Full CFG sampling; returns the final latents (before decoding), `[N, 4, h/8, w/8]` for
    /// `init_latents` of N images (1 from `seed` without them). `on_step(i, n)` is called after
    /// each step.
    pub fn sample(
        &self,
        req: &SampleRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let emb = self.encode_prompts(&req.prompt, &req.negative_prompt)?;
        self.sample_embeddings(&emb, req, on_step)
    }

    /// [`Self::sample`] with the embeddings given (`req.prompt` and `req.negative_prompt` are not
    /// read): text embeddings with an IP-Adapter's image tokens appended, for instance.
    pub fn sample_embeddings(
        &self,
        emb: &PromptEmbeddings,
        req: &SampleRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let mut latents = match &req.init_latents {
            Some(l) => {
                let mut expected = self.latent_shape(req.height, req.width)?;
                expected[0] = l.dim(0).unwrap_or(0).max(1);
                if l.dims() != expected.as_slice() {
                    return Err(PipelineError::LatentsShape {
                        path: PathBuf::from("<init_latents>"),
                        expected,
                        actual: format!("{:?}", l.dims()),
                    });
                }
                l.to_dtype(self.dtype)?
            }
            None => self.initial_latents(req.height, req.width, req.seed)?,
        };
        let ddim = self.ddim(req.steps)?;
        let n = ddim.timesteps().len();
        for i in 0..n {
            latents = self
                .cfg_step(&ddim, &latents, i, emb, req.cfg_scale, &mut NoHook)?
                .latents;
            on_step(i + 1, n);
        }
        Ok(latents)
    }

    /// Decodes scaled latents to a float image in about [-1, 1].
    ///
    /// # Shapes
    /// `latents`: `[b, 4, h, w]`; output `[b, 3, 8h, 8w]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode_latents(latents)?)
    }

    /// Decodes scaled latents to 8-bit RGB images (diffusers' postprocess), one per batch entry.
    pub fn decode_images(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        Ok(crate::vae::tensor_to_images(&self.decode(latents)?)?)
    }
}

fn add_learned_embedding(
    tokenizer: &mut ClipTokenizer,
    text_encoder: &mut ClipTextModel,
    path: &Path,
    token: Option<&str>,
) -> Result<LearnedToken> {
    let learned = read_learned_embedding(path, text_encoder.hidden_size())?;
    let token = token.unwrap_or(&learned.key).to_string();
    let id = tokenizer.add_token(&token)?;
    let row = text_encoder.push_token_embedding(&learned.vector)?;
    if row != id {
        return Err(TextualInversionError::RowMismatch {
            path: path.into(),
            token,
            id,
            row,
        }
        .into());
    }
    Ok(LearnedToken {
        token,
        id,
        file: path.to_path_buf(),
        file_key: learned.key,
    })
}

/// Writes latents as safetensors with the single tensor `latents` (the `--save-latents` format,
/// readable by [`StableDiffusion::read_init_latents`] and by `safetensors.torch.load_file`).
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let t = latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let map = std::collections::HashMap::from([("latents".to_string(), t)]);
    weights::save_safetensors(&map, path)?;
    Ok(())
}

/// Reads the tensor `latents` of a safetensors file (any shape), as f32 on the CPU.
pub fn read_latents(path: &Path) -> Result<Tensor> {
    let tensors = weights::load_tensors(&[path.to_path_buf()], &Device::Cpu)?;
    let t = tensors
        .get("latents")
        .ok_or_else(|| PipelineError::LatentsShape {
            path: path.into(),
            expected: vec![],
            actual: "no tensor 'latents'".into(),
        })?;
    Ok(t.to_dtype(DType::F32)?)
}
