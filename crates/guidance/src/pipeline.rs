//! One Pick-and-Draw image end to end (SPEC §7): cached null-text inversion and palette of the
//! reference image, cached template maps from the base model, then guided sampling. Each shared
//! piece is timed separately so the overhead of the guidance itself can be reported. Nothing here
//! prints: what a caller may want to tell the user comes back in [`PickAndDraw`].

use crate::cache::{
    file_sha256, CacheKey, CacheWarning, Cached, PaletteCache, TemplateCache, TemplateKey,
};
use crate::config::{GuidanceConfig, SubjectToken};
use crate::error::{Error, Result};
use crate::guide::{
    guided_sample, prompt_tokens, template_maps, template_prompt, GuidedRun, Palette, TemplateMaps,
};
use crate::inversion::{invert, invert_embeddings, load_reference_image, Inversion};
use crate::palette::{palette_from_embeddings, PaletteSpec};
use crate::trace::{TraceRow, TraceWriter};
use candle_core::Tensor;
use diffusion::ip_adapter::{with_image_tokens, ImageTokens};
use diffusion::pipeline::{PromptEmbeddings, StableDiffusion};
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
    /// Initial latents `[N, 4, h/8, w/8]` of the N images of a batch (seeded noise or
    /// `--init-latents`); the images share everything else.
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
    /// Holds the inversions, palettes and layout templates.
    pub cache_dir: PathBuf,
    /// One trace file per image of the batch (one JSON line per guided update), or none.
    pub trace: Vec<PathBuf>,
}

/// Seconds spent per part, for the whole batch; `inversion` and `palette` are 0 on a cache hit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub inversion_s: f64,
    pub palette_s: f64,
    pub template_s: f64,
    pub sampling_s: f64,
    /// The inversion and the palette both came from the cache.
    pub cache_hit: bool,
    /// The layout template (every image's) came from the cache.
    pub template_cache_hit: bool,
    /// Cache entries that were there but unusable (unreadable, a checksum mismatch, non-finite
    /// values) and were recomputed and replaced, for the caller to warn about.
    #[serde(skip)]
    pub cache_warnings: Vec<CacheWarning>,
}

/// A guided update whose gradient held NaN or infinite values and was not applied
/// (`nonfinite = "skip"`; the trace has the same row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SkippedUpdate {
    /// The image of the batch (0 for a single image).
    pub image: usize,
    pub step: usize,
    pub iteration: usize,
}

impl std::fmt::Display for SkippedUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "non-finite guidance gradient at step {}, iteration {}; update skipped",
            self.step, self.iteration
        )
    }
}

/// One Pick-and-Draw generation (a batch of N images).
#[derive(Debug, Clone)]
pub struct PickAndDraw {
    /// The final latents `[N, 4, h/8, w/8]`.
    pub latents: Tensor,
    pub timings: Timings,
    /// Updates skipped for a non-finite gradient, in order (for the caller to report).
    pub skipped_updates: Vec<SkippedUpdate>,
}

impl PickAndDraw {
    /// The skipped updates of image `image` of the batch.
    pub fn skipped_of(&self, image: usize) -> impl Iterator<Item = &SkippedUpdate> {
        self.skipped_updates
            .iter()
            .filter(move |s| s.image == image)
    }
}

