//! Palette extraction (SPEC §7): replay an inversion and keep, at each appearance step, the
//! conditional branch's transformer-block outputs and the subject masks from their `attn2` maps.

use crate::capture::{attn2_site, SiteCapture};
use crate::config::GuidanceConfig;
use crate::error::{Error, Result};
use crate::guide::{Palette, ReferenceLayer};
use crate::inversion::{replay, Inversion};
use crate::maps::{mask_indices, min_max_normalize};
use candle_core::Tensor;
use diffusion::pipeline::StableDiffusion;

/// What to keep from a replay.
#[derive(Debug, Clone)]
pub struct PaletteSpec<'a> {
    /// Position of the subject token in the conditioning.
    pub subject_token: usize,
    /// Transformer-block sites whose outputs (and `attn2` maps) are kept.
    pub sites: &'a [String],
    /// Mask threshold τ.
    pub tau: f64,
    /// Classifier-free guidance scale of the replay (the inversion's).
    pub cfg_scale: f64,
    /// Sampling steps whose features are kept.
    pub steps: std::ops::Range<usize>,
}

impl<'a> PaletteSpec<'a> {
    /// The palette `config` asks for at `sites`, with the subject token at `subject_token`.
    pub fn new(config: &GuidanceConfig, sites: &'a [String], subject_token: usize) -> Self {
        PaletteSpec {
            subject_token,
            sites,
            tau: config.tau,
            cfg_scale: config.inversion.guidance_scale,
            steps: config.appearance_window.range(),
        }
    }
}

/// The palette of an inversion replayed with the text prompt `prompt`: its embedding, then
/// [`palette_from_embeddings`].
pub fn palette_from_inversion(
    sd: &StableDiffusion,
    inv: &Inversion,
    prompt: &str,
    spec: &PaletteSpec<'_>,
) -> Result<Palette> {
    let cond = sd.encode_prompt(prompt)?;
    palette_from_embeddings(sd, inv, &cond, spec)
}

/// The palette of an inversion replayed with the conditional embedding `cond` (for conditionings
/// a string cannot express, such as BLIP's query-bearing context embeddings).
///
/// # Shapes
/// `cond`: `[1, seq, dim]`.
pub fn palette_from_embeddings(
    sd: &StableDiffusion,
    inv: &Inversion,
    cond: &Tensor,
    spec: &PaletteSpec<'_>,
) -> Result<Palette> {
    let n = inv.report.steps;
    let ddim = sd.ddim(n)?;
    let nulls: Vec<Tensor> = (0..n)
        .map(|i| inv.null_embeddings.narrow(0, i, 1))
        .collect::<candle_core::Result<_>>()?;
    let batch = if spec.cfg_scale > 1.0 { 1 } else { 0 };
    let sites = spec.sites;
    let attn: Vec<String> = sites.iter().map(|s| attn2_site(s)).collect();
    let mut palette = Palette::default();
    replay(
        sd,
        &ddim,
        &inv.z_t,
        &nulls,
        cond,
        spec.cfg_scale,
        spec.steps.end.min(n),
        &mut |i| {
            spec.steps.contains(&i).then(|| {
                SiteCapture::new(
                    batch,
                    vec![spec.subject_token],
                    attn.clone(),
                    sites.to_vec(),
                )
            })
        },
        &mut |i, cap| {
            let mut layers = Vec::new();
            for site in sites {
                let missing = || Error::UnknownSite {
                    site: site.clone(),
                    available: sd.unet.transformer_block_sites(),
                };
                let map = cap.map(&attn2_site(site)).ok_or_else(missing)?;
                let norm = min_max_normalize(map)?.squeeze(0)?;
                layers.push(ReferenceLayer {
                    site: site.clone(),
                    features: cap.block(site).ok_or_else(missing)?.detach(),
                    mask: mask_indices(&norm, spec.tau)?,
                });
            }
            palette.steps.insert(i, layers);
            Ok(())
        },
    )?;
    Ok(palette)
}
