//! What Pick-and-Draw sees at one sampling step (the paper's Fig. 3, `pnd maps`): the subject
//! token's cross-attention map at every cross-attention layer in inference order, the appearance
//! loss's masks `[Â ≥ τ]` at its layers, and the smoothed maps `G(Â)` the layout loss compares.
//!
//! Nothing here is computed another way than the guidance computes it: the maps come from the
//! capture hook the losses read ([`SiteCapture`], conditional branch of the CFG call, as the
//! layout template and the palette capture them), the normalization and the masks from
//! [`min_max_normalize`] and [`mask_indices_many`] (as [`crate::guide`] and [`crate::palette`]),
//! the smoothing from [`layout_maps`] (as [`crate::layout::layer_distance`]).

use crate::appearance::loss_precision;
use crate::cache::{CacheWarning, PaletteCache};
use crate::capture::{attn2_site, SiteCapture};
use crate::config::GuidanceConfig;
use crate::error::{Error, Result};
use crate::inversion::{invert, load_reference_image, replay};
use crate::layout::{layout_maps, to_square};
use crate::maps::{mask_indices_many, min_max_normalize};
use crate::pipeline::{appearance_sites, reference_setup, subject_word, ReferenceSpec};
use candle_core::{DType, Tensor};
use diffusion::hooks::NoHook;
use diffusion::pipeline::StableDiffusion;
use serde::Serialize;
use std::path::PathBuf;

/// Whose maps: a generation, or the reference's replay.
#[derive(Debug, Clone)]
pub enum MapsSource {
    /// Unguided CFG sampling of `prompt` from `init` (`[1, 4, h/8, w/8]`), as the layout
    /// template is sampled.
    Generation {
        prompt: String,
        negative_prompt: String,
        init: Tensor,
        cfg_scale: f64,
    },
    /// The replay of the reference image's null-text inversion (inversion prompt
    /// `a {identifier} {class}`), the one the appearance palette is captured from; the inversion
    /// comes from (and goes to) the palette cache under `cache_dir`, keyed as a guided
    /// generation's ([`reference_setup`]).
    Reference {
        image: PathBuf,
        /// Names the model in the cache key (the model argument and any embedding file).
        model_key: String,
        cache_dir: PathBuf,
    },
}

/// What to capture.
#[derive(Debug, Clone)]
pub struct MapsRequest {
    pub source: MapsSource,
    /// The subject's class noun (its last token is the subject token, SPEC §7).
    pub class: String,
    /// The identifier (`sks`, a Textual Inversion token), when the prompt has one.
    pub identifier: Option<String>,
    /// Sampling steps of the schedule.
    pub steps: usize,
    /// The sampling step (0-based) whose maps are captured.
    pub step: usize,
    pub height: usize,
    pub width: usize,
}

/// One cross-attention layer's maps of the subject token, all `[h, w]` f32.
#[derive(Debug, Clone)]
pub struct LayerMaps {
    /// 1-based position in inference order (down blocks, mid block, up blocks).
    pub order: usize,
    /// The `attn2` site, e.g. `up_blocks.2.attentions.0.transformer_blocks.0.attn2`.
    pub site: String,
    pub height: usize,
    pub width: usize,
    /// The head-averaged attention probabilities of the subject token, as captured.
    pub attention: Tensor,
    /// `Â`: min–max normalized over space.
    pub normalized: Tensor,
    /// `G(Â)`: what the layout loss compares (normalized, then the 3×3 Gaussian).
    pub smoothed: Tensor,
    /// `[Â ≥ τ]` (u8, 1 inside) at the appearance layers; `None` elsewhere.
    pub mask: Option<Tensor>,
}

/// What the maps of one step are of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapsContext {
    /// The conditioning prompt (the inversion prompt for the reference).
    pub prompt: String,
    /// The word whose last token is the subject token, and that token's position.
    pub subject_word: String,
    pub subject_token: usize,
    pub step: usize,
    pub steps: usize,
    /// The DDIM timestep of `step`.
    pub timestep: usize,
    /// The masks' threshold τ.
    pub tau: f64,
}

