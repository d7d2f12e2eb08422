//! Pick-and-Draw on the BLIP-Diffusion baseline (SPEC §7, issue 7): the same guidance as the
//! Stable Diffusion baselines, with the BLIP conditioning in place of the text prompt.
//!
//! - **Appearance palette**: null-text inversion of the reference image on the BLIP folder's own
//!   UNet ([`BlipDiffusionPipeline::sd`]) with the BLIP context embeddings of the inversion prompt
//!   (SPEC §7's "method's rendering of `a {class}`": BLIP's built prompt `a {class} , a {class} …`
//!   with the reference's query embeddings inserted), so the replay attends to the same subject
//!   token (the class word after the queries) as the guided generation; the null-text optimization
//!   starts from BLIP's unconditional embedding of the empty prompt. Replay and capture as
//!   [`crate::inversion::palette_from_inversion`] does them; cached like the other baselines.
//! - **Layout template**: the base Stable Diffusion with the identifier-free class prompt
//!   (default: the first copy of the BLIP prompt, `a dog in the jungle`), same initial latent.
//! - **Guided sampling**: [`guided_sample`] with the BLIP conditioning's [`PromptEmbeddings`];
//!   subject token = the last token of the target class word after query insertion; layout tokens
//!   = the first prompt copy's word tokens, matched by position with the template's word tokens
//!   (when the copy is `a {class}` followed by a prompt kept whole, e.g. `a dog a red dog`, the
//!   leading `a {class}` is dropped before matching, like an identifier).

use crate::capture::{attn2_site, SiteCapture};
use crate::config::GuidanceConfig;
use crate::error::{Error, Result};
use crate::guide::{
    guided_sample, template_maps, GuidedRun, Palette, PromptTokens, ReferenceLayer,
};
use crate::inversion::{
    file_sha256, load_reference_image, replay, CacheKey, CacheStatus, Inversion, PaletteCache,
};
use crate::maps::{mask_indices, min_max_normalize};
use crate::pipeline::{appearance_sites, Timings};
use crate::trace::{TraceRow, TraceWriter};
use candle_core::Tensor;
use diffusion::blip::{
    pipeline::read_reference, BlipConditioning, BlipDiffusionPipeline, BlipError, BlipRequest,
};
use diffusion::pipeline::{PromptEmbeddings, StableDiffusion};
use diffusion::tokenizer::ClipTokenizer;
use std::path::PathBuf;
use std::time::Instant;

/// One guided BLIP-Diffusion generation.
#[derive(Debug, Clone)]
pub struct BlipPickAndDrawRequest {
    /// The BLIP-Diffusion generation itself (reference image, subject category, BLIP text prompt,
    /// schedule, size, seed or initial latents): with guidance off, exactly
    /// [`BlipDiffusionPipeline::generate`]'s latents.
    pub blip: BlipRequest,
    /// The identifier-free class prompt of the template (`a dog in the jungle`); default: the
    /// first copy of the BLIP prompt ([`BlipConditioning::single_prompt`]).
    pub template_prompt: Option<String>,
    /// Names the model in the cache key (the BLIP-Diffusion model argument).
    pub model_key: String,
    pub cache_dir: PathBuf,
    pub trace: Option<PathBuf>,
}

fn blip_err(e: BlipError) -> Error {
    Error::Invalid {
        what: "BLIP-Diffusion",
        reason: e.to_string(),
    }
}

/// The target class word of a request (the category named in the prompt).
fn target_category(req: &BlipRequest) -> &str {
    req.target_category
        .as_deref()
        .unwrap_or(&req.subject_category)
}

/// The inversion conditioning: BLIP's rendering of `a {class}` (an empty text prompt after the
/// `a {target}` the pipeline prepends), with the reference's query embeddings.
pub fn inversion_conditioning(
    pipe: &BlipDiffusionPipeline,
    req: &BlipRequest,
) -> Result<BlipConditioning> {
    let reference = read_reference(&req.reference).map_err(blip_err)?;
    pipe.blip
        .condition(
            &reference,
            &req.subject_category,
            "",
            target_category(req),
            "",
            req.prompt_settings,
        )
        .map_err(blip_err)
}

/// The subject token: the last token of the target class word after query insertion.
fn subject_position(
    tokenizer: &ClipTokenizer,
    cond: &BlipConditioning,
    class: &str,
) -> Result<usize> {
    let positions = cond.word_positions(tokenizer, class).map_err(blip_err)?;
    Ok(*positions.last().expect("word_positions is non-empty"))
}

pub use crate::inversion::invert_embeddings;

