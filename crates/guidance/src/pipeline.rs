//! One Pick-and-Draw image end to end (SPEC §7): cached null-text inversion and palette of the
//! reference image, template maps from the base model, then guided sampling. Each shared piece
//! is timed separately so the overhead of the guidance itself can be reported.

use crate::config::GuidanceConfig;
use crate::error::{Error, Result};
use crate::guide::{
    guided_sample, prompt_tokens, template_maps, template_prompt, GuidedRun, Palette, TemplateMaps,
};
use crate::inversion::{
    file_sha256, invert, load_reference_image, palette_from_inversion, CacheKey, CacheStatus,
    PaletteCache,
};
use crate::trace::{TraceRow, TraceWriter};
use candle_core::Tensor;
use diffusion::pipeline::StableDiffusion;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to generate with Pick-and-Draw.
#[derive(Debug, Clone)]
pub struct PickAndDrawRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub height: usize,
    pub width: usize,
    /// Initial latents `[1, 4, h/8, w/8]` (seeded noise or `--init-latents`).
    pub init: Tensor,
    pub reference: PathBuf,
    /// The subject's class noun; its last token is the subject token.
    pub class: String,
    /// Removed from the prompt to make the template prompt (`sks`, a Textual Inversion token).
    pub identifier: Option<String>,
    /// Replaces the identifier-free prompt as the template prompt.
    pub template_prompt: Option<String>,
    /// Names the model in the cache key (the model argument and any embedding file).
    pub model_key: String,
    pub cache_dir: PathBuf,
    pub trace: Option<PathBuf>,
}

/// Seconds spent per part; `inversion` and `palette` are 0 on a cache hit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub inversion_s: f64,
    pub palette_s: f64,
    pub template_s: f64,
    pub sampling_s: f64,
    pub cache_hit: bool,
}

/// The appearance sites of `cfg` present in `sd`'s UNet (an explicit `layers` list as given).
pub fn appearance_sites(sd: &StableDiffusion, cfg: &GuidanceConfig) -> Result<Vec<String>> {
    let all = sd.unet.transformer_block_sites();
    let sites = match &cfg.layers {
        Some(l) => l.clone(),
        None => {
            let block = crate::config::appearance_up_block(cfg.resolution).expect("validated");
            let prefix = format!("up_blocks.{block}.");
            all.iter()
                .filter(|s| s.starts_with(&prefix))
                .cloned()
                .collect()
        }
    };
    if sites.is_empty() || sites.iter().any(|s| !all.contains(s)) {
        return Err(Error::Invalid {
            what: "appearance layers",
            reason: format!("{sites:?} are not transformer blocks of this UNet ({all:?})"),
        });
    }
    Ok(sites)
}

/// The inversion prompt: the method's rendering of `a {identifier} {class}`.
pub fn inversion_prompt(class: &str, identifier: Option<&str>) -> String {
    match identifier {
        Some(id) => format!("a {id} {class}"),
        None => format!("a {class}"),
    }
}

/// The reference palette of `req`, from the cache when it holds it.
pub fn reference_palette(
    sd: &StableDiffusion,
    cfg: &GuidanceConfig,
    req: &PickAndDrawRequest,
    timings: &mut Timings,
) -> Result<Palette> {
    let sites = appearance_sites(sd, cfg)?;
    let prompt = inversion_prompt(&req.class, req.identifier.as_deref());
    let subject_word = subject_word(sd, &prompt, req)?;
    let subject = *sd
        .tokenizer
        .word_positions(&prompt, &subject_word)?
        .last()
        .expect("non-empty");
    let key = CacheKey {
        model: req.model_key.clone(),
        image_sha256: file_sha256(&req.reference)?,
        prompt: prompt.clone(),
        steps: req.steps,
        height: req.height,
        width: req.width,
        scheduler: format!("{:?}", sd.scheduler),
        inversion: format!("{:?}", cfg.inversion),
        dtype: format!("{:?}", sd.dtype()),
    };
    let cache = PaletteCache::new(&req.cache_dir);
    let window = cfg.appearance_window.range();
    let t0 = Instant::now();
    let (inv, s1) = cache.inversion(&key, sd, || {
        let img = load_reference_image(&req.reference, req.height, req.width)?;
        invert(sd, &img, &prompt, req.steps, &cfg.inversion)
    })?;
    timings.inversion_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (palette, s2) = cache.palette(&key, &sites, cfg.tau, window.clone(), sd, || {
        palette_from_inversion(
            sd,
            &inv,
            &prompt,
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

/// The class noun when the prompt holds it, else the identifier (a Textual Inversion pseudo-word
/// standing for the subject).
fn subject_word(sd: &StableDiffusion, prompt: &str, req: &PickAndDrawRequest) -> Result<String> {
    if sd.tokenizer.word_positions(prompt, &req.class).is_ok() {
        return Ok(req.class.clone());
    }
    match &req.identifier {
        Some(id) if sd.tokenizer.word_positions(prompt, id).is_ok() => Ok(id.clone()),
        _ => Err(Error::Invalid {
            what: "subject token",
            reason: format!(
                "neither the class '{}' nor the identifier {:?} is in the prompt '{prompt}'",
                req.class, req.identifier
            ),
        }),
    }
}

/// Generates one image's latents with Pick-and-Draw. `base` is the template model (the
/// personalized model itself when `None`).
pub fn pick_and_draw(
    sd: &StableDiffusion,
    base: Option<&StableDiffusion>,
    cfg: &GuidanceConfig,
    req: &PickAndDrawRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<(Tensor, Timings)> {
    cfg.validate()?;
    let base = base.unwrap_or(sd);
    let mut timings = Timings::default();
    let palette = if cfg.components.appearance() && !cfg.appearance_window.range().is_empty() {
        Some(reference_palette(sd, cfg, req, &mut timings)?)
    } else {
        None
    };
    let template = req
        .template_prompt
        .clone()
        .unwrap_or_else(|| template_prompt(&req.prompt, req.identifier.as_deref()));
    let subject = subject_word(sd, &req.prompt, req)?;
    let (tokens, template_positions) = prompt_tokens(
        &sd.tokenizer,
        &req.prompt,
        &subject,
        req.identifier.as_deref(),
        &base.tokenizer,
        &template,
    )?;
    let t0 = Instant::now();
    let tmaps: Option<TemplateMaps> =
        if cfg.components.layout() && !cfg.layout_window.range().is_empty() {
            let temb = base.encode_prompts(&template, &req.negative_prompt)?;
            Some(template_maps(
                base,
                &temb,
                &req.init,
                req.steps,
                req.cfg_scale,
                &template_positions,
                cfg.layout_window.range(),
            )?)
        } else {
            None
        };
    timings.template_s = t0.elapsed().as_secs_f64();
    let emb = sd.encode_prompts(&req.prompt, &req.negative_prompt)?;
    let run = GuidedRun {
        sd,
        cfg,
        emb: &emb,
        steps: req.steps,
        cfg_scale: req.cfg_scale,
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
    let z = guided_sample(&run, &req.init, &mut trace, on_step)?;
    timings.sampling_s = t1.elapsed().as_secs_f64();
    Ok((z, timings))
}

/// The default cache folder: `$PND_CACHE`, else `~/.cache/pnd/palettes`, else `.pnd-cache`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PND_CACHE") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".cache/pnd/palettes"),
        None => PathBuf::from(".pnd-cache"),
    }
}