/// The appearance sites of `config` present in `sd`'s UNet (an explicit `layers` list as given).
pub fn appearance_sites(sd: &StableDiffusion, config: &GuidanceConfig) -> Result<Vec<String>> {
    let all = sd.unet.transformer_block_sites();
    let sites = match &config.layers {
        Some(l) => l.clone(),
        None => {
            let prefix = format!("up_blocks.{}.", config.appearance_block()?);
            all.iter()
                .filter(|s| s.starts_with(&prefix))
                .cloned()
                .collect()
        }
    };
    if sites.is_empty() || sites.iter().any(|s| !all.contains(s)) {
        return Err(Error::UnknownLayers {
            layers: sites,
            available: all,
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

/// The reference's side of a guided generation: its inversion prompt, the subject token's
/// position in it and the key of its cached inversion and palette. [`reference_palette`] and
/// `pnd maps --reference` ([`crate::inspect`]) both start here, so they read one cache entry.
#[derive(Debug, Clone)]
pub struct ReferenceSetup {
    /// The inversion prompt ([`inversion_prompt`]).
    pub prompt: String,
    /// Position of the subject token in `prompt`'s 77 ids.
    pub subject: usize,
    pub key: CacheKey,
}

/// What identifies the reference's inversion: the reference image, the class and identifier, the
/// model and the generation's schedule and size.
#[derive(Debug, Clone, Copy)]
pub struct ReferenceSpec<'a> {
    pub reference: &'a Path,
    pub class: &'a str,
    pub identifier: Option<&'a str>,
    /// Names the model in the cache key (the model argument and any embedding file).
    pub model_key: &'a str,
    pub steps: usize,
    pub height: usize,
    pub width: usize,
}

/// The [`ReferenceSetup`] of `spec` with `sd` and `config`.
pub fn reference_setup(
    sd: &StableDiffusion,
    config: &GuidanceConfig,
    spec: &ReferenceSpec<'_>,
) -> Result<ReferenceSetup> {
    let prompt = inversion_prompt(spec.class, spec.identifier);
    let subject_word = subject_word(
        sd,
        &prompt,
        spec.class,
        spec.identifier,
        config.subject_token,
    )?;
    let subject = *sd
        .tokenizer
        .word_positions(&prompt, &subject_word)?
        .last()
        .expect("non-empty");
    let key = CacheKey {
        model: spec.model_key.to_string(),
        image_sha256: file_sha256(spec.reference)?,
        prompt: prompt.clone(),
        steps: spec.steps,
        height: spec.height,
        width: spec.width,
        scheduler: format!("{:?}", sd.scheduler),
        inversion: format!("{:?}", config.inversion),
        dtype: format!("{:?}", sd.dtype()),
    };
    Ok(ReferenceSetup {
        prompt,
        subject,
        key,
    })
}

/// The reference palette of `req`, from the cache when it holds it.
pub fn reference_palette(
    sd: &StableDiffusion,
    config: &GuidanceConfig,
    req: &PickAndDrawRequest,
    timings: &mut Timings,
) -> Result<Palette> {
    conditioned_palette(sd, config, req, None, timings)
}

/// [`reference_palette`] for a model conditioned on an image prompt as well (IP-Adapter, `image`
/// given): the inversion and the replay are conditioned as the generation is, the inversion
/// prompt's text with the reference's image tokens appended, and the null-text optimization
/// starts from the empty prompt with the negative image tokens appended (the whole negative
/// branch, text and image tokens, is what it optimizes). The cache key's prompt says so.
pub(crate) fn conditioned_palette(
    sd: &StableDiffusion,
    config: &GuidanceConfig,
    req: &PickAndDrawRequest,
    image: Option<&ImageTokens>,
    timings: &mut Timings,
) -> Result<Palette> {
    let sites = appearance_sites(sd, config)?;
    let mut setup = reference_setup(
        sd,
        config,
        &ReferenceSpec {
            reference: &req.reference,
            class: &req.class,
            identifier: req.identifier.as_deref(),
            model_key: &req.model_key,
            steps: req.steps,
            height: req.height,
            width: req.width,
        },
    )?;
    let spec = PaletteSpec::new(config, &sites, setup.subject);
    // The replay's conditioning: the inversion prompt's embedding (as `palette_from_inversion`).
    let Some(image) = image else {
        let cond = sd.encode_prompt(&setup.prompt)?;
        return cached_palette(
            sd,
            &req.cache_dir,
            &setup.key,
            &spec,
            &cond,
            || {
                let img = load_reference_image(&req.reference, req.height, req.width)?;
                invert(sd, &img, &setup.prompt, req.steps, &config.inversion)
            },
            timings,
        );
    };
    // An image-conditioned inversion never shares an entry with the plain model's.
    setup.key.prompt = format!("ip-adapter|{}", setup.key.prompt);
    let text = PromptEmbeddings {
        uncond: sd.encode_prompt("")?,
        cond: sd.encode_prompt(&setup.prompt)?,
    };
    let emb = with_image_tokens(&text, image)?;
    cached_palette(
        sd,
        &req.cache_dir,
        &setup.key,
        &spec,
        &emb.cond,
        || {
            let img = load_reference_image(&req.reference, req.height, req.width)?;
            invert_embeddings(
                sd,
                &img,
                &emb.cond,
                &emb.uncond,
                req.steps,
                &config.inversion,
            )
        },
        timings,
    )
}

/// The inversion (computed by `invert` on a miss) and the palette of `key` replayed with `cond`,
/// from the palette cache under `cache_dir` when it holds them, timed into `timings`.
pub(crate) fn cached_palette(
    sd: &StableDiffusion,
    cache_dir: &Path,
    key: &CacheKey,
    spec: &PaletteSpec<'_>,
    cond: &Tensor,
    invert: impl FnOnce() -> Result<Inversion>,
    timings: &mut Timings,
) -> Result<Palette> {
    let cache = PaletteCache::new(cache_dir);
    let t0 = Instant::now();
    let inv = cache.inversion(key, sd, invert)?;
    timings.inversion_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    // The palette holds the window's steps that the sampling has (a window may run past the last
    // step); the cache is keyed by, and read back over, exactly those.
    let n = inv.value.report.steps;
    let steps = spec.steps.start.min(n)..spec.steps.end.min(n);
    let palette = cache.palette(key, spec.sites, spec.tau, steps, sd, || {
        palette_from_embeddings(sd, &inv.value, cond, spec)
    })?;
    timings.palette_s = t1.elapsed().as_secs_f64();
    timings.cache_hit = inv.hit() && palette.hit();
    timings
        .cache_warnings
        .extend(inv.warning.into_iter().chain(palette.warning));
    Ok(palette.value)
}

/// The word of `prompt` whose last token is the subject token (SPEC §7): with
/// [`SubjectToken::Identifier`] the pseudo-word when the identifier is one (`sd` holds a learned
/// Textual Inversion embedding), else the class noun; a prompt without the preferred word falls
/// back to the other one.
pub fn subject_word(
    sd: &StableDiffusion,
    prompt: &str,
    class_noun: &str,
    identifier_word: Option<&str>,
    choice: SubjectToken,
) -> Result<String> {
    let present = |w: &str| sd.tokenizer.word_positions(prompt, w).is_ok();
    let identifier = identifier_word.filter(|id| present(id));
    let class = present(class_noun).then_some(class_noun);
    let pseudo_word = sd.provenance.learned_token.is_some();
    let preferred = match choice {
        SubjectToken::Identifier if pseudo_word => identifier.or(class),
        _ => class.or(identifier),
    };
    preferred
        .map(str::to_string)
        .ok_or_else(|| Error::SubjectNotInPrompt {
            class: class_noun.to_string(),
            identifier: identifier_word.map(str::to_string),
            prompt: prompt.to_string(),
        })
}

/// What the layout template is sampled from: the base model, the identifier-free prompt, the
/// initial latents and the sampling settings.
pub struct TemplateRequest<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub init: &'a Tensor,
    pub steps: usize,
    pub cfg_scale: f64,
    /// Template token positions whose maps are kept.
    pub tokens: &'a [usize],
    /// Layout steps whose maps are kept.
    pub window: std::ops::Range<usize>,
}

/// The layout template of `req` sampled with `base`, from the template cache under `cache_dir`
/// when it holds it (a template depends on nothing else, so every guided method shares it).
pub fn layout_template(
    base: &StableDiffusion,
    req: &TemplateRequest<'_>,
    cache_dir: &Path,
) -> Result<Cached<TemplateMaps>> {
    let init = req.init.to_dtype(base.dtype())?;
    let key = TemplateKey::new(
        base,
        req.prompt,
        req.negative_prompt,
        &init,
        req.steps,
        req.cfg_scale,
        req.tokens,
        req.window.clone(),
    )?;
    TemplateCache::new(cache_dir).template(&key, base, || {
        let emb = base.encode_prompts(req.prompt, req.negative_prompt)?;
        template_maps(
            base,
            &emb,
            &init,
            req.steps,
            req.cfg_scale,
            req.tokens,
            req.window.clone(),
        )
    })
}

/// The layout templates of each image of `req.init` (`[N, 4, h, w]`) when the layout loss is on,
/// timed into `timings`. Each image's template is cached on its own, so a seed's template is
/// shared by every batch and method that samples that seed.
pub(crate) fn timed_layout_template(
    base: &StableDiffusion,
    config: &GuidanceConfig,
    req: &TemplateRequest<'_>,
    cache_dir: &Path,
    timings: &mut Timings,
) -> Result<Option<Vec<TemplateMaps>>> {
    if !config.layout_within(req.steps) {
        return Ok(None);
    }
    let t0 = Instant::now();
    let mut templates = Vec::new();
    let mut all_hit = true;
    for b in 0..req.init.dim(0)? {
        let init = req.init.narrow(0, b, 1)?;
        let one = TemplateRequest {
            init: &init,
            window: req.window.clone(),
            ..*req
        };
        let template = layout_template(base, &one, cache_dir)?;
        all_hit &= template.hit();
        timings.cache_warnings.extend(template.warning);
        templates.push(template.value);
    }
    timings.template_s = t0.elapsed().as_secs_f64();
    timings.template_cache_hit = all_hit;
    Ok(Some(templates))
}

/// Guided sampling with one trace row per image and update written to that image's file of
/// `traces` (none when empty), timed into `timings`; the skipped updates are returned with the
/// latents.
pub(crate) fn traced_sample(
    run: &GuidedRun<'_>,
    init: &Tensor,
    traces: &[PathBuf],
    mut timings: Timings,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<PickAndDraw> {
    if !traces.is_empty() && traces.len() != init.dim(0)? {
        return Err(Error::Shape {
            what: "initial latents of a guided batch (one per trace file)",
            expected: format!("[{}, 4, h, w]", traces.len()),
            got: init.dims().to_vec(),
        });
    }
    let mut writers = traces
        .iter()
        .map(|p| TraceWriter::create(p))
        .collect::<Result<Vec<_>>>()?;
    let mut skipped_updates = Vec::new();
    let mut on_row = |image: usize, row: &TraceRow| -> Result<()> {
        if row.non_finite {
            skipped_updates.push(SkippedUpdate {
                image,
                step: row.step,
                iteration: row.iteration,
            });
        }
        match writers.get_mut(image) {
            Some(w) => w.write(row),
            None => Ok(()),
        }
    };
    let t0 = Instant::now();
    let latents = guided_sample(run, init, &mut on_row, on_step)?;
    timings.sampling_s = t0.elapsed().as_secs_f64();
    Ok(PickAndDraw {
        latents,
        timings,
        skipped_updates,
    })
}

/// Generates the latents of a batch of images with Pick-and-Draw (one per entry of `req.init`).
/// `base` is the template model (the personalized model itself when `None`).
pub fn pick_and_draw(
    sd: &StableDiffusion,
    base: Option<&StableDiffusion>,
    config: &GuidanceConfig,
    req: &PickAndDrawRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<PickAndDraw> {
    pick_and_draw_conditioned(sd, base, config, req, None, on_step)
}

/// Pick-and-Draw on IP-Adapter (issue 28): `sd` with the adapter attached, `image` the
/// reference's image tokens (the same reference as `req.reference`). The layout template comes
/// from vanilla Stable Diffusion: `base`, else `sd` with the adapter detached; the palette from
/// the inversion of the reference under the IP-Adapter model, conditioned as its generation is
/// ([`conditioned_palette`]); the guided sampling (gradient passes and CFG steps) conditions every
/// UNet call on the text and image tokens. The capture hooks see the text attention alone, so the
/// layout and appearance losses read the maps they read for the other baselines; the image branch
/// acts on them through the residual stream (the block outputs Ψ and every later map), and the
/// gradient flows through it to the latent.
pub fn pick_and_draw_ip_adapter(
    sd: &StableDiffusion,
    image: &ImageTokens,
    base: Option<&StableDiffusion>,
    config: &GuidanceConfig,
    req: &PickAndDrawRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<PickAndDraw> {
    if sd.unet.ip_adapter().is_none() {
        return Err(Error::Candle(candle_core::Error::Msg(
            "Pick-and-Draw on IP-Adapter: no adapter is attached to the model's UNet".into(),
        )));
    }
    let vanilla;
    let base = match base {
        Some(b) => b,
        None => {
            vanilla = sd.without_ip_adapter();
            &vanilla
        }
    };
    pick_and_draw_conditioned(sd, Some(base), config, req, Some(image), on_step)
}

fn pick_and_draw_conditioned(
    sd: &StableDiffusion,
    base: Option<&StableDiffusion>,
    config: &GuidanceConfig,
    req: &PickAndDrawRequest,
    image: Option<&ImageTokens>,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<PickAndDraw> {
    config.validate()?;
    let base = base.unwrap_or(sd);
    let mut timings = Timings::default();
    // The prompt checks are cheap: a wrong class or identifier is reported before the inversion.
    let template = req
        .template_prompt
        .clone()
        .unwrap_or_else(|| template_prompt(&req.prompt, req.identifier.as_deref()));
    let subject = subject_word(
        sd,
        &req.prompt,
        &req.class,
        req.identifier.as_deref(),
        config.subject_token,
    )?;
    let tokens = prompt_tokens(
        &sd.tokenizer,
        &req.prompt,
        &subject,
        req.identifier.as_deref(),
        &base.tokenizer,
        &template,
    )?;
    // No inversion when no step of the schedule is guided by the appearance loss.
    let palette = if config.appearance_within(req.steps) {
        Some(conditioned_palette(sd, config, req, image, &mut timings)?)
    } else {
        None
    };
    let tmaps = timed_layout_template(
        base,
        config,
        &TemplateRequest {
            prompt: &template,
            negative_prompt: &req.negative_prompt,
            init: &req.init,
            steps: req.steps,
            cfg_scale: req.cfg_scale,
            tokens: &tokens.template,
            window: config.layout_window.range(),
        },
        &req.cache_dir,
        &mut timings,
    )?;
    let emb = sd.encode_prompts(&req.prompt, &req.negative_prompt)?;
    let emb = match image {
        Some(image) => with_image_tokens(&emb, image)?,
        None => emb,
    };
    let run = GuidedRun {
        sd,
        config,
        emb: &emb,
        steps: req.steps,
        cfg_scale: req.cfg_scale,
        tokens: tokens.prompt,
        palette: palette.as_ref(),
        templates: tmaps.as_deref(),
    };
    traced_sample(&run, &req.init, &req.trace, timings, on_step)
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
