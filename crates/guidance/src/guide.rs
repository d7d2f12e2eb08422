//! The Pick-and-Draw loss at a latent and the guided sampler (SPEC §7): per guided step,
//! `iterations` updates `z ← z − η ∇_z (α ℓ_app + β ℓ_lay)` from the conditional branch alone,
//! then the normal CFG DDIM step.
//!
//! Batches: N images that share the prompt, the reference and the settings are guided together,
//! one UNet call per gradient pass on the N conditional branches. The batch loss is the sum of the
//! images' losses; since no UNet layer mixes batch entries, each image's gradient is the gradient
//! of its own loss (its own masks, normalization and template maps), and each image's update is
//! applied, skipped or aborted on its own gradient's norm.

use crate::appearance::{appearance_loss, AppearanceLayer, MaskSize};
use crate::capture::{attn2_site, BatchCapture, SiteCapture};
use crate::config::{GuidanceConfig, NonFinite};
use crate::error::{Error, Result};
use crate::layout::{layout_loss, match_tokens, to_square, word_ids};
use crate::maps::{mask_indices_many, min_max_normalize};
use crate::trace::TraceRow;
use candle_core::{DType, Tensor, Var};
use diffusion::hooks::NoHook;
use diffusion::pipeline::{repeat_batch, PromptEmbeddings, StableDiffusion};
use diffusion::unet::UNet2DConditionModel;
use std::collections::BTreeMap;

/// One reference layer at one step: features and subject mask from the inverted trajectory.
#[derive(Debug, Clone)]
pub struct ReferenceLayer {
    /// Transformer-block site.
    pub site: String,
    /// `[hw, channels]`.
    pub features: Tensor,
    pub mask: Vec<u32>,
}

/// The appearance palette: reference layers per sampling step (appearance steps only).
#[derive(Debug, Clone, Default)]
pub struct Palette {
    pub steps: BTreeMap<usize, Vec<ReferenceLayer>>,
}

/// The template's maps per layout step: `(attn2 site, [k, hw])` for the k matched tokens.
#[derive(Debug, Clone, Default)]
pub struct TemplateMaps {
    pub steps: BTreeMap<usize, Vec<(String, Tensor)>>,
}

/// What the loss at one step needs besides the latent.
pub struct StepTargets<'a> {
    /// Reference layers when the appearance loss is active at this step.
    pub appearance: Option<&'a [ReferenceLayer]>,
    /// Template maps when the layout loss is active at this step.
    pub layout: Option<&'a [(String, Tensor)]>,
}

/// Token positions of the generated prompt the losses look at.
#[derive(Debug, Clone)]
pub struct PromptTokens {
    /// The subject token (the class noun's last token, or the pseudo-word).
    pub subject: usize,
    /// Word tokens matched with the template, in template order.
    pub layout: Vec<usize>,
}

/// The losses at one latent.
pub struct StepLoss {
    /// `α ℓ_app + β ℓ_lay` over the active terms (scalar, in the graph of `z`).
    pub total: Tensor,
    pub loss_app: Option<f64>,
    pub loss_lay: Option<f64>,
    pub masks: Vec<MaskSize>,
    pub skipped: usize,
}

/// The capture of a gradient pass (batch entry 0): the maps of the subject and layout tokens at the
/// `attn2` sites the active loss terms read and the block outputs of the appearance layers; it
/// ends the forward pass as soon as it holds them all.
pub fn step_capture(tokens: &PromptTokens, targets: &StepTargets<'_>) -> SiteCapture {
    let mut capture_tokens = vec![tokens.subject];
    capture_tokens.extend(&tokens.layout);
    let mut attention_sites = Vec::new();
    let mut block_sites = Vec::new();
    if let Some(reference) = targets.appearance {
        for l in reference {
            attention_sites.push(attn2_site(&l.site));
            block_sites.push(l.site.clone());
        }
    }
    if let Some(template) = targets.layout {
        for (site, _) in template {
            if !attention_sites.contains(site) {
                attention_sites.push(site.clone());
            }
        }
    }
    let mut cap = SiteCapture::new(0, capture_tokens, attention_sites, block_sites);
    cap.stop_when_complete = true;
    cap
}

