//! IP-Adapter for Stable Diffusion 1.5 (Ye et al. 2023): an image prompt from one reference image,
//! loaded from what diffusers' `load_ip_adapter` reads in `h94/IP-Adapter` (a hub id or a local
//! folder laid out the same way):
//! - `models/ip-adapter_sd15.{safetensors,bin}` ([`IpAdapterKind::Plain`]): the projected CLIP
//!   image embedding → `Linear` → 4 tokens → `LayerNorm` (diffusers 0.42.1 `models/embeddings.py`
//!   `ImageProjection`);
//! - `models/ip-adapter-plus_sd15.{safetensors,bin}` ([`IpAdapterKind::Plus`]): the image
//!   encoder's penultimate hidden states → the resampler ([`resampler`]) → 16 tokens;
//! - `models/image_encoder/`: a `CLIPVisionModelWithProjection` (ViT-H/14 in the real folder),
//!   run by the metrics crate's CLIP vision tower with that folder's config.
//!
//! The image processor is the Stable Diffusion folder's `feature_extractor` when it has one, else
//! `CLIPImageProcessor(size = crop = image_size)` as `load_ip_adapter` builds it: PIL bicubic
//! resize of the shortest side, center crop at the floor offset, `x · (1/255)` in f64, OpenAI
//! CLIP's mean and std (the metrics crate's PIL-exact preprocessing).
//!
//! Classifier-free guidance as diffusers 0.42.1 `pipeline_stable_diffusion.py` `encode_image` /
//! `prepare_ip_adapter_image_embeds` build it: the negative image input is a zero embedding for
//! the plain adapter, and the penultimate hidden states of an all-zero (normalized) pixel tensor
//! for Plus; both go through the image projection, so the negative tokens are not zero.
//!
//! The tokens are appended to the text embeddings ([`with_image_tokens`]), and the UNet, with the
//! adapter's layers attached ([`crate::unet::IpAdapterLayers`]), splits them off at each
//! cross-attention layer. The encoder and the projection run in f32 (the tokens are converted to
//! the UNet's dtype), as the metrics' towers do.

pub mod resampler;

use crate::pipeline::PromptEmbeddings;
use crate::unet::nn::Linear as UNetLinear;
use crate::unet::{
    ip::IpLayer, IpAdapterLayers, IpAdapterScale, IpSite, UNet2DConditionConfig,
    UNet2DConditionModel,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use metrics::clip::{ClipVision, ClipVisionWithProjectionConfig};
use metrics::nn::{LayerNorm, Linear};
use metrics::preprocess::{CropOffset, Preprocess, Rescale};
use resampler::{Resampler, ResamplerDims, DIM_HEAD};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use weights::ModelSource;

/// Which adapter of `h94/IP-Adapter`'s `models/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpAdapterKind {
    /// `ip-adapter_sd15`: 4 tokens from the projected image embedding.
    Plain,
    /// `ip-adapter-plus_sd15`: 16 tokens resampled from the penultimate hidden states.
    Plus,
}

impl IpAdapterKind {
    /// The weight file's stem in `models/`.
    pub fn weight_stem(self) -> &'static str {
        match self {
            IpAdapterKind::Plain => "ip-adapter_sd15",
            IpAdapterKind::Plus => "ip-adapter-plus_sd15",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "plain" | "ip-adapter" | "ip-adapter_sd15" => Some(IpAdapterKind::Plain),
            "plus" | "ip-adapter-plus" | "ip-adapter-plus_sd15" => Some(IpAdapterKind::Plus),
            _ => None,
        }
    }
}

impl std::fmt::Display for IpAdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpAdapterKind::Plain => "plain",
            IpAdapterKind::Plus => "plus",
        })
    }
}

