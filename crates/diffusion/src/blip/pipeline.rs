//! Loading a BLIP-Diffusion folder and generating with it: the reference pipeline's conditioning
//! (diffusers 0.32.2 `pipelines/blip_diffusion/pipeline_blip_diffusion.py`:
//! `BlipDiffusionPipeline._build_prompt`, `get_query_embeddings`, `encode_prompt` and the
//! unconditional branch of `__call__`) and its sampling loop, with DDIM in SD's configuration like
//! the other baselines instead of the folder's PNDM scheduler.

use super::ctx_clip::ContextClipTextModel;
use super::image::{BlipImageProcessor, BlipImageProcessorConfig};
use super::qformer::{tokenizer_source, BertTokenizer, Blip2Config, Blip2QFormerModel};
use super::BlipError;
use crate::ddim::{Ddim, DdimConfig};
use crate::text::ClipTextConfig;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use weights::ModelSource;

fn d_ctx() -> usize {
    2
}

/// The pipeline's own settings in `model_index.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BlipDiffusionConfig {
    /// Where the query embeddings go in the prompt (after BOS and the first prompt token).
    #[serde(default = "d_ctx")]
    pub ctx_begin_pos: usize,
    /// Normalization the pipeline passes to its image processor (`None`: the processor's own).
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    #[serde(default)]
    pub std: Option<Vec<f32>>,
}

/// How the reference pipeline builds and repeats the prompt (`_build_prompt`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptSettings {
    pub prompt_strength: f64,
    pub prompt_reps: usize,
}

impl Default for PromptSettings {
    /// The pipeline's defaults: strength 1.0, 20 repetitions.
    fn default() -> Self {
        Self {
            prompt_strength: 1.0,
            prompt_reps: 20,
        }
    }
}

/// Everything the denoising loop needs from the reference image and the prompt.
#[derive(Debug, Clone)]
pub struct BlipConditioning {
    /// Q-Former output after the projection, `[1, num_query_tokens, hidden]`.
    pub query_embeds: Tensor,
    /// The prompt as built by `_build_prompt`.
    pub built_prompt: String,
    /// CLIP ids of the built prompt, `max_position_embeddings - num_query_tokens` long.
    pub prompt_ids: Vec<u32>,
    /// Conditional embedding with the queries inserted, `[1, max_position_embeddings, hidden]`.
    pub cond: Tensor,
    /// Unconditional (negative prompt, no queries) embedding, `[1, 77, hidden]`.
    pub uncond: Tensor,
    /// Index in `cond` of the first query embedding (`ctx_begin_pos`).
    pub ctx_begin_pos: usize,
}

/// The conditioning half of BLIP-Diffusion: image processor, Q-Former with its BERT tokenizer,
/// context CLIP text encoder with the CLIP tokenizer.
#[derive(Debug, Clone)]
pub struct BlipDiffusion {
    pub config: BlipDiffusionConfig,
    pub image_processor: BlipImageProcessor,
    pub qformer: Blip2QFormerModel,
    pub qformer_tokenizer: BertTokenizer,
    pub text_encoder: ContextClipTextModel,
    pub tokenizer: ClipTokenizer,
    device: Device,
}

fn missing<'a>(
    model: &'a ModelSource,
    component: &'static str,
) -> impl Fn(weights::WeightsError) -> BlipError + 'a {
    move |source| BlipError::MissingComponent {
        model: match model {
            ModelSource::Local(p) => p.display().to_string(),
            ModelSource::Hub { repo } => repo.clone(),
        },
        component,
        source,
    }
}

