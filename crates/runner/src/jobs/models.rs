//! Model choice: which weights generate a method's images for a subject, the method's guidance
//! settings, and the models a runner keeps loaded between consecutive jobs.

use crate::experiment::{Baseline, Experiment, MethodSpec};
use crate::runtime::Runtime;
use anyhow::{bail, Context};
use diffusion::blip::BlipDiffusionPipeline;
use diffusion::ip_adapter::{
    pipeline_processor, ImageTokens, IpAdapter, IpAdapterKind, IpAdapterSource,
};
use diffusion::pipeline::{LoadOptions, StableDiffusion};
use diffusion::unet::IpAdapterScale;
use dreambench::Subject;
use guidance::GuidanceConfig;
use std::path::{Path, PathBuf};

/// Whether a model string must be a local path: `./x`, `../x`, `/x`, or three or more path parts
/// (`checkpoints/dreambooth/dog`). Two parts (`owner/name`) that do not exist locally are a
/// Hugging Face repo id.
pub fn must_be_local(model: &str) -> bool {
    model.starts_with("./")
        || model.starts_with("../")
        || model.starts_with('/')
        || model.split('/').count() >= 3
}

/// What generates a method's images for one subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelChoice {
    pub model: String,
    /// Components a DreamBooth folder lacks come from here.
    pub base: Option<String>,
    /// Textual Inversion embedding file.
    pub embeddings: Option<PathBuf>,
    /// The token its vector is bound to: the one the method's prompts use (`<dog>` for the
    /// default `<{subject}>` style), as diffusers' `load_textual_inversion(path, token=…)`;
    /// `None` keeps the file's own key (a prompt style without a token).
    pub embedding_token: Option<String>,
    /// An IP-Adapter attached to the model (baseline `ip-adapter`).
    pub ip_adapter: Option<IpAdapterChoice>,
}

/// The IP-Adapter of a method: where it is, which one, at which scale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpAdapterChoice {
    pub repo: String,
    pub kind: IpAdapterKind,
    /// The scale as written (`f64` is not `Hash`), e.g. `1` or `0.6`.
    pub scale: String,
}

impl IpAdapterChoice {
    pub fn source(&self) -> IpAdapterSource {
        IpAdapterSource {
            repo: self.repo.clone(),
            kind: self.kind,
        }
    }

    pub fn scale(&self) -> IpAdapterScale {
        IpAdapterScale::parse(&self.scale).unwrap_or_default()
    }
}

impl ModelChoice {
    /// Names the model in the palette cache's keys: the model, the embedding file and the token
    /// its vector is bound to (the same prompt under another binding encodes otherwise).
    pub fn cache_key(&self) -> String {
        let key = match &self.embedding_token {
            Some(token) => format!("{}|{:?}|{token}", self.model, self.embeddings),
            None => format!("{}|{:?}", self.model, self.embeddings),
        };
        match &self.ip_adapter {
            Some(ip) => format!("{key}|ip-adapter:{}:{}@{}", ip.repo, ip.kind, ip.scale),
            None => key,
        }
    }
}

/// The model of a method for a subject, or why there is none.
pub fn model_for(
    exp: &Experiment,
    method: &MethodSpec,
    subject: &Subject,
) -> anyhow::Result<ModelChoice> {
    let m = &exp.models;
    Ok(match method.baseline {
        Baseline::StableDiffusion => ModelChoice {
            model: m.base.clone(),
            base: None,
            embeddings: None,
            embedding_token: None,
            ip_adapter: None,
        },
        Baseline::IpAdapter => {
            let kind_name = m.ip_adapter_kind.as_deref().unwrap_or("plain");
            let Some(kind) = IpAdapterKind::parse(kind_name) else {
                bail!("[models] ip_adapter_kind = \"{kind_name}\": expected \"plain\" or \"plus\"")
            };
            let scale = m.ip_scale.unwrap_or(1.0);
            if !scale.is_finite() {
                bail!("[models] ip_scale = {scale}: not a finite number");
            }
            ModelChoice {
                model: m.base.clone(),
                base: None,
                embeddings: None,
                embedding_token: None,
                ip_adapter: Some(IpAdapterChoice {
                    repo: m
                        .ip_adapter
                        .clone()
                        .unwrap_or_else(|| "h94/IP-Adapter".into()),
                    kind,
                    scale: scale.to_string(),
                }),
            }
        }
        Baseline::Dreambooth => {
            let Some(path) = m.for_subject(Baseline::Dreambooth, subject.name) else {
                bail!("method '{}' is DreamBooth but the experiment sets no [models] dreambooth = \"path/{{subject}}\"", method.name)
            };
            ModelChoice {
                model: path,
                base: Some(m.base.clone()),
                embeddings: None,
                embedding_token: None,
                ip_adapter: None,
            }
        }
        Baseline::TextualInversion => {
            let Some(path) = m.for_subject(Baseline::TextualInversion, subject.name) else {
                bail!(
                    "method '{}' is Textual Inversion but the experiment sets no [models] textual_inversion = \"path/{{subject}}/learned_embeds.safetensors\"",
                    method.name
                )
            };
            ModelChoice {
                model: m.base.clone(),
                base: None,
                embeddings: Some(PathBuf::from(path)),
                embedding_token: method.style(subject).token,
                ip_adapter: None,
            }
        }
        // Images are read from files (`jobs::images`): no model makes them.
        Baseline::Images => ModelChoice {
            model: String::new(),
            base: None,
            embeddings: None,
            embedding_token: None,
            ip_adapter: None,
        },
        Baseline::BlipDiffusion => {
            let model = m
                .blip_diffusion
                .clone()
                .unwrap_or_else(|| "Salesforce/blipdiffusion".into());
            ModelChoice {
                model,
                base: None,
                embeddings: None,
                embedding_token: None,
                ip_adapter: None,
            }
        }
    })
}