/// Errors of loading or using an IP-Adapter; each names the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum IpAdapterError {
    #[error(transparent)]
    Files(#[from] weights::WeightsError),
    #[error("IP-Adapter file '{path}': {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("IP-Adapter file '{path}' does not fit the UNet: {reason}")]
    Unfit { path: PathBuf, reason: String },
    #[error("IP-Adapter image encoder '{path}': {reason}")]
    ImageEncoder { path: PathBuf, reason: String },
    #[error("IP-Adapter image encoder and adapter '{adapter}' do not fit: {reason}")]
    EncoderMismatch { adapter: PathBuf, reason: String },
    #[error("IP-Adapter image processor '{path}': {reason}")]
    Processor { path: PathBuf, reason: String },
    #[error("IP-Adapter scale: {0}")]
    Scale(String),
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for IpAdapterError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, IpAdapterError>;

/// Where an IP-Adapter comes from.
#[derive(Debug, Clone)]
pub struct IpAdapterSource {
    /// A folder or hub id laid out as `h94/IP-Adapter` (`models/…`).
    pub repo: String,
    pub kind: IpAdapterKind,
}

impl IpAdapterSource {
    /// The default: `h94/IP-Adapter`.
    pub fn h94(kind: IpAdapterKind) -> Self {
        Self {
            repo: "h94/IP-Adapter".into(),
            kind,
        }
    }

    /// `models/{stem}.safetensors`, else `models/{stem}.bin`.
    pub fn weight_file(&self) -> Result<PathBuf> {
        let src = ModelSource::parse(&self.repo)?;
        let stem = self.kind.weight_stem();
        let (st, bin) = (
            format!("models/{stem}.safetensors"),
            format!("models/{stem}.bin"),
        );
        Ok(src.file(&[st.as_str(), bin.as_str()])?)
    }

    /// `models/image_encoder/config.json`, and its weights.
    pub fn image_encoder_files(&self) -> Result<(PathBuf, Vec<PathBuf>)> {
        let src = ModelSource::parse(&self.repo)?;
        let config = src.file(&["models/image_encoder/config.json"])?;
        let files = src.weight_files("models/image_encoder", &["model", "pytorch_model"])?;
        Ok((config, files))
    }
}

/// The image projection of an adapter file.
#[derive(Debug, Clone)]
pub enum ImageProjection {
    /// `proj` then `norm` (diffusers' `ImageProjection`).
    Plain {
        proj: Linear,
        norm: LayerNorm,
        tokens: usize,
        dim: usize,
    },
    Plus(Resampler),
}

impl ImageProjection {
    /// # Shapes
    /// Plain: `[b, embed_dim]` (projected image embeddings); Plus: `[b, seq, hidden]`
    /// (penultimate hidden states); result `[b, tokens, cross_attention_dim]`.
    pub fn forward(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            ImageProjection::Plain {
                proj, norm, tokens, ..
            } => {
                let b = input.dim(0)?;
                norm.forward(&proj.forward(input)?.reshape((b, *tokens, ()))?)
            }
            ImageProjection::Plus(r) => r.forward(input),
        }
    }

    pub fn tokens(&self) -> usize {
        match self {
            ImageProjection::Plain { tokens, .. } => *tokens,
            ImageProjection::Plus(r) => r.queries(),
        }
    }
}

/// The tensors of an adapter file, keyed `image_proj.…` and `ip_adapter.…`.
fn read_adapter_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors =
        weights::load_sectioned_tensors(path, &["image_proj", "ip_adapter"], &Device::Cpu)?;
    for section in ["image_proj", "ip_adapter"] {
        if !tensors
            .keys()
            .any(|k| k.starts_with(&format!("{section}.")))
        {
            return Err(IpAdapterError::Format {
                path: path.into(),
                reason: format!(
                    "no '{section}' tensors (an IP-Adapter file holds 'image_proj' and 'ip_adapter')"
                ),
            });
        }
    }
    Ok(tensors)
}

fn dims_of(tensors: &HashMap<String, Tensor>, key: &str, path: &Path) -> Result<Vec<usize>> {
    tensors
        .get(key)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| IpAdapterError::Format {
            path: path.into(),
            reason: format!("missing tensor '{key}'"),
        })
}