/// The palette of an inversion replayed with the conditional embedding `cond`:
/// [`crate::inversion::palette_from_inversion`] with an embedding in place of a text prompt.
#[allow(clippy::too_many_arguments)]
pub fn palette_from_embeddings(
    sd: &StableDiffusion,
    inv: &Inversion,
    cond: &Tensor,
    subject_token: usize,
    sites: &[String],
    tau: f64,
    cfg_scale: f64,
    steps_needed: std::ops::Range<usize>,
) -> Result<Palette> {
    let n = inv.report.steps;
    let ddim = sd.ddim(n)?;
    let nulls: Vec<Tensor> = (0..n)
        .map(|i| inv.null_embeddings.narrow(0, i, 1))
        .collect::<candle_core::Result<_>>()?;
    let batch = if cfg_scale > 1.0 { 1 } else { 0 };
    let attn: Vec<String> = sites.iter().map(|s| attn2_site(s)).collect();
    let mut palette = Palette::default();
    replay(
        sd,
        &ddim,
        &inv.z_t,
        &nulls,
        cond,
        cfg_scale,
        steps_needed.end.min(n),
        &mut |i| {
            steps_needed
                .contains(&i)
                .then(|| SiteCapture::new(batch, vec![subject_token], attn.clone(), sites.to_vec()))
        },
        &mut |i, cap| {
            let mut layers = Vec::new();
            for site in sites {
                let missing = || Error::Invalid {
                    what: "reference palette",
                    reason: format!("the UNet has no site '{site}'"),
                };
                let map = cap.map(&attn2_site(site)).ok_or_else(missing)?;
                let norm = min_max_normalize(map)?.squeeze(0)?;
                layers.push(ReferenceLayer {
                    site: site.clone(),
                    features: cap.block(site).ok_or_else(missing)?.detach(),
                    mask: mask_indices(&norm, tau)?,
                });
            }
            palette.steps.insert(i, layers);
            Ok(())
        },
    )?;
    Ok(palette)
}

/// The reference palette of a guided BLIP request, from the cache when it holds it. The cache
/// key's prompt names the method, the source category and the built inversion prompt, so SD
/// palettes of the same image never collide with BLIP's.
pub fn blip_reference_palette(
    pipe: &BlipDiffusionPipeline,
    cfg: &GuidanceConfig,
    req: &BlipPickAndDrawRequest,
    timings: &mut Timings,
) -> Result<Palette> {
    let sd = &pipe.sd;
    let r = &req.blip;
    let sites = appearance_sites(sd, cfg)?;
    let cond = inversion_conditioning(pipe, r)?;
    let subject = subject_position(&pipe.blip.tokenizer, &cond, target_category(r))?;
    let key = CacheKey {
        model: req.model_key.clone(),
        image_sha256: file_sha256(&r.reference)?,
        prompt: format!(
            "blip-diffusion|source={}|{}",
            r.subject_category, cond.built_prompt
        ),
        steps: r.steps,
        height: r.height,
        width: r.width,
        scheduler: format!("{:?}", sd.scheduler),
        inversion: format!("{:?}", cfg.inversion),
        dtype: format!("{:?}", sd.dtype()),
    };
    let cache = PaletteCache::new(&req.cache_dir);
    let window = cfg.appearance_window.range();
    let c = cond.cond.to_dtype(sd.dtype())?;
    let t0 = Instant::now();
    let (inv, s1) = cache.inversion(&key, sd, || {
        let img = load_reference_image(&r.reference, r.height, r.width)?;
        let empty = pipe.blip.encode_negative("").map_err(blip_err)?;
        invert_embeddings(
            sd,
            &img,
            &c,
            &empty.to_dtype(sd.dtype())?,
            r.steps,
            &cfg.inversion,
        )
    })?;
    timings.inversion_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (palette, s2) = cache.palette(&key, &sites, cfg.tau, window.clone(), sd, || {
        palette_from_embeddings(
            sd,
            &inv,
            &c,
            subject,
            &sites,
            cfg.tau,
            cfg.inversion.guidance_scale,
            window.clone(),
        )
    })?;
    timings.palette_s = t1.elapsed().as_secs_f64();
    timings.cache_hit = s1 == CacheStatus::Hit && s2 == CacheStatus::Hit;
    Ok(palette)
}

/// Word tokens of a prompt (start, end and padding excluded).
fn word_ids(tok: &ClipTokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok.encode(text)?;
    let n = enc.len_unpadded();
    Ok(enc.ids[1..n.saturating_sub(1).max(1)].to_vec())
}