fn join_paths(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_config<T: serde::de::DeserializeOwned>(
    component: &'static str,
    path: &Path,
) -> Result<T, BlipError> {
    weights::read_json(path).map_err(|e| BlipError::Config {
        component,
        path: path.to_path_buf(),
        reason: match e {
            weights::WeightsError::Json { source, .. } => source.to_string(),
            other => other.to_string(),
        },
    })
}

impl BlipDiffusion {
    /// Reads `model_index.json`, `image_processor/`, `qformer/` (and the tokenizer folder its
    /// config names), `text_encoder/` and `tokenizer/` of a diffusers BLIP-Diffusion folder or hub
    /// repo. Each missing component or mismatched weight file gives one error naming it.
    pub fn load(model: &ModelSource, dtype: DType, device: &Device) -> Result<Self, BlipError> {
        let index_path = model
            .file(&["model_index.json"])
            .map_err(missing(model, "model_index.json"))?;
        let config: BlipDiffusionConfig = read_config("pipeline", &index_path)?;

        let proc_cfg: BlipImageProcessorConfig =
            match model.file(&["image_processor/preprocessor_config.json"]) {
                Ok(p) => read_config("image_processor", &p)?,
                // diffusers builds the processor from its defaults when the folder has none.
                Err(_) => BlipImageProcessorConfig::default(),
            };
        let image_processor =
            BlipImageProcessor::new(&proc_cfg, config.mean.as_deref(), config.std.as_deref())?;

        let q_cfg_path = model
            .file(&["qformer/config.json"])
            .map_err(missing(model, "qformer"))?;
        let q_cfg: Blip2Config = read_config("qformer", &q_cfg_path)?;
        q_cfg.check().map_err(|reason| BlipError::Config {
            component: "qformer",
            path: q_cfg_path.clone(),
            reason,
        })?;
        let q_files = model
            .weight_files("qformer", &["model", "diffusion_pytorch_model"])
            .map_err(missing(model, "qformer"))?;
        let vb = weights::var_builder(&q_files, dtype, device)?;
        let qformer = Blip2QFormerModel::new(&q_cfg, vb).map_err(|source| BlipError::Weights {
            component: "qformer",
            path: join_paths(&q_files),
            config: q_cfg_path.clone(),
            source,
        })?;
        let qformer_tokenizer = Self::load_qformer_tokenizer(model, &q_cfg, &q_cfg_path)?;
        if qformer_tokenizer.vocab_size() > q_cfg.qformer_config.vocab_size {
            return Err(BlipError::Config {
                component: "qformer",
                path: q_cfg_path,
                reason: format!(
                    "its tokenizer has {} tokens, more than qformer_config.vocab_size {}",
                    qformer_tokenizer.vocab_size(),
                    q_cfg.qformer_config.vocab_size
                ),
            });
        }

        let t_cfg_path = model
            .file(&["text_encoder/config.json"])
            .map_err(missing(model, "text_encoder"))?;
        let t_cfg: ClipTextConfig = read_config("text_encoder", &t_cfg_path)?;
        let t_files = model
            .weight_files("text_encoder", &["model", "pytorch_model"])
            .map_err(missing(model, "text_encoder"))?;
        let vb = weights::var_builder(&t_files, dtype, device)?;
        let text_encoder =
            ContextClipTextModel::new(&t_cfg, vb).map_err(|source| BlipError::Weights {
                component: "text_encoder",
                path: join_paths(&t_files),
                config: t_cfg_path.clone(),
                source,
            })?;
        let q_hidden = q_cfg.qformer_config.hidden_size;
        if q_hidden != t_cfg.hidden_size {
            return Err(BlipError::Config {
                component: "text_encoder",
                path: t_cfg_path,
                reason: format!(
                    "hidden_size {} differs from the Q-Former's hidden_size {q_hidden} (its query embeddings go into the prompt)",
                    t_cfg.hidden_size
                ),
            });
        }
        if q_cfg.num_query_tokens + config.ctx_begin_pos + 1 > t_cfg.max_position_embeddings {
            return Err(BlipError::Config {
                component: "text_encoder",
                path: t_cfg_path,
                reason: format!(
                    "max_position_embeddings {} leaves no room for {} query tokens at ctx_begin_pos {}",
                    t_cfg.max_position_embeddings, q_cfg.num_query_tokens, config.ctx_begin_pos
                ),
            });
        }
        let tokenizer = ClipTokenizer::from_source(model, "tokenizer")?;
        Ok(Self {
            config,
            image_processor,
            qformer,
            qformer_tokenizer,
            text_encoder,
            tokenizer,
            device: device.clone(),
        })
    }

    fn load_qformer_tokenizer(
        model: &ModelSource,
        cfg: &Blip2Config,
        cfg_path: &Path,
    ) -> Result<BertTokenizer, BlipError> {
        // A folder inside the same hub repo first, then what `tokenizer_source` resolves.
        let inside = cfg.tokenizer.as_deref().and_then(|name| match model {
            ModelSource::Hub { .. } => model.file(&[&format!("{name}/vocab.txt")]).ok(),
            ModelSource::Local(_) => None,
        });
        let (vocab, config) = match inside {
            Some(v) => {
                let c = v.with_file_name("tokenizer_config.json");
                (v, c.is_file().then_some(c))
            }
            None => {
                let src = tokenizer_source(model, cfg.tokenizer.as_deref());
                let vocab = src.file(&["vocab.txt"]).map_err(|e| BlipError::Tokenizer {
                    path: cfg_path.to_path_buf(),
                    reason: format!(
                        "the Q-Former config's tokenizer '{}' has no vocab.txt: {e}",
                        cfg.tokenizer
                            .as_deref()
                            .unwrap_or("bert-base-uncased (default)")
                    ),
                })?;
                (vocab, src.file(&["tokenizer_config.json"]).ok())
            }
        };
        BertTokenizer::from_files(&vocab, config.as_deref())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `_build_prompt`: `"a {tgt_subject} {prompt.strip()}"` repeated `int(strength · reps)` times,
    /// joined by `", "`.
    pub fn build_prompt(prompt: &str, tgt_subject: &str, settings: PromptSettings) -> String {
        let one = format!("a {tgt_subject} {}", prompt.trim());
        let n = (settings.prompt_strength * settings.prompt_reps as f64) as usize;
        vec![one; n].join(", ")
    }

    /// The reference image as the Q-Former's pixel values.
    ///
    /// # Shapes
    /// Output `[1, 3, size, size]`.
    pub fn reference_pixels(&self, image: &image::RgbImage) -> Result<Tensor, BlipError> {
        Ok(self.image_processor.preprocess(image, &self.device)?)
    }

    /// Query embeddings of a reference image and its source subject category.
    ///
    /// # Shapes
    /// `pixel_values`: `[1, 3, size, size]`; output `[1, num_query_tokens, hidden]`.
    pub fn query_embeddings(
        &self,
        pixel_values: &Tensor,
        src_subject: &str,
    ) -> Result<Tensor, BlipError> {
        let ids = self.qformer_tokenizer.encode(src_subject)?;
        Ok(self
            .qformer
            .forward(pixel_values, &[ids], self.qformer_tokenizer.pad_id())?)
    }

    /// CLIP ids of a built prompt as `encode_prompt` tokenizes it: `padding="max_length",
    /// truncation=True, max_length = max_position_embeddings - num_query_tokens`.
    pub fn prompt_ids(&self, built_prompt: &str) -> Result<Vec<u32>, BlipError> {
        let max_len =
            self.text_encoder.config().max_position_embeddings - self.qformer.num_query_tokens();
        let enc = self.tokenizer.encode(built_prompt)?;
        let n = enc.len_unpadded();
        let mut content: Vec<u32> = enc.ids[1..n - 1].to_vec();
        content.truncate(max_len - 2);
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.tokenizer.bos_id());
        ids.extend(content);
        ids.push(self.tokenizer.eos_id());
        ids.resize(max_len, self.tokenizer.pad_id());
        Ok(ids)
    }

    /// `encode_prompt`: the built prompt's embedding with the queries inserted at `ctx_begin_pos`.
    ///
    /// # Shapes
    /// `query_embeds`: `[1, k, hidden]`; output `[1, max_position_embeddings, hidden]`.
    pub fn encode_prompt(
        &self,
        query_embeds: &Tensor,
        built_prompt: &str,
    ) -> Result<Tensor, BlipError> {
        let ids = self.prompt_ids(built_prompt)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        Ok(self
            .text_encoder
            .forward(&ids, Some((query_embeds, self.config.ctx_begin_pos)))?)
    }

    /// The unconditional embedding: the negative prompt padded to the tokenizer's length, no queries.
    ///
    /// # Shapes
    /// Output `[1, 77, hidden]`.
    pub fn encode_negative(&self, neg_prompt: &str) -> Result<Tensor, BlipError> {
        let ids = self.tokenizer.encode(neg_prompt)?.ids;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        Ok(self.text_encoder.forward(&ids, None)?)
    }

    /// All the conditioning of one generation, as `BlipDiffusionPipeline.__call__` computes it
    /// before its loop.
    pub fn condition(
        &self,
        reference: &image::RgbImage,
        src_subject: &str,
        prompt: &str,
        tgt_subject: &str,
        neg_prompt: &str,
        settings: PromptSettings,
    ) -> Result<BlipConditioning, BlipError> {
        let pixels = self.reference_pixels(reference)?;
        let query_embeds = self.query_embeddings(&pixels, src_subject)?;
        let built_prompt = Self::build_prompt(prompt, tgt_subject, settings);
        let prompt_ids = self.prompt_ids(&built_prompt)?;
        let cond = self.encode_prompt(&query_embeds, &built_prompt)?;
        let uncond = self.encode_negative(neg_prompt)?;
        Ok(BlipConditioning {
            query_embeds,
            built_prompt,
            prompt_ids,
            cond,
            uncond,
            ctx_begin_pos: self.config.ctx_begin_pos,
        })
    }
}

/// Reads a reference image as RGB (alpha dropped, grey replicated, as PIL's `convert("RGB")`).
pub fn read_reference(path: &Path) -> Result<image::RgbImage, BlipError> {
    let img = image::open(path).map_err(|e| BlipError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// BLIP-Diffusion with its SD UNet and VAE.
#[derive(Debug, Clone)]
pub struct BlipDiffusionPipeline {
    pub blip: BlipDiffusion,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
}

/// One generation's settings. The defaults are the other baselines' (SPEC §6): 50 DDIM steps,
/// CFG 7.5, 512×512, an empty negative prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipGenerateOptions {
    pub steps: usize,
    pub guidance_scale: f64,
    pub height: usize,
    pub width: usize,
    pub neg_prompt: String,
    pub prompt: PromptSettings,
}

impl Default for BlipGenerateOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            guidance_scale: 7.5,
            height: 512,
            width: 512,
            neg_prompt: String::new(),
            prompt: PromptSettings::default(),
        }
    }
}