/// The adapter file's image projection, its kind, and the width of its input.
fn image_projection(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    cross_dim: usize,
) -> Result<(IpAdapterKind, ImageProjection, usize)> {
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu).pp("image_proj");
    let unfit = |reason: String| IpAdapterError::Unfit {
        path: path.into(),
        reason,
    };
    let format = |e: candle_core::Error| IpAdapterError::Format {
        path: path.into(),
        reason: e.to_string(),
    };
    if tensors.contains_key("image_proj.proj.weight") {
        let w = dims_of(tensors, "image_proj.proj.weight", path)?;
        let [out, embed_dim] = w[..] else {
            return Err(format(candle_core::Error::Msg(format!(
                "image_proj.proj.weight has shape {w:?}, expected 2 dimensions"
            ))));
        };
        if out % cross_dim != 0 {
            return Err(unfit(format!(
                "image_proj.proj makes {out} values, not a whole number of tokens of the UNet's \
                 cross_attention_dim {cross_dim}"
            )));
        }
        let norm_dim = dims_of(tensors, "image_proj.norm.weight", path)?;
        if norm_dim != [cross_dim] {
            return Err(unfit(format!(
                "image_proj.norm is over {norm_dim:?} features, not the UNet's cross_attention_dim {cross_dim}"
            )));
        }
        let proj = ImageProjection::Plain {
            proj: Linear::load(vb.pp("proj"), embed_dim, out, true).map_err(format)?,
            norm: LayerNorm::load(vb.pp("norm"), cross_dim, 1e-5).map_err(format)?,
            tokens: out / cross_dim,
            dim: cross_dim,
        };
        return Ok((IpAdapterKind::Plain, proj, embed_dim));
    }
    if tensors.contains_key("image_proj.latents") {
        let latents = dims_of(tensors, "image_proj.latents", path)?;
        let proj_in = dims_of(tensors, "image_proj.proj_in.weight", path)?;
        let proj_out = dims_of(tensors, "image_proj.proj_out.weight", path)?;
        let to_q = dims_of(tensors, "image_proj.layers.0.0.to_q.weight", path)?;
        let (&[1, queries, hidden_dim], &[_, embed_dim], &[output_dim, _], &[inner, _]) =
            (&latents[..], &proj_in[..], &proj_out[..], &to_q[..])
        else {
            return Err(format(candle_core::Error::Msg(format!(
                "unexpected resampler shapes: latents {latents:?}, proj_in {proj_in:?}, \
                 proj_out {proj_out:?}, layers.0.0.to_q {to_q:?}"
            ))));
        };
        if inner % DIM_HEAD != 0 {
            return Err(format(candle_core::Error::Msg(format!(
                "the resampler's attention width {inner} is not a multiple of {DIM_HEAD} (heads of 64)"
            ))));
        }
        if output_dim != cross_dim {
            return Err(unfit(format!(
                "the resampler makes tokens of {output_dim} features, not the UNet's cross_attention_dim {cross_dim}"
            )));
        }
        let depth = (0..)
            .take_while(|i| tensors.contains_key(&format!("image_proj.layers.{i}.0.to_q.weight")))
            .count();
        let dims = ResamplerDims {
            queries,
            embed_dim,
            hidden_dim,
            output_dim,
            inner,
            depth,
        };
        let r = Resampler::new(&dims, vb).map_err(format)?;
        return Ok((IpAdapterKind::Plus, ImageProjection::Plus(r), embed_dim));
    }
    Err(IpAdapterError::Format {
        path: path.into(),
        reason: "image_proj is neither IP-Adapter's (proj, norm) nor IP-Adapter Plus's resampler \
                 (latents, proj_in, layers, proj_out, norm_out)"
            .into(),
    })
}