/// The guided generation's token positions in the BLIP conditioning and the template's matched
/// positions, in the same order (see the module header).
pub fn blip_prompt_tokens(
    tokenizer: &ClipTokenizer,
    cond: &BlipConditioning,
    class: &str,
    base: &ClipTokenizer,
    template: &str,
) -> Result<(PromptTokens, Vec<usize>)> {
    let subject = subject_position(tokenizer, cond, class)?;
    let positions = cond.single_prompt_positions(tokenizer).map_err(blip_err)?;
    let personal = word_ids(tokenizer, &cond.single_prompt)?;
    let t = word_ids(base, template)?;
    let pairs = match crate::layout::match_tokens(&personal, &[], &t) {
        Ok(p) => p,
        Err(exact) => {
            // `a {class} a red {class}`: drop the prefix the pipeline prepends.
            let prefix = word_ids(tokenizer, &format!("a {class}"))?;
            if personal.starts_with(&prefix) {
                crate::layout::match_tokens(&personal, &prefix, &t).map_err(|_| exact)?
            } else {
                return Err(exact);
            }
        }
    };
    // `match_tokens` counts the start token: position p is word p − 1 of the single prompt.
    Ok((
        PromptTokens {
            subject,
            layout: pairs.iter().map(|&(p, _)| positions[p - 1]).collect(),
        },
        pairs.iter().map(|&(_, t)| t).collect(),
    ))
}

/// Generates one BLIP-Diffusion image's latents with Pick-and-Draw: the palette from the
/// reference image on the BLIP folder's UNet, the layout template from `base` (vanilla Stable
/// Diffusion; `&pipe.sd` uses the folder's own UNet with plain text conditioning), guided
/// sampling with the BLIP conditioning. Returns the final latents `[1, 4, h/8, w/8]`.
pub fn pick_and_draw_blip(
    pipe: &BlipDiffusionPipeline,
    base: &StableDiffusion,
    cfg: &GuidanceConfig,
    req: &BlipPickAndDrawRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<(Tensor, Timings)> {
    cfg.validate()?;
    let r = &req.blip;
    if r.subject_category.trim().is_empty() {
        return Err(Error::Invalid {
            what: "BLIP-Diffusion",
            reason: "guided BLIP-Diffusion needs the reference's subject category".into(),
        });
    }
    let sd = &pipe.sd;
    let init = pipe.initial_latents(r).map_err(blip_err)?;
    let conditioning = pipe.condition(r).map_err(blip_err)?;
    let template = req
        .template_prompt
        .clone()
        .unwrap_or_else(|| conditioning.single_prompt.clone());
    let (tokens, template_positions) = blip_prompt_tokens(
        &pipe.blip.tokenizer,
        &conditioning,
        target_category(r),
        &base.tokenizer,
        &template,
    )?;
    let mut timings = Timings::default();
    let palette = if cfg.components.appearance() && !cfg.appearance_window.range().is_empty() {
        Some(blip_reference_palette(pipe, cfg, req, &mut timings)?)
    } else {
        None
    };
    let t0 = Instant::now();
    let tmaps = if cfg.components.layout() && !cfg.layout_window.range().is_empty() {
        let temb = base.encode_prompts(&template, &r.negative_prompt)?;
        Some(template_maps(
            base,
            &temb,
            &init.to_dtype(base.dtype())?,
            r.steps,
            r.cfg_scale,
            &template_positions,
            cfg.layout_window.range(),
        )?)
    } else {
        None
    };
    timings.template_s = t0.elapsed().as_secs_f64();
    let emb = PromptEmbeddings {
        uncond: conditioning.uncond.to_dtype(sd.dtype())?,
        cond: conditioning.cond.to_dtype(sd.dtype())?,
    };
    let run = GuidedRun {
        sd,
        cfg,
        emb: &emb,
        steps: r.steps,
        cfg_scale: r.cfg_scale,
        tokens,
        palette: palette.as_ref(),
        template: tmaps.as_ref(),
    };
    let mut writer = match &req.trace {
        Some(p) => Some(TraceWriter::create(p)?),
        None => None,
    };
    let mut trace = |row: &TraceRow| -> Result<()> {
        if row.non_finite {
            eprintln!(
                "warning: non-finite guidance gradient at step {}, iteration {}; update skipped",
                row.step, row.iteration
            );
        }
        match writer.as_mut() {
            Some(w) => w.write(row),
            None => Ok(()),
        }
    };
    let t1 = Instant::now();
    let z = guided_sample(&run, &init, &mut trace, on_step)?;
    timings.sampling_s = t1.elapsed().as_secs_f64();
    Ok((z, timings))
}