impl BlipDiffusionPipeline {
    /// [`BlipDiffusion::load`] plus `unet/` and `vae/`.
    pub fn load(model: &ModelSource, dtype: DType, device: &Device) -> Result<Self, BlipError> {
        let blip = BlipDiffusion::load(model, dtype, device)?;
        model
            .file(&["unet/config.json"])
            .map_err(missing(model, "unet"))?;
        let unet = UNet2DConditionModel::load(model, "unet", dtype, device)?;
        let v_cfg_path = model
            .file(&["vae/config.json"])
            .map_err(missing(model, "vae"))?;
        let v_cfg: AutoencoderKLConfig = read_config("vae", &v_cfg_path)?;
        let v_files = model
            .weight_files("vae", &["diffusion_pytorch_model"])
            .map_err(missing(model, "vae"))?;
        let vb = weights::var_builder(&v_files, dtype, device)?;
        let vae = AutoencoderKL::new(&v_cfg, vb).map_err(|source| BlipError::Weights {
            component: "vae",
            path: join_paths(&v_files),
            config: v_cfg_path,
            source,
        })?;
        let levels = unet.config().block_out_channels.len();
        let cross = unet
            .config()
            .cross_attention_dim
            .expand(levels, "cross_attention_dim")?;
        let hidden = blip.text_encoder.config().hidden_size;
        if cross.iter().any(|&c| c != hidden) {
            return Err(BlipError::Config {
                component: "unet",
                path: model.file(&["unet/config.json"])?,
                reason: format!(
                    "cross_attention_dim {cross:?} differs from the text encoder's hidden_size {hidden}"
                ),
            });
        }
        Ok(Self { blip, unet, vae })
    }