/// The maps of one step.
#[derive(Debug, Clone)]
pub struct AttentionMaps {
    /// Every cross-attention layer, in inference order.
    pub layers: Vec<LayerMaps>,
    pub context: MapsContext,
    /// The final latents of the sampling (or of the replay), `[1, 4, h/8, w/8]`, to decode.
    pub latents: Tensor,
    /// The reference's inversion came from the cache (`None` for a generation).
    pub inversion_cache_hit: Option<bool>,
    /// Cache entries that were there but unusable (recomputed), for the caller to warn about.
    pub cache_warnings: Vec<CacheWarning>,
}

/// The error of a step index past a `steps`-step schedule.
pub fn check_step(step: usize, steps: usize) -> Result<()> {
    if step >= steps {
        return Err(Error::StepOutOfRange { step, steps });
    }
    Ok(())
}

/// The subject token's maps at every cross-attention layer of `sd` at step `req.step`, with the
/// masks at `config`'s appearance layers (τ = `config.tau`) and the layout loss's smoothing
/// (`config.kernel`, `config.sigma`).
pub fn attention_maps(
    sd: &StableDiffusion,
    config: &GuidanceConfig,
    req: &MapsRequest,
) -> Result<AttentionMaps> {
    config.validate()?;
    check_step(req.step, req.steps)?;
    let appearance: Vec<String> = appearance_sites(sd, config)?
        .iter()
        .map(|s| attn2_site(s))
        .collect();
    let sites = sd.unet.cross_attention_sites();
    let identifier = req.identifier.as_deref();
    let (captured, latents, prompt, subject, hit, warnings) = match &req.source {
        MapsSource::Generation {
            prompt,
            negative_prompt,
            init,
            cfg_scale,
        } => {
            let word = subject_word(sd, prompt, &req.class, identifier, config.subject_token)?;
            let subject = *sd
                .tokenizer
                .word_positions(prompt, &word)?
                .last()
                .expect("non-empty");
            let emb = sd.encode_prompts(prompt, negative_prompt)?;
            let ddim = sd.ddim(req.steps)?;
            check_step(req.step, ddim.timesteps().len())?;
            // The conditional branch: entry 1 of the CFG call, entry 0 without CFG.
            let batch = if *cfg_scale > 1.0 { 1 } else { 0 };
            let mut z = init.to_dtype(sd.dtype())?;
            let mut captured = Vec::new();
            for i in 0..ddim.timesteps().len() {
                if i == req.step {
                    let mut cap = SiteCapture::new(batch, vec![subject], sites.clone(), vec![]);
                    z = sd
                        .cfg_step(&ddim, &z, i, &emb, *cfg_scale, &mut cap)?
                        .latents;
                    captured = cap.maps;
                } else {
                    z = sd
                        .cfg_step(&ddim, &z, i, &emb, *cfg_scale, &mut NoHook)?
                        .latents;
                }
            }
            (captured, z, prompt.clone(), (word, subject), None, vec![])
        }
        MapsSource::Reference {
            image,
            model_key,
            cache_dir,
        } => {
            let setup = reference_setup(
                sd,
                config,
                &ReferenceSpec {
                    reference: image,
                    class: &req.class,
                    identifier,
                    model_key,
                    steps: req.steps,
                    height: req.height,
                    width: req.width,
                },
            )?;
            let word = subject_word(
                sd,
                &setup.prompt,
                &req.class,
                identifier,
                config.subject_token,
            )?;
            let inv = PaletteCache::new(cache_dir).inversion(&setup.key, sd, || {
                let img = load_reference_image(image, req.height, req.width)?;
                invert(sd, &img, &setup.prompt, req.steps, &config.inversion)
            })?;
            let n = inv.value.report.steps;
            check_step(req.step, n)?;
            let ddim = sd.ddim(n)?;
            let nulls: Vec<Tensor> = (0..n)
                .map(|i| inv.value.null_embeddings.narrow(0, i, 1))
                .collect::<candle_core::Result<_>>()?;
            let cond = sd.encode_prompt(&setup.prompt)?;
            // As the palette replays it (`palette_from_embeddings`).
            let cfg_scale = config.inversion.guidance_scale;
            let batch = if cfg_scale > 1.0 { 1 } else { 0 };
            let mut captured = Vec::new();
            let trajectory = replay(
                sd,
                &ddim,
                &inv.value.z_t,
                &nulls,
                &cond,
                cfg_scale,
                n,
                &mut |i| {
                    (i == req.step).then(|| {
                        SiteCapture::new(batch, vec![setup.subject], sites.clone(), vec![])
                    })
                },
                &mut |_, cap| {
                    captured = cap.maps;
                    Ok(())
                },
            )?;
            let latents = trajectory.last().cloned().unwrap_or(inv.value.z_t.clone());
            let hit = inv.hit();
            (
                captured,
                latents,
                setup.prompt,
                (word, setup.subject),
                Some(hit),
                inv.warning.into_iter().collect(),
            )
        }
    };
    let ddim = sd.ddim(req.steps)?;
    let timestep = ddim.timesteps()[req.step];
    let layers = layer_maps(config, &captured, &appearance)?;
    Ok(AttentionMaps {
        layers,
        context: MapsContext {
            prompt,
            subject_word: subject.0,
            subject_token: subject.1,
            step: req.step,
            steps: req.steps,
            timestep,
            tau: config.tau,
        },
        latents,
        inversion_cache_hit: hit,
        cache_warnings: warnings,
    })
}