/// The adapter file's `to_k_ip` / `to_v_ip` for each cross-attention layer of `unet`, at `scale`.
fn ip_layers(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    sites: &[IpSite],
    tokens: usize,
    dtype: DType,
    device: &Device,
) -> Result<IpAdapterLayers> {
    let ids: Vec<usize> = {
        let mut v: Vec<usize> = tensors
            .keys()
            .filter_map(|k| {
                k.strip_prefix("ip_adapter.")?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let expected: Vec<usize> = (0..sites.len()).map(|k| 2 * k + 1).collect();
    if ids != expected {
        return Err(IpAdapterError::Unfit {
            path: path.into(),
            reason: format!(
                "it has image branches for {} layers (ids {}), the UNet has {} cross-attention layers (ids 1, 3, …, {})",
                ids.len(),
                summarize(&ids),
                sites.len(),
                2 * sites.len().max(1) - 1
            ),
        });
    }
    let vb = VarBuilder::from_tensors(tensors.clone(), dtype, device).pp("ip_adapter");
    let mut layers = BTreeMap::new();
    for (k, site) in sites.iter().enumerate() {
        let vb = vb.pp(2 * k + 1);
        let load = |name: &str| {
            UNetLinear::new(site.context_dim, site.inner, false, vb.pp(name)).map_err(|e| {
                IpAdapterError::Unfit {
                    path: path.into(),
                    reason: format!(
                        "ip_adapter.{}.{name} for '{}' (expected [{}, {}]): {e}",
                        2 * k + 1,
                        site.site,
                        site.inner,
                        site.context_dim
                    ),
                }
            })
        };
        layers.insert(
            site.site.clone(),
            IpLayer {
                to_k_ip: load("to_k_ip")?,
                to_v_ip: load("to_v_ip")?,
                scale: 1.0,
            },
        );
    }
    Ok(IpAdapterLayers::new(tokens, layers))
}

fn summarize(ids: &[usize]) -> String {
    match ids {
        [] => "none".into(),
        [a] => a.to_string(),
        [a, .., z] => format!("{a}…{z}"),
    }
}

/// `preprocessor_config.json` of a `CLIPImageProcessor` (the fields it uses).
#[derive(Debug, Clone, Deserialize)]
struct ClipProcessorConfig {
    #[serde(default)]
    size: Option<SizeField>,
    #[serde(default)]
    crop_size: Option<SizeField>,
    #[serde(default)]
    image_mean: Option<Vec<f32>>,
    #[serde(default)]
    image_std: Option<Vec<f32>>,
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    do_center_crop: Option<bool>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    resample: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeField {
    One(u32),
    Shortest { shortest_edge: u32 },
    Square { height: u32, width: u32 },
}

/// OpenAI CLIP's normalization (`CLIPImageProcessor`'s default).
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `CLIPImageProcessor(size=s, crop_size=s)`, the processor `load_ip_adapter` makes when the
/// pipeline has no feature extractor.
pub fn default_processor(image_size: u32) -> Preprocess {
    Preprocess {
        resize: image_size,
        crop: image_size,
        mean: CLIP_MEAN,
        std: CLIP_STD,
        crop_offset: CropOffset::Floor,
        rescale: Rescale::MultiplyF64,
    }
}

/// Reads a `CLIPImageProcessor` config (a Stable Diffusion folder's `feature_extractor/`).
pub fn read_processor(path: &Path) -> Result<Preprocess> {
    let cfg: ClipProcessorConfig = weights::read_json(path)?;
    let bad = |reason: String| IpAdapterError::Processor {
        path: path.into(),
        reason,
    };
    if cfg.do_resize == Some(false)
        || cfg.do_center_crop == Some(false)
        || cfg.do_normalize == Some(false)
    {
        return Err(bad(
            "do_resize, do_center_crop and do_normalize must be true".into(),
        ));
    }
    if cfg.resample.is_some_and(|r| r != 3) {
        return Err(bad(format!(
            "resample {} is not supported (3, bicubic, only)",
            cfg.resample.unwrap_or_default()
        )));
    }
    let resize = match cfg.size {
        None => 224,
        Some(SizeField::One(s)) | Some(SizeField::Shortest { shortest_edge: s }) => s,
        Some(SizeField::Square { height, width }) => {
            return Err(bad(format!(
                "size {{height: {height}, width: {width}}} (a resize without keeping the aspect ratio) is not supported"
            )))
        }
    };
    let crop = match cfg.crop_size {
        None => 224,
        Some(SizeField::One(s)) | Some(SizeField::Shortest { shortest_edge: s }) => s,
        Some(SizeField::Square { height, width }) if height == width => height,
        Some(SizeField::Square { height, width }) => {
            return Err(bad(format!("crop_size {height}×{width} is not square")))
        }
    };
    let three = |v: Option<Vec<f32>>, default: [f32; 3], what: &str| match v {
        None => Ok(default),
        Some(v) => <[f32; 3]>::try_from(v.as_slice())
            .map_err(|_| bad(format!("{what} has {} values, expected 3", v.len()))),
    };
    Ok(Preprocess {
        resize,
        crop,
        mean: three(cfg.image_mean, CLIP_MEAN, "image_mean")?,
        std: three(cfg.image_std, CLIP_STD, "image_std")?,
        crop_offset: CropOffset::Floor,
        rescale: Rescale::MultiplyF64,
    })
}

/// `CLIPVisionModelWithProjection` with its image processor.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    vision: ClipVision,
    pub processor: Preprocess,
    /// The config file it was read from.
    pub config_path: PathBuf,
}

impl ImageEncoder {
    /// Reads `config` and `files`; `processor` is the pipeline's feature extractor, `None` for
    /// the default at the encoder's `image_size`.
    pub fn load(config: &Path, files: &[PathBuf], processor: Option<Preprocess>) -> Result<Self> {
        let cfg: ClipVisionWithProjectionConfig = weights::read_json(config)?;
        let vb = weights::var_builder(files, DType::F32, &Device::Cpu)?;
        let vision =
            ClipVision::with_projection(&cfg, vb).map_err(|e| IpAdapterError::ImageEncoder {
                path: config.into(),
                reason: format!(
                    "weights {} do not fit the config: {e}",
                    files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        let processor =
            processor.unwrap_or_else(|| default_processor(cfg.vision.image_size as u32));
        if processor.crop as usize != cfg.vision.image_size {
            return Err(IpAdapterError::ImageEncoder {
                path: config.into(),
                reason: format!(
                    "the image processor crops to {}, the encoder takes {}×{} images",
                    processor.crop, cfg.vision.image_size, cfg.vision.image_size
                ),
            });
        }
        Ok(Self {
            vision,
            processor,
            config_path: config.into(),
        })
    }

    /// The processed image, `[1, 3, s, s]` f32 on the CPU.
    pub fn pixels(&self, image: &RgbImage) -> Result<Tensor> {
        let s = self.processor.crop as usize;
        let values = self.processor.apply(image);
        Ok(Tensor::from_vec(values, (1, 3, s, s), &Device::Cpu)?)
    }

    /// Projected image embeddings, `[b, projection_dim]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.embed(pixels)?)
    }

    /// Penultimate hidden states, `[b, patches + 1, hidden]`.
    pub fn penultimate_hidden_states(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.penultimate_hidden_states(pixels)?)
    }

    pub fn hidden_size(&self) -> usize {
        self.vision.config().hidden_size
    }

    pub fn projection_dim(&self) -> usize {
        self.vision.projection_dim()
    }
}

/// An image prompt's tokens for classifier-free guidance.
#[derive(Debug, Clone)]
pub struct ImageTokens {
    /// `[1, tokens, cross_attention_dim]` of the reference image.
    pub cond: Tensor,
    /// `[1, tokens, cross_attention_dim]` of the negative image input.
    pub uncond: Tensor,
}

/// The text embeddings with the image tokens appended (`[1, text + tokens, dim]` each, in the
/// text's dtype and on its device: the encoder runs on the CPU): what the UNet takes while the
/// adapter is attached.
pub fn with_image_tokens(
    text: &PromptEmbeddings,
    image: &ImageTokens,
) -> candle_core::Result<PromptEmbeddings> {
    let (dtype, device) = (text.cond.dtype(), text.cond.device());
    let like_text = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
    Ok(PromptEmbeddings {
        uncond: Tensor::cat(&[&text.uncond, &like_text(&image.uncond)?], 1)?,
        cond: Tensor::cat(&[&text.cond, &like_text(&image.cond)?], 1)?,
    })
}

/// A loaded IP-Adapter: its image encoder and image projection; its layers live in the UNet.
#[derive(Debug, Clone)]
pub struct IpAdapter {
    pub kind: IpAdapterKind,
    pub encoder: ImageEncoder,
    pub projection: ImageProjection,
    /// The adapter file.
    pub file: PathBuf,
}

impl IpAdapter {
    /// Loads the adapter `file` and the image encoder (`encoder_config` + `encoder_files`), checks
    /// them against `unet` and each other, and attaches the adapter's layers to `unet` at
    /// `scale`. Nothing is attached when anything does not fit.
    pub fn load(
        file: &Path,
        encoder_config: &Path,
        encoder_files: &[PathBuf],
        processor: Option<Preprocess>,
        unet: &mut UNet2DConditionModel,
        scale: &IpAdapterScale,
    ) -> Result<Self> {
        let sites = unet.ip_adapter_sites()?;
        let (kind, projection, layers) = read_checked(
            file,
            encoder_config,
            unet.config(),
            &sites,
            unet.dtype(),
            unet.device(),
        )?;
        let encoder = ImageEncoder::load(encoder_config, encoder_files, processor)?;
        let previous = unet.ip_adapter().cloned();
        unet.set_ip_adapter(Some(layers));
        if let Err(e) = unet.set_ip_adapter_scale(scale) {
            unet.set_ip_adapter(previous);
            return Err(IpAdapterError::Scale(e.to_string()));
        }
        Ok(Self {
            kind,
            encoder,
            projection,
            file: file.into(),
        })
    }

    /// [`Self::load`] from a folder or hub id laid out as `h94/IP-Adapter`.
    pub fn load_source(
        source: &IpAdapterSource,
        processor: Option<Preprocess>,
        unet: &mut UNet2DConditionModel,
        scale: &IpAdapterScale,
    ) -> Result<Self> {
        let file = source.weight_file()?;
        let (config, files) = source.image_encoder_files()?;
        let adapter = Self::load(&file, &config, &files, processor, unet, scale)?;
        if adapter.kind != source.kind {
            unet.set_ip_adapter(None);
            return Err(IpAdapterError::Format {
                path: file,
                reason: format!(
                    "asked for the {} adapter, the file holds a {} one",
                    source.kind, adapter.kind
                ),
            });
        }
        Ok(adapter)
    }

    /// The projection's input for `pixels` (`[b, 3, s, s]`): the projected embedding (plain) or
    /// the penultimate hidden states (Plus).
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        match self.kind {
            IpAdapterKind::Plain => self.encoder.image_embeds(pixels),
            IpAdapterKind::Plus => self.encoder.penultimate_hidden_states(pixels),
        }
    }

    /// The tokens of a processed image and of the negative input (diffusers' `encode_image`:
    /// zeros of the embedding for the plain adapter, the encoding of zero pixels for Plus).
    ///
    /// # Shapes
    /// `pixels`: `[1, 3, s, s]`; tokens `[1, tokens, cross_attention_dim]`.
    pub fn tokens_of_pixels(&self, pixels: &Tensor) -> Result<ImageTokens> {
        let input = self.encode(pixels)?;
        let negative = match self.kind {
            IpAdapterKind::Plain => input.zeros_like()?,
            IpAdapterKind::Plus => self.encode(&pixels.zeros_like()?)?,
        };
        Ok(ImageTokens {
            cond: self.projection.forward(&input)?,
            uncond: self.projection.forward(&negative)?,
        })
    }

    /// [`Self::tokens_of_pixels`] of an image, processed by the encoder's image processor.
    pub fn image_tokens(&self, image: &RgbImage) -> Result<ImageTokens> {
        self.tokens_of_pixels(&self.encoder.pixels(image)?)
    }

    pub fn tokens(&self) -> usize {
        self.projection.tokens()
    }
}

/// The adapter file read and checked against the UNet (`cfg`, its `sites`) and the image
/// encoder's config: its kind, image projection and image branches (in `dtype` on `device`).
fn read_checked(
    file: &Path,
    encoder_config: &Path,
    cfg: &UNet2DConditionConfig,
    sites: &[IpSite],
    dtype: DType,
    device: &Device,
) -> Result<(IpAdapterKind, ImageProjection, IpAdapterLayers)> {
    let cross_dim = unet_cross_dim(cfg, file)?;
    let tensors = read_adapter_tensors(file)?;
    let (kind, projection, input_dim) = image_projection(&tensors, file, cross_dim)?;
    let layers = ip_layers(&tensors, file, sites, projection.tokens(), dtype, device)?;
    let enc: ClipVisionWithProjectionConfig = weights::read_json(encoder_config)?;
    let (what, encoder_dim) = match kind {
        IpAdapterKind::Plain => ("projection_dim", enc.projection_dim),
        IpAdapterKind::Plus => ("hidden_size", enc.vision.hidden_size),
    };
    if encoder_dim != input_dim {
        return Err(IpAdapterError::EncoderMismatch {
            adapter: file.into(),
            reason: format!(
                "the {kind} adapter's image projection takes {input_dim} features, the image \
                 encoder '{}' gives {encoder_dim} ({what})",
                encoder_config.display()
            ),
        });
    }
    Ok((kind, projection, layers))
}

/// Checks, without loading the UNet or the image encoder's weights, that the adapter of `source`
/// and its image encoder exist and fit a UNet of config `cfg`: what a sweep verifies before its
/// first job. Returns the adapter's kind as its file says.
pub fn check(source: &IpAdapterSource, cfg: &UNet2DConditionConfig) -> Result<IpAdapterKind> {
    let file = source.weight_file()?;
    let (encoder_config, _) = source.image_encoder_files()?;
    let sites = cfg.ip_adapter_sites().map_err(|e| IpAdapterError::Unfit {
        path: file.clone(),
        reason: e.to_string(),
    })?;
    let (kind, _, _) = read_checked(
        &file,
        &encoder_config,
        cfg,
        &sites,
        DType::F32,
        &Device::Cpu,
    )?;
    if kind != source.kind {
        return Err(IpAdapterError::Format {
            path: file,
            reason: format!(
                "asked for the {} adapter, the file holds a {kind} one",
                source.kind
            ),
        });
    }
    Ok(kind)
}

fn unet_cross_dim(cfg: &UNet2DConditionConfig, file: &Path) -> Result<usize> {
    match &cfg.cross_attention_dim {
        crate::unet::PerBlock::One(c) => Ok(*c),
        crate::unet::PerBlock::Each(v) if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() => {
            Ok(v[0])
        }
        crate::unet::PerBlock::Each(v) => Err(IpAdapterError::Unfit {
            path: file.into(),
            reason: format!("the UNet's cross_attention_dim differs by block ({v:?})"),
        }),
    }
}

/// The image processor of a Stable Diffusion model (`feature_extractor/preprocessor_config.json`,
/// as the pipeline `load_ip_adapter` is called on uses it), or `None` when the model has none
/// (then the encoder's default applies, [`default_processor`]).
pub fn pipeline_processor(model: &str) -> Result<Option<Preprocess>> {
    let src = ModelSource::parse(model)?;
    match src.file(&["feature_extractor/preprocessor_config.json"]) {
        Ok(path) => Ok(Some(read_processor(&path)?)),
        Err(weights::WeightsError::MissingFile { .. })
        | Err(weights::WeightsError::OfflineMiss { .. })
        | Err(weights::WeightsError::Download { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
