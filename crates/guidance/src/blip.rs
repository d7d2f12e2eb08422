//! Pick-and-Draw on the BLIP-Diffusion baseline (SPEC §7, issue 7): the same guidance as the
//! Stable Diffusion baselines, with the BLIP conditioning in place of the text prompt.
//!
//! - **Appearance palette**: null-text inversion of the reference image on the BLIP folder's own
//!   UNet ([`BlipDiffusionPipeline::sd`]) with the BLIP context embeddings of the inversion prompt
//!   (SPEC §7's "method's rendering of `a {class}`": BLIP's built prompt `a {class} , a {class} …`
//!   with the reference's query embeddings inserted), so the replay attends to the same subject
//!   token (the class word after the queries) as the guided generation; the null-text optimization
//!   starts from BLIP's unconditional embedding of the empty prompt. Replay and capture by
//!   [`crate::palette::palette_from_embeddings`]; cached like the other baselines.
//! - **Layout template**: the base Stable Diffusion with the identifier-free class prompt
//!   (default: the first copy of the BLIP prompt, `a dog in the jungle`), same initial latent;
//!   from the template cache shared with the other guided methods.
//! - **Guided sampling**: [`guided_sample`] with the BLIP conditioning's [`PromptEmbeddings`];
//!   subject token = the last token of the target class word after query insertion; layout tokens
//!   = the first prompt copy's word tokens, matched by position with the template's word tokens
//!   (when the copy is `a {class}` followed by a prompt kept whole, e.g. `a dog a red dog`, the
//!   leading `a {class}` is dropped before matching, like an identifier).

use crate::cache::{file_sha256, CacheKey};
use crate::config::GuidanceConfig;
use crate::error::{Error, Result};
use crate::guide::{GuidedRun, Palette, TokenMatch};
use crate::inversion::{invert_embeddings, load_reference_image};
use crate::layout::{match_tokens, word_ids};
use crate::palette::PaletteSpec;
use crate::pipeline::{
    appearance_sites, cached_palette, timed_layout_template, traced_sample, PickAndDraw,
    TemplateRequest, Timings,
};
use diffusion::blip::{
    pipeline::read_reference, BlipConditioning, BlipDiffusionPipeline, BlipRequest,
};
use diffusion::pipeline::{PromptEmbeddings, StableDiffusion};
use diffusion::tokenizer::ClipTokenizer;
use std::path::PathBuf;

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
    /// Holds the inversions, palettes and layout templates.
    pub cache_dir: PathBuf,
    pub trace: Option<PathBuf>,
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
    let reference = read_reference(&req.reference)?;
    Ok(pipe.blip.condition(
        &reference,
        &req.subject_category,
        "",
        target_category(req),
        "",
        req.prompt_settings,
    )?)
}

/// The subject token: the last token of the target class word after query insertion.
fn subject_position(
    tokenizer: &ClipTokenizer,
    cond: &BlipConditioning,
    class: &str,
) -> Result<usize> {
    let positions = cond.word_positions(tokenizer, class)?;
    Ok(*positions.last().expect("word_positions is non-empty"))
}

/// The reference palette of a guided BLIP request, from the cache when it holds it. The cache
/// key's prompt names the method, the source category and the built inversion prompt, so SD
/// palettes of the same image never collide with BLIP's.
pub fn blip_reference_palette(
    pipe: &BlipDiffusionPipeline,
    config: &GuidanceConfig,
    req: &BlipPickAndDrawRequest,
    timings: &mut Timings,
) -> Result<Palette> {
    let sd = &pipe.sd;
    let r = &req.blip;
    let sites = appearance_sites(sd, config)?;
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
        inversion: format!("{:?}", config.inversion),
        dtype: format!("{:?}", sd.dtype()),
    };
    let c = cond.cond.to_dtype(sd.dtype())?;
    cached_palette(
        sd,
        &req.cache_dir,
        &key,
        &PaletteSpec::new(config, &sites, subject),
        &c,
        || {
            let img = load_reference_image(&r.reference, r.height, r.width)?;
            let empty = pipe.blip.encode_negative("")?;
            invert_embeddings(
                sd,
                &img,
                &c,
                &empty.to_dtype(sd.dtype())?,
                r.steps,
                &config.inversion,
            )
        },
        timings,
    )
}

