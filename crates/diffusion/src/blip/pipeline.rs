//! Loading a BLIP-Diffusion folder and generating with it: the reference pipeline's conditioning
//! (diffusers 0.32.2 `pipelines/blip_diffusion/pipeline_blip_diffusion.py`:
//! `BlipDiffusionPipeline._build_prompt`, `get_query_embeddings`, `encode_prompt` and the
//! unconditional branch of `__call__`) and its sampling loop, with DDIM in SD's configuration like
//! the other baselines instead of the folder's PNDM scheduler; the UNet, VAE and CFG steps are
//! the crate's [`StableDiffusion`] pipeline loaded from the same folder.

use super::ctx_clip::ContextClipTextModel;
use super::image::{BlipImageProcessor, BlipImageProcessorConfig};
use super::qformer::{tokenizer_sources, BertTokenizer, Blip2Config, Blip2QFormerModel};
use super::BlipError;
use crate::ddim::{Ddim, DdimConfig};
use crate::hooks::NoHook;
use crate::pipeline::{LoadOptions, PipelineError, PromptEmbeddings, StableDiffusion};
use crate::text::ClipTextConfig;
use crate::tokenizer::ClipTokenizer;
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
    /// One repetition of the prompt, `a {tgt_subject} {prompt}` (what the built prompt repeats).
    pub single_prompt: String,
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

        let proc_cfg: BlipImageProcessorConfig = match model
            .file(&["image_processor/preprocessor_config.json"])
        {
            Ok(p) => read_config("image_processor", &p)?,
            // diffusers builds the processor from its defaults when the folder has none; any
            // other failure (offline cache miss, download error) is an error, not the defaults.
            Err(weights::WeightsError::MissingFile { .. }) => BlipImageProcessorConfig::default(),
            Err(e) => return Err(missing(model, "image_processor")(e)),
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
        // A folder inside the same hub repo first, then the first of `tokenizer_sources` that has
        // the vocabulary.
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
                let mut failures = Vec::new();
                let mut found = None;
                for src in tokenizer_sources(model, cfg.tokenizer.as_deref()) {
                    match src.file(&["vocab.txt"]) {
                        Ok(vocab) => {
                            found = Some((vocab, src.file(&["tokenizer_config.json"]).ok()));
                            break;
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                found.ok_or_else(|| BlipError::Tokenizer {
                    path: cfg_path.to_path_buf(),
                    reason: format!(
                        "the Q-Former config's tokenizer '{}' has no vocab.txt: {}",
                        cfg.tokenizer
                            .as_deref()
                            .unwrap_or("bert-base-uncased (default)"),
                        failures.join("; ")
                    ),
                })?
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
        let single_prompt = Self::build_prompt(
            prompt,
            tgt_subject,
            PromptSettings {
                prompt_strength: 1.0,
                prompt_reps: 1,
            },
        );
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
            single_prompt,
        })
    }
}

/// Reads a reference image as PIL's `Image.open(path).convert("RGB")` does (alpha dropped, grey
/// replicated, JPEGs decoded bit-exactly as libjpeg-turbo: [`imaging::load_rgb`]).
pub fn read_reference(path: &Path) -> Result<image::RgbImage, BlipError> {
    imaging::load_rgb(path).map_err(|e| BlipError::Image {
        path: e.path,
        reason: e.reason,
    })
}

/// The text prompt BLIP-Diffusion gets for a DreamBench prompt rendered class-only
/// (`a dog in the jungle`): `_build_prompt` prepends `a {target subject}` itself, so a leading
/// `a {class}` is removed (`in the jungle`). Prompts that do not start that way (`a red dog`,
/// `a cube shaped dog`) are kept whole, so the built prompt is `a dog a red dog, …` and still
/// carries the attribute.
pub fn blip_text_prompt(rendered: &str, class: &str) -> String {
    let p = rendered.trim();
    let head = format!("a {} ", class.trim());
    if p.len() > head.len() && p[..head.len()].eq_ignore_ascii_case(&head) {
        p[head.len()..].trim().to_string()
    } else if p.eq_ignore_ascii_case(head.trim_end()) {
        String::new()
    } else {
        p.to_string()
    }
}

impl BlipConditioning {
    /// The embeddings as the Stable Diffusion pipeline's CFG steps take them.
    pub fn prompt_embeddings(&self) -> PromptEmbeddings {
        PromptEmbeddings {
            uncond: self.uncond.clone(),
            cond: self.cond.clone(),
        }
    }

    pub fn num_query_tokens(&self) -> usize {
        self.query_embeds.dims().get(1).copied().unwrap_or(0)
    }