/// The weighted Pick-and-Draw loss at latent `z` (conditional branch only).
///
/// # Shapes
/// - `z`: `[1, 4, h, w]`; `cond`: `[1, 77, dim]`
pub fn step_loss(
    unet: &UNet2DConditionModel,
    config: &GuidanceConfig,
    z: &Tensor,
    timestep: usize,
    cond: &Tensor,
    tokens: &PromptTokens,
    targets: &StepTargets<'_>,
) -> Result<StepLoss> {
    let one = std::slice::from_ref(targets);
    let mut losses = batch_step_loss(unet, config, z, timestep, cond, tokens, one)?;
    Ok(losses.remove(0))
}

/// The losses of a batch of latents, one per image, from one UNet call on the N conditional
/// branches; image `i` is scored against `targets[i]`. Device→host copies: one for every subject
/// mask of the batch, one for every loss value (plus the exact EMD's cost matrices).
///
/// # Shapes
/// - `z`: `[N, 4, h, w]`; `cond`: `[1, 77, dim]` (the prompt shared by the batch)
pub fn batch_step_loss(
    unet: &UNet2DConditionModel,
    config: &GuidanceConfig,
    z: &Tensor,
    timestep: usize,
    cond: &Tensor,
    tokens: &PromptTokens,
    targets: &[StepTargets<'_>],
) -> Result<Vec<StepLoss>> {
    let pending = pending_losses(unet, config, z, timestep, cond, tokens, targets)?;
    let (losses, _) = read_losses(pending, None)?;
    Ok(losses)
}

/// An image's losses before their values are read back: scalars on the device.
struct PendingLoss {
    total: Tensor,
    app: Option<Tensor>,
    lay: Option<Tensor>,
    masks: Vec<MaskSize>,
    skipped: usize,
}

/// [`batch_step_loss`] up to the loss tensors (the masks read back, nothing else).
fn pending_losses(
    unet: &UNet2DConditionModel,
    config: &GuidanceConfig,
    z: &Tensor,
    timestep: usize,
    cond: &Tensor,
    tokens: &PromptTokens,
    targets: &[StepTargets<'_>],
) -> Result<Vec<PendingLoss>> {
    let n = z.dim(0)?;
    if targets.len() != n {
        return Err(Error::Shape {
            what: "latents of a guided batch (one per set of targets)",
            expected: format!("[{}, 4, h, w]", targets.len()),
            got: z.dims().to_vec(),
        });
    }
    let mut cap = BatchCapture::new(
        targets
            .iter()
            .enumerate()
            .map(|(i, t)| SiteCapture {
                batch: i,
                ..step_capture(tokens, t)
            })
            .collect(),
    );
    // The forward ends at the last captured site; its output is not needed.
    let _ = unet.forward_until(z, timestep as f64, &repeat_batch(cond, n)?, &mut cap)?;
    let masks = generated_masks(unet, config, &cap.entries, targets)?;
    cap.entries
        .iter()
        .zip(targets)
        .zip(masks)
        .map(|((c, t), m)| image_loss(unet, config, c, z, tokens, t, m))
        .collect()
}

/// The error for a site the capture lacks.
fn missing_site(unet: &UNet2DConditionModel, site: &str) -> Error {
    Error::UnknownSite {
        site: site.to_string(),
        available: unet.transformer_block_sites(),
    }
}

/// The generated subject masks `[Â ≥ τ]` of every image's appearance layers, in one device→host
/// copy for the whole batch (the masks' sizes shape the appearance loss, so they must cross).
fn generated_masks(
    unet: &UNet2DConditionModel,
    config: &GuidanceConfig,
    caps: &[SiteCapture],
    targets: &[StepTargets<'_>],
) -> Result<Vec<Vec<Vec<u32>>>> {
    let mut maps = Vec::new();
    let mut counts = Vec::with_capacity(caps.len());
    for (cap, t) in caps.iter().zip(targets) {
        let reference = t.appearance.unwrap_or(&[]);
        for l in reference {
            let map = cap
                .map(&attn2_site(&l.site))
                .ok_or_else(|| missing_site(unet, &l.site))?;
            maps.push(min_max_normalize(&map.detach().narrow(0, 0, 1)?)?.squeeze(0)?);
        }
        counts.push(reference.len());
    }
    let mut all = mask_indices_many(&maps, config.tau)?.into_iter();
    Ok(counts
        .into_iter()
        .map(|c| all.by_ref().take(c).collect())
        .collect())
}

/// One image's losses from its captures and its generated masks (one per appearance layer).
fn image_loss(
    unet: &UNet2DConditionModel,
    config: &GuidanceConfig,
    cap: &SiteCapture,
    z: &Tensor,
    tokens: &PromptTokens,
    targets: &StepTargets<'_>,
    gen_masks: Vec<Vec<u32>>,
) -> Result<PendingLoss> {
    let missing = |site: &str| missing_site(unet, site);
    let mut total: Option<Tensor> = None;
    let mut out = PendingLoss {
        total: Tensor::zeros((), z.dtype(), z.device())?,
        app: None,
        lay: None,
        masks: Vec::new(),
        skipped: 0,
    };
    if let Some(reference) = targets.appearance {
        let layers = reference
            .iter()
            .zip(&gen_masks)
            .map(|(l, gm)| {
                Ok(AppearanceLayer {
                    site: &l.site,
                    reference: &l.features,
                    reference_mask: &l.mask,
                    generated: cap.block(&l.site).ok_or_else(|| missing(&l.site))?,
                    generated_mask: gm,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let app = appearance_loss(&layers, config.distance)?;
        out.app = Some(app.loss.detach());
        out.masks = app.masks;
        out.skipped = app.skipped;
        total = Some((app.loss * config.alpha)?);
    }
    if let Some(template) = targets.layout {
        let k = tokens.layout.len();
        let pairs = template
            .iter()
            .map(|(site, temp)| {
                let gen = cap
                    .map(site)
                    .ok_or_else(|| missing(site))?
                    .narrow(0, 1, k)?;
                Ok((to_square(&gen)?, to_square(temp)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let lay = layout_loss(&pairs, config.kernel, config.sigma)?;
        out.lay = Some(lay.detach());
        let weighted = (lay * config.beta)?;
        total = Some(match total {
            Some(t) => (t + weighted)?,
            None => weighted,
        });
    }
    if let Some(t) = total {
        out.total = t;
    }
    Ok(out)
}

/// The loss values of a batch, and the gradient norms `norms` (`[N]`) when given, in one
/// device→host copy.
fn read_losses(
    pending: Vec<PendingLoss>,
    norms: Option<&Tensor>,
) -> Result<(Vec<StepLoss>, Vec<f64>)> {
    let mut parts: Vec<Tensor> = Vec::new();
    for p in &pending {
        for t in p.app.iter().chain(&p.lay) {
            parts.push(t.to_dtype(DType::F64)?.reshape(1)?);
        }
    }
    if let Some(n) = norms {
        parts.push(n.to_dtype(DType::F64)?);
    }
    let mut values = if parts.is_empty() {
        Vec::new()
    } else {
        crate::readback::to_host::<f64>(&Tensor::cat(&parts, 0)?)?
    }
    .into_iter();
    let mut next = |t: &Option<Tensor>| t.as_ref().map(|_| values.next().expect("one per loss"));
    let losses = pending
        .into_iter()
        .map(|p| StepLoss {
            loss_app: next(&p.app),
            loss_lay: next(&p.lay),
            total: p.total,
            masks: p.masks,
            skipped: p.skipped,
        })
        .collect();
    Ok((losses, values.collect()))
}

/// The losses at a latent and their gradient.
pub struct StepGradient {
    pub loss: StepLoss,
    /// `∇_z` of `loss.total`, like `z`.
    pub grad: Tensor,
}

/// The gradient of [`step_loss`] with respect to `z`, zeros when the loss does not depend on it.
pub fn step_gradient(
    unet: &UNet2DConditionModel,
    config: &GuidanceConfig,
    z: &Tensor,
    timestep: usize,
    cond: &Tensor,
    tokens: &PromptTokens,
    targets: &StepTargets<'_>,
) -> Result<StepGradient> {
    let one = std::slice::from_ref(targets);
    let mut g = batch_step_gradient(unet, config, z, timestep, cond, tokens, one)?;
    Ok(StepGradient {
        loss: g.losses.remove(0),
        grad: g.grad,
    })
}

/// The losses of a batch and their gradient.
pub struct BatchStepGradient {
    /// One per image.
    pub losses: Vec<StepLoss>,
    /// `∇_z` of the summed losses, like `z`: entry `i` is the gradient of image `i`'s loss.
    pub grad: Tensor,
    /// The L2 norm of each image's gradient (`grad[i]`), computed in f64; NaN or infinite when
    /// the gradient is not finite.
    pub grad_norms: Vec<f64>,
}

/// The gradient of the summed [`batch_step_loss`] with respect to `z` (`[N, 4, h, w]`), zeros
/// when the loss does not depend on it. Device→host copies: one for every subject mask of the
/// batch, one for every loss value and gradient norm (plus the exact EMD's cost matrices).
pub fn batch_step_gradient(
    unet: &UNet2DConditionModel,
    config: &GuidanceConfig,
    z: &Tensor,
    timestep: usize,
    cond: &Tensor,
    tokens: &PromptTokens,
    targets: &[StepTargets<'_>],
) -> Result<BatchStepGradient> {
    let var = Var::from_tensor(&z.detach())?;
    let pending = pending_losses(
        unet,
        config,
        var.as_tensor(),
        timestep,
        cond,
        tokens,
        targets,
    )?;
    let mut total = pending[0].total.clone();
    for l in &pending[1..] {
        total = (total + &l.total)?;
    }
    let grad = match total.backward()?.remove(var.as_tensor()) {
        Some(g) => g,
        None => z.zeros_like()?,
    };
    let norms = grad
        .to_dtype(DType::F64)?
        .sqr()?
        .flatten_from(1)?
        .sum(1)?
        .sqrt()?;
    let (losses, grad_norms) = read_losses(pending, Some(&norms))?;
    Ok(BatchStepGradient {
        losses,
        grad,
        grad_norms,
    })
}

/// Everything a guided sampling run needs.
pub struct GuidedRun<'a> {
    pub sd: &'a StableDiffusion,
    pub config: &'a GuidanceConfig,
    pub emb: &'a PromptEmbeddings,
    pub steps: usize,
    pub cfg_scale: f64,
    pub tokens: PromptTokens,
    /// The reference palette, shared by the batch; required when the appearance loss is on.
    pub palette: Option<&'a Palette>,
    /// One template per image of the batch (a template depends on the image's initial latents);
    /// required when the layout loss is on.
    pub templates: Option<&'a [TemplateMaps]>,
}

/// Guided DDIM sampling of a batch from `init` (`[N, 4, h, w]`); `trace(image, row)` receives one
/// row per image and update.
pub fn guided_sample(
    run: &GuidedRun<'_>,
    init: &Tensor,
    trace: &mut dyn FnMut(usize, &TraceRow) -> Result<()>,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let ddim = run.sd.ddim(run.steps)?;
    let n = ddim.timesteps().len();
    let images = init.dim(0)?;
    let templates = run.templates.map_or(images, <[_]>::len);
    if images == 0 || templates != images {
        return Err(Error::Shape {
            what: "initial latents of a guided batch (one per template)",
            expected: format!("[{}, 4, h, w]", templates.max(1)),
            got: init.dims().to_vec(),
        });
    }
    let mut z = init.clone();
    for i in 0..n {
        let t = ddim.timesteps()[i];
        let appearance = targets_at(
            run.config.appearance_at(i),
            run.palette.map(|p| &p.steps),
            Error::MissingPalette,
            "reference palette",
            i,
        )?;
        let layouts = (0..images)
            .map(|b| {
                targets_at(
                    run.config.layout_at(i),
                    run.templates.map(|t| &t[b].steps),
                    Error::MissingTemplate,
                    "template maps",
                    i,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        if appearance.is_some() || layouts.iter().any(Option::is_some) {
            let targets: Vec<StepTargets> = layouts
                .into_iter()
                .map(|layout| StepTargets { appearance, layout })
                .collect();
            for it in 0..run.config.iterations {
                let BatchStepGradient {
                    losses,
                    grad,
                    grad_norms,
                } = batch_step_gradient(
                    &run.sd.unet,
                    run.config,
                    &z,
                    t,
                    &run.emb.cond,
                    &run.tokens,
                    &targets,
                )?;
                let mut updated = Vec::with_capacity(images);
                for (b, (loss, norm)) in losses.into_iter().zip(grad_norms).enumerate() {
                    let (zb, gb) = (z.narrow(0, b, 1)?, grad.narrow(0, b, 1)?);
                    let finite = norm.is_finite();
                    if finite {
                        updated.push((zb - (gb * run.config.eta)?)?);
                    } else if run.config.nonfinite == NonFinite::Abort {
                        return Err(Error::NonFinite {
                            image: b,
                            step: i,
                            iteration: it,
                        });
                    } else {
                        updated.push(zb);
                    }
                    trace(
                        b,
                        &TraceRow {
                            step: i,
                            iteration: it,
                            loss_app: loss.loss_app,
                            loss_lay: loss.loss_lay,
                            grad_norm: finite.then_some(norm),
                            masks: loss.masks,
                            skipped_layers: loss.skipped,
                            non_finite: !finite,
                        },
                    )?;
                }
                z = Tensor::cat(&updated, 0)?.detach();
            }
        }
        z = run
            .sd
            .cfg_step(&ddim, &z, i, run.emb, run.cfg_scale, &mut NoHook)?
            .latents
            .detach();
        on_step(i + 1, n);
    }
    Ok(z)
}

/// The entry of step `i` of per-step targets when their loss term is `on` at `i`; `absent` when
/// there are no such targets at all.
fn targets_at<'a, T>(
    on: bool,
    steps: Option<&'a BTreeMap<usize, Vec<T>>>,
    absent: Error,
    what: &'static str,
    i: usize,
) -> Result<Option<&'a [T]>> {
    if !on {
        return Ok(None);
    }
    let steps = steps.ok_or(absent)?;
    match steps.get(&i) {
        Some(v) => Ok(Some(v.as_slice())),
        None => Err(Error::MissingStep { what, step: i }),
    }
}

/// The template (SPEC §7): unguided CFG sampling of `sd` (the base model) with the
/// identifier-free prompt from `init`, keeping the conditional branch's maps of `tokens` at every
/// cross-attention site for the steps of `window`; stops after the last such step.
pub fn template_maps(
    sd: &StableDiffusion,
    emb: &PromptEmbeddings,
    init: &Tensor,
    steps: usize,
    cfg_scale: f64,
    tokens: &[usize],
    window: std::ops::Range<usize>,
) -> Result<TemplateMaps> {
    let ddim = sd.ddim(steps)?;
    let n = ddim.timesteps().len();
    let sites = sd.unet.cross_attention_sites();
    let batch = if cfg_scale > 1.0 { 1 } else { 0 };
    let mut z = init.clone();
    let mut out = TemplateMaps::default();
    for i in 0..window.end.min(n) {
        if window.contains(&i) {
            let mut cap = SiteCapture::new(batch, tokens.to_vec(), sites.clone(), vec![]);
            z = sd.cfg_step(&ddim, &z, i, emb, cfg_scale, &mut cap)?.latents;
            let maps = cap
                .maps
                .into_iter()
                .map(|(s, m)| Ok((s, m.detach())))
                .collect::<Result<Vec<_>>>()?;
            out.steps.insert(i, maps);
        } else {
            z = sd
                .cfg_step(&ddim, &z, i, emb, cfg_scale, &mut NoHook)?
                .latents;
        }
    }
    Ok(out)
}

/// The template prompt: `prompt` with the identifier word removed (whitespace-separated words).
pub fn template_prompt(prompt: &str, identifier: Option<&str>) -> String {
    match identifier {
        Some(id) => prompt
            .split_whitespace()
            .filter(|w| *w != id)
            .collect::<Vec<_>>()
            .join(" "),
        None => prompt.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// The generated prompt's token positions and the template's positions matched with them.
#[derive(Debug, Clone)]
pub struct TokenMatch {
    pub prompt: PromptTokens,
    /// The template's positions of `prompt.layout`'s tokens, in the same order.
    pub template: Vec<usize>,
}

impl TokenMatch {
    /// From `(prompt position, template position)` pairs.
    pub(crate) fn from_pairs(
        subject: usize,
        pairs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Self {
        let (layout, template) = pairs.into_iter().unzip();
        TokenMatch {
            prompt: PromptTokens { subject, layout },
            template,
        }
    }
}

/// The token positions of the generated prompt (subject = last token of `subject_word`; layout
/// tokens matched with the template by position once the identifier is removed) and the
/// template's matched positions, in the same order.
pub fn prompt_tokens(
    personal: &diffusion::tokenizer::ClipTokenizer,
    prompt: &str,
    subject_word: &str,
    identifier: Option<&str>,
    base: &diffusion::tokenizer::ClipTokenizer,
    template: &str,
) -> Result<TokenMatch> {
    let subject = *personal
        .word_positions(prompt, subject_word)?
        .last()
        .expect("word_positions is non-empty");
    let p = word_ids(personal, prompt)?;
    let id = match identifier {
        Some(w) => word_ids(personal, w)?,
        None => vec![],
    };
    let t = word_ids(base, template)?;
    Ok(TokenMatch::from_pairs(subject, match_tokens(&p, &id, &t)?))
}