/// The guided generation's token positions in the BLIP conditioning and the template's matched
/// positions, in the same order (see the module header).
pub fn blip_prompt_tokens(
    tokenizer: &ClipTokenizer,
    cond: &BlipConditioning,
    class: &str,
    base: &ClipTokenizer,
    template: &str,
) -> Result<TokenMatch> {
    let subject = subject_position(tokenizer, cond, class)?;
    let positions = cond.single_prompt_positions(tokenizer)?;
    let personal = word_ids(tokenizer, &cond.single_prompt)?;
    let t = word_ids(base, template)?;
    let pairs = match match_tokens(&personal, &[], &t) {
        Ok(p) => p,
        Err(exact) => {
            // `a {class} a red {class}`: drop the prefix the pipeline prepends.
            let prefix = word_ids(tokenizer, &format!("a {class}"))?;
            if personal.starts_with(&prefix) {
                match_tokens(&personal, &prefix, &t).map_err(|_| exact)?
            } else {
                return Err(exact);
            }
        }
    };
    // `match_tokens` counts the start token: position p is word p − 1 of the single prompt.
    Ok(TokenMatch::from_pairs(
        subject,
        pairs.into_iter().map(|(p, t)| (positions[p - 1], t)),
    ))
}

/// Generates one BLIP-Diffusion image's latents with Pick-and-Draw: the palette from the
/// reference image on the BLIP folder's UNet, the layout template from `base` (vanilla Stable
/// Diffusion; `&pipe.sd` uses the folder's own UNet with plain text conditioning), guided
/// sampling with the BLIP conditioning.
pub fn pick_and_draw_blip(
    pipe: &BlipDiffusionPipeline,
    base: &StableDiffusion,
    config: &GuidanceConfig,
    req: &BlipPickAndDrawRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<PickAndDraw> {
    config.validate()?;
    let r = &req.blip;
    if r.subject_category.trim().is_empty() {
        return Err(Error::MissingSubjectCategory);
    }
    let sd = &pipe.sd;
    let init = pipe.initial_latents(r)?;
    let conditioning = pipe.condition(r)?;
    let template = req
        .template_prompt
        .clone()
        .unwrap_or_else(|| conditioning.single_prompt.clone());
    let tokens = blip_prompt_tokens(
        &pipe.blip.tokenizer,
        &conditioning,
        target_category(r),
        &base.tokenizer,
        &template,
    )?;
    let mut timings = Timings::default();
    let palette = if config.appearance_within(req.blip.steps) {
        Some(blip_reference_palette(pipe, config, req, &mut timings)?)
    } else {
        None
    };
    let tmaps = timed_layout_template(
        base,
        config,
        &TemplateRequest {
            prompt: &template,
            negative_prompt: &r.negative_prompt,
            init: &init,
            steps: r.steps,
            cfg_scale: r.cfg_scale,
            tokens: &tokens.template,
            window: config.layout_window.range(),
        },
        &req.cache_dir,
        &mut timings,
    )?;
    let emb = PromptEmbeddings {
        uncond: conditioning.uncond.to_dtype(sd.dtype())?,
        cond: conditioning.cond.to_dtype(sd.dtype())?,
    };
    let run = GuidedRun {
        sd,
        config,
        emb: &emb,
        steps: r.steps,
        cfg_scale: r.cfg_scale,
        tokens: tokens.prompt,
        palette: palette.as_ref(),
        templates: tmaps.as_deref(),
    };
    let traces: Vec<PathBuf> = req.trace.iter().cloned().collect();
    traced_sample(&run, &init, &traces, timings, on_step)
}
