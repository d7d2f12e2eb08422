//! The Pick-and-Draw loss at a latent and the guided sampler (SPEC §7): per guided step,
//! `iterations` updates `z ← z − η ∇_z (α ℓ_app + β ℓ_lay)` from the conditional branch alone
//! (batch 1), then the normal CFG DDIM step.

use crate::appearance::{appearance_loss, AppearanceLayer, MaskSize};
use crate::capture::{attn2_site, is_capture_complete, SiteCapture};
use crate::config::{GuidanceConfig, NonFinite};
use crate::error::{Error, Result};
use crate::layout::{layout_loss, to_square};
use crate::maps::{mask_indices, min_max_normalize};
use crate::trace::TraceRow;
use candle_core::{DType, Tensor, Var};
use diffusion::hooks::NoHook;
use diffusion::pipeline::{PromptEmbeddings, StableDiffusion};
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

/// The weighted Pick-and-Draw loss at latent `z` (conditional branch only).
///
/// # Shapes
/// - `z`: `[1, 4, h, w]`; `cond`: `[1, 77, dim]`
pub fn step_loss(
    unet: &UNet2DConditionModel,
    cfg: &GuidanceConfig,
    z: &Tensor,
    timestep: usize,
    cond: &Tensor,
    tokens: &PromptTokens,
    targets: &StepTargets<'_>,
) -> Result<StepLoss> {
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
    match unet.forward_with(z, timestep as f64, cond, &mut cap) {
        Ok(_) => {}
        Err(e) if is_capture_complete(&e) => {}
        Err(e) => return Err(e.into()),
    }
    let missing = |site: &str| Error::Invalid {
        what: "guidance capture",
        reason: format!(
            "the UNet has no site '{site}' (sites: {:?})",
            unet.transformer_block_sites()
        ),
    };

    let mut total: Option<Tensor> = None;
    let mut out = StepLoss {
        total: Tensor::zeros((), z.dtype(), z.device())?,
        loss_app: None,
        loss_lay: None,
        masks: Vec::new(),
        skipped: 0,
    };
    if let Some(reference) = targets.appearance {
        let mut gen_masks = Vec::with_capacity(reference.len());
        for l in reference {
            let map = cap
                .map(&attn2_site(&l.site))
                .ok_or_else(|| missing(&l.site))?;
            let subject = min_max_normalize(&map.detach().narrow(0, 0, 1)?)?.squeeze(0)?;
            gen_masks.push(mask_indices(&subject, cfg.tau)?);
        }
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
        let app = appearance_loss(&layers, cfg.distance)?;
        out.loss_app = Some(app.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        out.masks = app.masks;
        out.skipped = app.skipped;
        total = Some((app.loss * cfg.alpha)?);
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
        let lay = layout_loss(&pairs, cfg.kernel, cfg.sigma)?;
        out.loss_lay = Some(lay.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        let weighted = (lay * cfg.beta)?;
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

/// The gradient of [`step_loss`] with respect to `z`, zeros when the loss does not depend on it.
pub fn step_gradient(
    unet: &UNet2DConditionModel,
    cfg: &GuidanceConfig,
    z: &Tensor,
    timestep: usize,
    cond: &Tensor,
    tokens: &PromptTokens,
    targets: &StepTargets<'_>,
) -> Result<(StepLoss, Tensor)> {
    let var = Var::from_tensor(&z.detach())?;
    let loss = step_loss(unet, cfg, var.as_tensor(), timestep, cond, tokens, targets)?;
    let grad = match loss.total.backward()?.remove(var.as_tensor()) {
        Some(g) => g,
        None => z.zeros_like()?,
    };
    Ok((loss, grad))
}

/// Everything a guided sampling run needs.
pub struct GuidedRun<'a> {
    pub sd: &'a StableDiffusion,
    pub cfg: &'a GuidanceConfig,
    pub emb: &'a PromptEmbeddings,
    pub steps: usize,
    pub cfg_scale: f64,
    pub tokens: PromptTokens,
    /// Required when the appearance loss is on.
    pub palette: Option<&'a Palette>,
    /// Required when the layout loss is on.
    pub template: Option<&'a TemplateMaps>,
}

/// Guided DDIM sampling from `init` (`[1, 4, h, w]`); `trace` receives one row per update.
pub fn guided_sample(
    run: &GuidedRun<'_>,
    init: &Tensor,
    trace: &mut dyn FnMut(&TraceRow) -> Result<()>,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let ddim = run.sd.ddim(run.steps)?;
    let n = ddim.timesteps().len();
    let mut z = init.clone();
    for i in 0..n {
        let t = ddim.timesteps()[i];
        let appearance = if run.cfg.appearance_at(i) {
            let palette = run.palette.ok_or_else(|| Error::Invalid {
                what: "guided sampling",
                reason: "the appearance loss is on but there is no reference palette".into(),
            })?;
            Some(
                palette
                    .steps
                    .get(&i)
                    .map(|v| v.as_slice())
                    .ok_or_else(|| Error::Invalid {
                        what: "reference palette",
                        reason: format!("no reference features for step {i}"),
                    })?,
            )
        } else {
            None
        };
        let layout = if run.cfg.layout_at(i) {
            let template = run.template.ok_or_else(|| Error::Invalid {
                what: "guided sampling",
                reason: "the layout loss is on but there are no template maps".into(),
            })?;
            Some(
                template
                    .steps
                    .get(&i)
                    .map(|v| v.as_slice())
                    .ok_or_else(|| Error::Invalid {
                        what: "template maps",
                        reason: format!("no template maps for step {i}"),
                    })?,
            )
        } else {
            None
        };
        if appearance.is_some() || layout.is_some() {
            let targets = StepTargets { appearance, layout };
            for it in 0..run.cfg.iterations {
                let (loss, grad) = step_gradient(
                    &run.sd.unet,
                    run.cfg,
                    &z,
                    t,
                    &run.emb.cond,
                    &run.tokens,
                    &targets,
                )?;
                let norm = grad
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .sqrt()?
                    .to_scalar::<f64>()?;
                let finite = norm.is_finite();
                if finite {
                    z = (z - (grad * run.cfg.eta)?)?.detach();
                } else if run.cfg.nonfinite == NonFinite::Abort {
                    return Err(Error::NonFinite {
                        step: i,
                        iteration: it,
                    });
                }
                trace(&TraceRow {
                    step: i,
                    iteration: it,
                    loss_app: loss.loss_app,
                    loss_lay: loss.loss_lay,
                    grad_norm: finite.then_some(norm),
                    masks: loss.masks,
                    skipped_layers: loss.skipped,
                    non_finite: !finite,
                })?;
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

/// Word tokens of a tokenized prompt (start, end and padding excluded).
fn word_ids(tok: &diffusion::tokenizer::ClipTokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok.encode(text)?;
    let n = enc.len_unpadded();
    Ok(enc.ids[1..n.saturating_sub(1).max(1)].to_vec())
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
) -> Result<(PromptTokens, Vec<usize>)> {
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
    let pairs = crate::layout::match_tokens(&p, &id, &t)?;
    Ok((
        PromptTokens {
            subject,
            layout: pairs.iter().map(|&(a, _)| a).collect(),
        },
        pairs.iter().map(|&(_, b)| b).collect(),
    ))
}