/// Each captured `(site, [1, hw])` map with its normalization, its smoothing and (at the
/// `appearance` sites) its mask, as the losses compute them.
fn layer_maps(
    config: &GuidanceConfig,
    captured: &[(String, Tensor)],
    appearance: &[String],
) -> Result<Vec<LayerMaps>> {
    // The masks as `guide::generated_masks` and the palette make them: the map normalized in the
    // capture's dtype, compared with τ on the device, in one device→host copy.
    let mut normalized = Vec::with_capacity(captured.len());
    for (_, map) in captured {
        normalized.push(min_max_normalize(&map.detach())?.squeeze(0)?);
    }
    let masked: Vec<usize> = (0..captured.len())
        .filter(|&k| appearance.contains(&captured[k].0))
        .collect();
    let to_mask: Vec<Tensor> = masked.iter().map(|&k| normalized[k].clone()).collect();
    let mut indices = mask_indices_many(&to_mask, config.tau)?.into_iter();
    let mut out = Vec::with_capacity(captured.len());
    for (k, ((site, map), norm)) in captured.iter().zip(&normalized).enumerate() {
        let square = to_square(&map.detach())?;
        let (_, h, w) = square.dims3()?;
        // The layout loss smooths in at least f32 (`layout_loss` → `loss_precision`).
        let smoothed = layout_maps(&loss_precision(&square)?, config.kernel, config.sigma)?;
        let mask = if masked.contains(&k) {
            let mut flags = vec![0u8; h * w];
            for i in indices.next().expect("one per appearance layer") {
                flags[i as usize] = 1;
            }
            Some(Tensor::from_vec(flags, (h, w), &candle_core::Device::Cpu)?)
        } else {
            None
        };
        let f32_square = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .reshape((h, w))?
                .to_device(&candle_core::Device::Cpu)?)
        };
        out.push(LayerMaps {
            order: k + 1,
            site: site.clone(),
            height: h,
            width: w,
            attention: f32_square(&square)?,
            normalized: f32_square(norm)?,
            smoothed: f32_square(&smoothed)?,
            mask,
        });
    }
    Ok(out)
}