    /// Where token `i` of [`Self::prompt_ids`] sits in [`Self::cond`]: before `ctx_begin_pos`
    /// unchanged, from there on shifted by the inserted queries.
    pub fn cond_position(&self, prompt_position: usize) -> usize {
        if prompt_position < self.ctx_begin_pos {
            prompt_position
        } else {
            prompt_position + self.num_query_tokens()
        }
    }

    /// The query tokens' positions in [`Self::cond`].
    pub fn query_positions(&self) -> std::ops::Range<usize> {
        self.ctx_begin_pos..self.ctx_begin_pos + self.num_query_tokens()
    }

    /// Positions in [`Self::cond`] of the word tokens of the first repetition of the prompt
    /// ([`Self::single_prompt`], start and end tokens excluded), in order: what Pick-and-Draw's
    /// layout loss matches against the template prompt's word tokens (`a dog in the jungle`).
    pub fn single_prompt_positions(
        &self,
        tokenizer: &ClipTokenizer,
    ) -> Result<Vec<usize>, BlipError> {
        let enc = tokenizer.encode(&self.single_prompt)?;
        let words = &enc.ids[1..enc.len_unpadded() - 1];
        let kept = self.prompt_ids.len() - 1;
        if words.len() + 1 > kept || self.prompt_ids[1..=words.len()] != *words {
            return Err(candle_core::Error::Msg(format!(
                "the prompt '{}' does not fit at the start of the {}-token BLIP-Diffusion prompt",
                self.single_prompt,
                self.prompt_ids.len()
            ))
            .into());
        }
        Ok((1..=words.len()).map(|p| self.cond_position(p)).collect())
    }

    /// Positions in [`Self::cond`] of the tokens of the first whole-word occurrence of `word` in
    /// the built prompt (the subject token of SPEC §7 is the last of them).
    pub fn word_positions(
        &self,
        tokenizer: &ClipTokenizer,
        word: &str,
    ) -> Result<Vec<usize>, BlipError> {
        let positions = tokenizer.word_positions(&self.built_prompt, word)?;
        let kept = self.prompt_ids.len() - 1; // the last id is EOS or padding
        if let Some(&p) = positions.iter().find(|&&p| p >= kept) {
            return Err(candle_core::Error::Msg(format!(
                "'{word}' (token {p}) is cut off the {}-token BLIP-Diffusion prompt",
                self.prompt_ids.len()
            ))
            .into());
        }
        Ok(positions.iter().map(|&p| self.cond_position(p)).collect())
    }
}

/// BLIP-Diffusion with the Stable Diffusion model of the same folder (UNet, VAE, and DDIM in SD's
/// configuration instead of the folder's PNDM, like the other baselines), so that everything built
/// on [`StableDiffusion`] (CFG steps, hooks, Pick-and-Draw) runs on it with the embeddings of
/// [`BlipConditioning::prompt_embeddings`].
pub struct BlipDiffusionPipeline {
    pub blip: BlipDiffusion,
    /// The folder's UNet, VAE, tokenizer and (plain CLIP view of the) text encoder; its scheduler
    /// is [`DdimConfig::stable_diffusion`].
    pub sd: StableDiffusion,
}

impl std::fmt::Debug for BlipDiffusionPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlipDiffusionPipeline")
            .field("blip", &self.blip)
            .field("sd.provenance", &self.sd.provenance)
            .finish_non_exhaustive()
    }
}

/// One BLIP-Diffusion generation (`pnd generate --method blip-diffusion`).
#[derive(Debug, Clone)]
pub struct BlipRequest {
    /// The reference image of the subject.
    pub reference: PathBuf,
    /// Its category, the Q-Former's text input (`source_subject_category`).
    pub subject_category: String,
    /// The category named in the prompt (`target_subject_category`); the subject's by default.
    pub target_category: Option<String>,
    /// The text prompt after the subject (`in the jungle`), see [`blip_text_prompt`].
    pub prompt: String,
    pub negative_prompt: String,
    pub prompt_settings: PromptSettings,
    pub steps: usize,
    pub cfg_scale: f64,
    pub height: usize,
    pub width: usize,
    pub seed: u64,
    /// `[1, 4, height/8, width/8]`; replaces the seeded noise.
    pub init_latents: Option<Tensor>,
}

impl Default for BlipRequest {
    /// The other baselines' settings (SPEC §6): 50 DDIM steps, CFG 7.5, 512×512, an empty
    /// negative prompt, seed 0; the pipeline's prompt strength 1.0 × 20 repetitions.
    fn default() -> Self {
        Self {
            reference: PathBuf::new(),
            subject_category: String::new(),
            target_category: None,
            prompt: String::new(),
            negative_prompt: String::new(),
            prompt_settings: PromptSettings::default(),
            steps: 50,
            cfg_scale: 7.5,
            height: 512,
            width: 512,
            seed: 0,
            init_latents: None,
        }
    }
}