/// A method's guidance settings: the experiment's `[guidance]`, then the method's own keys on top.
pub fn guidance_config(exp: &Experiment, method: &MethodSpec) -> anyhow::Result<GuidanceConfig> {
    let mut table = exp.guidance.clone();
    for (k, v) in &method.guidance {
        table.insert(k.clone(), v.clone());
    }
    let text = toml::to_string(&table)?;
    let cfg =
        GuidanceConfig::from_toml_str(&text, &format!("[guidance] of method '{}'", method.name))?;
    cfg.validate()?;
    Ok(cfg)
}

/// The models kept loaded while consecutive jobs share them: one Stable Diffusion model, the
/// vanilla base (the layout template of guided personalized methods) and one BLIP-Diffusion model.
pub(super) struct LoadedModels {
    base_model: String,
    sd: Option<(ModelChoice, StableDiffusion, Option<IpAdapter>)>,
    /// The IP-Adapter image tokens of the last reference image (a subject's jobs share it).
    ip_tokens: Option<(PathBuf, ImageTokens)>,
    base: Option<StableDiffusion>,
    blip: Option<(String, BlipDiffusionPipeline)>,
    runtime: Runtime,
}

impl LoadedModels {
    pub(super) fn new(base_model: String, runtime: Runtime) -> Self {
        Self {
            base_model,
            sd: None,
            ip_tokens: None,
            base: None,
            blip: None,
            runtime,
        }
    }

    /// Load options on this runtime's device and precision.
    fn options(&self) -> LoadOptions {
        LoadOptions {
            dtype: self.runtime.dtype,
            device: self.runtime.device.clone(),
            ..Default::default()
        }
    }

    fn ensure_base(&mut self) -> anyhow::Result<()> {
        if self.base.is_none() {
            let base = &self.base_model;
            self.base = Some(
                StableDiffusion::load(base, &self.options())
                    .with_context(|| format!("loading base model '{base}'"))?,
            );
        }
        Ok(())
    }

    /// The Stable Diffusion model of `choice` (with its IP-Adapter attached, when it has one),
    /// the base model when `with_base`, and the IP-Adapter's image tokens of `reference` (the
    /// image encoder runs once per reference image, not per job).
    pub(super) fn stable_diffusion(
        &mut self,
        choice: &ModelChoice,
        with_base: bool,
        reference: &Path,
    ) -> anyhow::Result<(
        &StableDiffusion,
        Option<&StableDiffusion>,
        Option<ImageTokens>,
    )> {
        if with_base {
            self.ensure_base()?;
        }
        if self.sd.as_ref().map(|(c, _, _)| c) != Some(choice) {
            // Drop the previous model first: two SD models at once would double peak memory.
            self.sd = None;
            let opts = LoadOptions {
                base: choice.base.clone(),
                embeddings: choice.embeddings.clone(),
                embedding_token: choice.embedding_token.clone(),
                ..self.options()
            };
            let mut sd = StableDiffusion::load(&choice.model, &opts)
                .with_context(|| format!("loading model '{}'", choice.model))?;
            let ip = match &choice.ip_adapter {
                Some(ip) => {
                    let processor = pipeline_processor(&choice.model)?;
                    Some(
                        IpAdapter::load_source(&ip.source(), processor, &mut sd.unet, &ip.scale())
                            .with_context(|| {
                                format!("loading IP-Adapter '{}' ({})", ip.repo, ip.kind)
                            })?,
                    )
                }
                None => None,
            };
            self.sd = Some((choice.clone(), sd, ip));
            self.ip_tokens = None;
        }
        let (_, sd, ip) = self.sd.as_ref().expect("loaded above");
        let tokens = match ip {
            None => None,
            Some(_) if self.ip_tokens.as_ref().map(|(p, _)| p.as_path()) == Some(reference) => {
                self.ip_tokens.as_ref().map(|(_, t)| t.clone())
            }
            Some(ip) => {
                let img = metrics::preprocess::load_rgb(reference)?;
                let t = ip.image_tokens(&img).with_context(|| {
                    format!("encoding the image prompt '{}'", reference.display())
                })?;
                self.ip_tokens = Some((reference.to_path_buf(), t.clone()));
                Some(t)
            }
        };
        Ok((sd, self.base.as_ref().filter(|_| with_base), tokens))
    }

    /// The BLIP-Diffusion model `model`, and the base model when `with_base`.
    pub(super) fn blip_diffusion(
        &mut self,
        model: &str,
        with_base: bool,
    ) -> anyhow::Result<(&BlipDiffusionPipeline, Option<&StableDiffusion>)> {
        if with_base {
            self.ensure_base()?;
        }
        if self.blip.as_ref().map(|(m, _)| m.as_str()) != Some(model) {
            self.blip = None;
            self.sd = None;
            let pipe = BlipDiffusionPipeline::load(model, self.runtime.dtype, &self.runtime.device)
                .with_context(|| format!("loading BLIP-Diffusion '{model}'"))?;
            self.blip = Some((model.to_string(), pipe));
        }
        let pipe = &self.blip.as_ref().expect("loaded above").1;
        Ok((pipe, self.base.as_ref().filter(|_| with_base)))
    }
}