    /// The DDIM schedule used for BLIP-Diffusion: SD's configuration (SPEC §6), not the folder's.
    pub fn scheduler(steps: usize) -> Result<Ddim, BlipError> {
        Ok(Ddim::new(&DdimConfig::stable_diffusion(), steps)?)
    }

    /// The reference pipeline's loop with DDIM: CFG on the batch `[uncond, cond]`, from
    /// `init_latents` (DDIM's initial noise sigma is 1).
    ///
    /// # Shapes
    /// `init_latents`: `[1, 4, h/8, w/8]`; output the same.
    pub fn sample(
        &self,
        cond: &BlipConditioning,
        init_latents: &Tensor,
        steps: usize,
        guidance_scale: f64,
    ) -> Result<Tensor, BlipError> {
        let ddim = Self::scheduler(steps)?;
        let dtype = self.unet.dtype();
        let cfg_on = guidance_scale > 1.0;
        let ehs = if cfg_on {
            Tensor::cat(&[&cond.uncond, &cond.cond], 0)?
        } else {
            cond.cond.clone()
        }
        .to_dtype(dtype)?;
        let mut latents = init_latents.to_dtype(dtype)?;
        for &t in ddim.timesteps() {
            let input = if cfg_on {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let pred = self.unet.forward(&input, t as f64, &ehs)?;
            let eps = if cfg_on {
                let u = pred.get(0)?.unsqueeze(0)?;
                let c = pred.get(1)?.unsqueeze(0)?;
                (&u + ((c - &u)? * guidance_scale)?)?
            } else {
                pred
            };
            latents = ddim.step(&eps, t, &latents)?.prev_sample;
        }
        Ok(latents)
    }

    /// One image: condition on the reference, sample from `init_latents`, decode.
    pub fn generate(
        &self,
        reference: &image::RgbImage,
        src_subject: &str,
        prompt: &str,
        tgt_subject: &str,
        init_latents: &Tensor,
        opts: &BlipGenerateOptions,
    ) -> Result<image::RgbImage, BlipError> {
        let f = self.vae.config().downsample_factor();
        let want = [
            1,
            self.unet.config().in_channels,
            opts.height / f,
            opts.width / f,
        ];
        if init_latents.dims() != want || opts.height % f != 0 || opts.width % f != 0 {
            return Err(candle_core::Error::Msg(format!(
                "initial latents {:?} do not fit a {}x{} image (expected {want:?}, size a multiple of {f})",
                init_latents.dims(),
                opts.width,
                opts.height
            ))
            .into());
        }
        let cond = self.blip.condition(
            reference,
            src_subject,
            prompt,
            tgt_subject,
            &opts.neg_prompt,
            opts.prompt,
        )?;
        let latents = self.sample(&cond, init_latents, opts.steps, opts.guidance_scale)?;
        let image = self.vae.decode_latents(&latents)?;
        let mut images = crate::vae::tensor_to_images(&image.to_dtype(DType::F32)?)?;
        Ok(images.remove(0))
    }
}