/// What [`BlipDiffusionPipeline::generate`] produced.
#[derive(Debug, Clone)]
pub struct BlipOutput {
    pub image: image::RgbImage,
    /// Final latents before decoding, `[1, 4, h/8, w/8]`.
    pub latents: Tensor,
    pub conditioning: BlipConditioning,
}

impl BlipDiffusionPipeline {
    /// [`BlipDiffusion::load`] plus the folder's `unet/` and `vae/` through
    /// [`StableDiffusion::load`].
    pub fn load(model: &str, dtype: DType, device: &Device) -> Result<Self, BlipError> {
        let src = ModelSource::parse(model)?;
        let blip = BlipDiffusion::load(&src, dtype, device)?;
        for component in ["unet", "vae"] {
            src.file(&[&format!("{component}/config.json")])
                .map_err(missing(
                    &src,
                    if component == "unet" { "unet" } else { "vae" },
                ))?;
        }
        let opts = LoadOptions {
            dtype,
            device: device.clone(),
            ..Default::default()
        };
        let mut sd = StableDiffusion::load(model, &opts)?;
        sd.scheduler = DdimConfig::stable_diffusion();
        Ok(Self { blip, sd })
    }

    /// The DDIM schedule used for BLIP-Diffusion: SD's configuration (SPEC §6), not the folder's.
    pub fn scheduler(steps: usize) -> Result<Ddim, BlipError> {
        Ok(Ddim::new(&DdimConfig::stable_diffusion(), steps)?)
    }

    /// The reference pipeline's loop with DDIM: CFG on the batch `[uncond, cond]`, from
    /// `init_latents` (DDIM's initial noise sigma is 1). `on_step(i, n)` after each step.
    ///
    /// # Shapes
    /// `init_latents`: `[1, 4, h/8, w/8]`; output the same.
    pub fn sample(
        &self,
        cond: &BlipConditioning,
        init_latents: &Tensor,
        steps: usize,
        cfg_scale: f64,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor, BlipError> {
        let ddim = self.sd.ddim(steps)?;
        let dtype = self.sd.dtype();
        let emb = PromptEmbeddings {
            uncond: cond.uncond.to_dtype(dtype)?,
            cond: cond.cond.to_dtype(dtype)?,
        };
        let mut latents = init_latents.to_dtype(dtype)?;
        let n = ddim.timesteps().len();
        for i in 0..n {
            latents = self
                .sd
                .cfg_step(&ddim, &latents, i, &emb, cfg_scale, &mut NoHook)?
                .latents;
            on_step(i + 1, n);
        }
        Ok(latents)
    }

    /// The conditioning of a request (reference image read and processed, queries, embeddings).
    pub fn condition(&self, req: &BlipRequest) -> Result<BlipConditioning, BlipError> {
        let reference = read_reference(&req.reference)?;
        let target = req
            .target_category
            .as_deref()
            .unwrap_or(&req.subject_category);
        self.blip.condition(
            &reference,
            &req.subject_category,
            &req.prompt,
            target,
            &req.negative_prompt,
            req.prompt_settings,
        )
    }

    /// The initial latents of a request: its own, checked against the size, else seeded noise.
    pub fn initial_latents(&self, req: &BlipRequest) -> Result<Tensor, BlipError> {
        let expected = self.sd.latent_shape(req.height, req.width)?;
        match &req.init_latents {
            Some(l) if l.dims() != expected.as_slice() => Err(PipelineError::LatentsShape {
                path: PathBuf::from("<init_latents>"),
                expected,
                actual: format!("{:?}", l.dims()),
            }
            .into()),
            Some(l) => Ok(l.to_dtype(self.sd.dtype())?),
            None => Ok(self.sd.initial_latents(req.height, req.width, req.seed)?),
        }
    }

    /// One image, unguided: condition, sample, decode.
    pub fn generate(
        &self,
        req: &BlipRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<BlipOutput, BlipError> {
        let init = self.initial_latents(req)?;
        if req.subject_category.trim().is_empty() {
            return Err(candle_core::Error::Msg(
                "BLIP-Diffusion needs the reference's subject category (--subject-category)".into(),
            )
            .into());
        }
        let conditioning = self.condition(req)?;
        let latents = self.sample(&conditioning, &init, req.steps, req.cfg_scale, on_step)?;
        let image = self.sd.decode_images(&latents)?.remove(0);
        Ok(BlipOutput {
            image,
            latents,
            conditioning,
        })
    }
}
