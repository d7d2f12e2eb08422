//! Pick-and-Draw on a tiny SD-1.x-shaped model (built with the `tiny` crate, the real CLIP
//! tokenizer from the diffusion crate's fixtures): exact gradients through the whole UNet,
//! guided updates that lower their loss, the trace of a full guided run, null-text inversion
//! against plain DDIM inversion, and the palette cache.

mod support;

use candle_core::{DType, Device, Tensor};
use diffusion::hooks::Hook;
use diffusion::pipeline::{LoadOptions, PromptEmbeddings, StableDiffusion};
use guidance::cache::{CacheKey, CacheStatus, PaletteCache};
use guidance::capture::{attn2_site, SiteCapture};
use guidance::config::{Distance, GuidanceConfig, InversionConfig};
use guidance::guide::{
    guided_sample, prompt_tokens, step_gradient, step_loss, template_maps, template_prompt,
    GuidedRun, PromptTokens, ReferenceLayer, StepGradient, StepTargets,
};
use guidance::inversion::invert;
use guidance::maps::{mask_indices, min_max_normalize};
use guidance::palette::{palette_from_inversion, PaletteSpec};
use std::path::PathBuf;
use std::sync::OnceLock;
use support::{assert_directional_gradient, max_abs_diff};
use tiny::{write_tiny_model, TinySpec};

const PROMPT: &str = "a sks dog on the beach";
const SIZE: usize = 64;

fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../diffusion/tests/fixtures/pipeline/model/tokenizer");
        let dir = tmp.path().join("tiny");
        write_tiny_model(&dir, 11, &tok, &TinySpec::default()).unwrap();
        (tmp, dir)
    })
    .1
}

fn load(dtype: DType) -> StableDiffusion {
    let opts = LoadOptions {
        dtype,
        ..Default::default()
    };
    StableDiffusion::load(model_dir().to_str().unwrap(), &opts).unwrap()
}

fn randn(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    diffusion::noise::seeded_normal(seed, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn tokens(sd: &StableDiffusion) -> (PromptTokens, Vec<usize>, String) {
    let template = template_prompt(PROMPT, Some("sks"));
    let m = prompt_tokens(
        &sd.tokenizer,
        PROMPT,
        "dog",
        Some("sks"),
        &sd.tokenizer,
        &template,
    )
    .unwrap();
    (m.prompt, m.template, template)
}

/// Unguided CFG sampling of `PROMPT` from `init` (50 steps).
fn unguided(sd: &StableDiffusion, init: &Tensor) -> Tensor {
    sd.sample(
        &diffusion::pipeline::SampleRequest {
            prompt: PROMPT.into(),
            steps: 50,
            height: SIZE,
            width: SIZE,
            init_latents: Some(init.clone()),
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .unwrap()
}

/// Reference layers and template maps taken from other latents, for tests of the loss alone.
fn targets(
    sd: &StableDiffusion,
    config: &GuidanceConfig,
    p: &PromptTokens,
    tpos: &[usize],
) -> (Vec<ReferenceLayer>, Vec<(String, Tensor)>) {
    let dt = sd.dtype();
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let sites = config.appearance_sites(3).unwrap();
    let attn: Vec<String> = sites.iter().map(|s| attn2_site(s)).collect();
    let mut cap = SiteCapture::new(0, vec![p.subject], attn, sites.clone());
    sd.unet
        .forward_with(&randn(5, &[1, 4, 8, 8], dt), 601.0, &cond, &mut cap)
        .unwrap();
    let reference = sites
        .iter()
        .map(|s| {
            let norm = min_max_normalize(cap.map(&attn2_site(s)).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            ReferenceLayer {
                site: s.clone(),
                features: cap.block(s).unwrap().detach(),
                mask: mask_indices(&norm, config.tau).unwrap(),
            }
        })
        .collect();
    let tcond = sd
        .encode_prompt(&template_prompt(PROMPT, Some("sks")))
        .unwrap();
    let mut tcap = SiteCapture::new(0, tpos.to_vec(), sd.unet.cross_attention_sites(), vec![]);
    sd.unet
        .forward_with(&randn(6, &[1, 4, 8, 8], dt), 601.0, &tcond, &mut tcap)
        .unwrap();
    (
        reference,
        tcap.maps
            .into_iter()
            .map(|(s, m)| (s, m.detach()))
            .collect(),
    )
}

#[test]
fn gradients_through_the_unet_match_finite_differences() {
    let sd = load(DType::F64);
    let (p, tpos, _) = tokens(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let z = randn(7, &[1, 4, 8, 8], DType::F64);
    for (distance, app, lay) in [
        (Distance::Uremd, true, false),
        (Distance::Emd, true, false),
        (Distance::Uremd, false, true),
    ] {
        let config = GuidanceConfig {
            distance,
            ..Default::default()
        };
        let (reference, template) = targets(&sd, &config, &p, &tpos);
        let t = StepTargets {
            appearance: app.then_some(reference.as_slice()),
            layout: lay.then_some(template.as_slice()),
        };
        let StepGradient { loss, grad } =
            step_gradient(&sd.unet, &config, &z, 601, &cond, &p, &t).unwrap();
        if app {
            assert_eq!(loss.skipped, 0, "{:?}", loss.masks);
        }
        let f = |x: &Tensor| -> f64 {
            step_loss(&sd.unet, &config, x, 601, &cond, &p, &t)
                .unwrap()
                .total
                .to_scalar::<f64>()
                .unwrap()
        };
        let directions: Vec<Tensor> = (0..3)
            .map(|k| {
                let u = randn(100 + k, &[1, 4, 8, 8], DType::F64);
                let norm = u
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                (&u / norm).unwrap()
            })
            .collect();
        let label = format!("{distance:?} app={app} lay={lay}");
        assert_directional_gradient(f, &z, &grad, &directions, 1e-5, &label);
    }
}

#[test]
fn every_guided_update_lowers_its_loss() {
    let sd = load(DType::F64);
    let (p, tpos, _) = tokens(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let config = GuidanceConfig::default();
    let (reference, template) = targets(&sd, &config, &p, &tpos);
    let ddim = sd.ddim(50).unwrap();
    for (k, &step) in [0usize, 5, 9, 10, 15, 19].iter().enumerate() {
        let t = ddim.timesteps()[step];
        let targets = StepTargets {
            appearance: config.appearance_at(step).then_some(reference.as_slice()),
            layout: config.layout_at(step).then_some(template.as_slice()),
        };
        let mut z = randn(20 + k as u64, &[1, 4, 8, 8], DType::F64);
        for _ in 0..config.iterations {
            let StepGradient { loss: before, grad } =
                step_gradient(&sd.unet, &config, &z, t, &cond, &p, &targets).unwrap();
            let l0 = before.total.to_scalar::<f64>().unwrap();
            let gn = grad
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(gn > 0.0, "step {step}: zero gradient");
            // A step of length 1e-4 along −∇.
            let eta = 1e-4 / gn;
            z = (&z - (grad * eta).unwrap()).unwrap();
            let l1 = step_loss(&sd.unet, &config, &z, t, &cond, &p, &targets)
                .unwrap()
                .total
                .to_scalar::<f64>()
                .unwrap();
            assert!(l1 < l0, "step {step}: loss {l0} → {l1}");
        }
    }
}

fn reference_image() -> image::RgbImage {
    image::RgbImage::from_fn(SIZE as u32, SIZE as u32, |x, y| {
        let r = ((x as f64 - 30.0).powi(2) + (y as f64 - 34.0).powi(2)).sqrt();
        if r < 18.0 {
            image::Rgb([200, 120 + (x as u8), 40])
        } else {
            image::Rgb([30 + (y as u8), 90, 160])
        }
    })
}

#[test]
fn null_text_inversion_beats_plain_ddim_inversion() {
    let sd = load(DType::F32);
    let inv = invert(
        &sd,
        &reference_image(),
        "a sks dog",
        10,
        &InversionConfig::default(),
    )
    .unwrap();
    let r = &inv.report;
    println!("{}", serde_json::to_string(r).unwrap());
    assert_eq!(inv.null_embeddings.dims()[0], 10);
    assert!(r.updates.iter().all(|&u| (1..=10).contains(&u)));
    assert!(r.trajectory_mse < r.trajectory_mse_ddim, "{r:?}");
    assert!(r.final_mse < r.final_mse_ddim, "{r:?}");
    assert!(r.psnr.is_finite() && r.psnr > r.psnr_ddim, "{r:?}");
}

#[test]
fn full_guided_run_trace_and_palette_cache() {
    let sd = load(DType::F32);
    let config = GuidanceConfig {
        inversion: InversionConfig {
            inner_steps: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let (p, tpos, template) = tokens(&sd);
    let sites = config.appearance_sites(3).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = PaletteCache::new(tmp.path().join("cache"));
    let img = reference_image();
    let key = CacheKey {
        model: model_dir().display().to_string(),
        image_sha256: "synthetic".into(),
        prompt: "a sks dog".into(),
        steps: 50,
        height: SIZE,
        width: SIZE,
        scheduler: format!("{:?}", sd.scheduler),
        inversion: format!("{:?}", config.inversion),
        dtype: "f32".into(),
    };
    let subject = *sd
        .tokenizer
        .word_positions("a sks dog", "dog")
        .unwrap()
        .last()
        .unwrap();
    let window = config.appearance_window.range();
    let spec = PaletteSpec {
        subject_token: subject,
        sites: &sites,
        tau: config.tau,
        cfg_scale: 7.5,
        steps: window.clone(),
    };
    let build = |calls: &mut usize| {
        let inv = cache.inversion(&key, &sd, || {
            *calls += 1;
            invert(&sd, &img, "a sks dog", 50, &config.inversion)
        })?;
        let pal = cache.palette(&key, &sites, config.tau, window.clone(), &sd, || {
            *calls += 1;
            palette_from_inversion(&sd, &inv.value, "a sks dog", &spec)
        })?;
        Ok::<_, guidance::Error>((pal.value, inv.status, pal.status))
    };
    let mut calls = 0;
    let (palette, s1, s2) = build(&mut calls).unwrap();
    assert_eq!((s1, s2, calls), (CacheStatus::Miss, CacheStatus::Miss, 2));
    let (again, s1, s2) = build(&mut calls).unwrap();
    assert_eq!(
        (s1, s2, calls),
        (CacheStatus::Hit, CacheStatus::Hit, 2),
        "second run recomputed"
    );
    assert_eq!(again.steps.len(), 10);
    for (step, layers) in &palette.steps {
        for (a, b) in layers.iter().zip(&again.steps[step]) {
            assert_eq!(a.mask, b.mask);
            assert_eq!(max_abs_diff(&a.features, &b.features), 0.0);
        }
    }

    let init = sd.initial_latents(SIZE, SIZE, 3).unwrap();
    let temb = sd.encode_prompts(&template, "").unwrap();
    let tmaps = template_maps(
        &sd,
        &temb,
        &init,
        50,
        7.5,
        &tpos,
        config.layout_window.range(),
    )
    .unwrap();
    assert_eq!(tmaps.steps.len(), 10);
    assert_eq!(tmaps.steps[&0].len(), 16);
    let emb: PromptEmbeddings = sd.encode_prompts(PROMPT, "").unwrap();
    let run = GuidedRun {
        sd: &sd,
        config: &config,
        emb: &emb,
        steps: 50,
        cfg_scale: 7.5,
        tokens: p,
        palette: Some(&palette),
        templates: Some(std::slice::from_ref(&tmaps)),
    };
    let trace_path = tmp.path().join("trace.jsonl");
    let mut writer = guidance::trace::TraceWriter::create(&trace_path).unwrap();
    let z = guided_sample(&run, &init, &mut |_, row| writer.write(row), &mut |_, _| {}).unwrap();
    drop(writer);
    assert_eq!(z.dims(), &[1, 4, 8, 8]);
    let rows = guidance::trace::read_trace(&trace_path).unwrap();
    assert_eq!(rows.len(), 60);
    for (k, r) in rows.iter().enumerate() {
        assert_eq!((r.step, r.iteration), (k / 3, k % 3));
        assert_eq!(r.loss_lay.is_some(), r.step < 10, "{r:?}");
        assert_eq!(r.loss_app.is_some(), (10..20).contains(&r.step), "{r:?}");
        assert_eq!(r.masks.len(), if r.step >= 10 { 3 } else { 0 });
    }
    // The guidance changed the sample.
    let d = max_abs_diff(&z, &unguided(&sd, &init));
    assert!(d > 1e-4, "guided and unguided samples are equal");
}

/// A Pick-and-Draw request for `PROMPT` (50 steps, class `dog`, identifier `sks`, no trace).
fn pnd_request(
    init: &Tensor,
    image: &std::path::Path,
    model_key: &str,
    cache_dir: PathBuf,
) -> guidance::pipeline::PickAndDrawRequest {
    guidance::pipeline::PickAndDrawRequest {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        steps: 50,
        cfg_scale: 7.5,
        height: SIZE,
        width: SIZE,
        init: init.clone(),
        reference: image.to_path_buf(),
        class: "dog".into(),
        identifier: Some("sks".into()),
        template_prompt: None,
        model_key: model_key.into(),
        cache_dir,
        trace: vec![],
    }
}

/// The tiny model, a temporary folder with the reference image saved in it, a [`pnd_request`]
/// caching there, and the default guidance with one null-text inner step.
fn guided_setup() -> (
    StableDiffusion,
    tempfile::TempDir,
    Tensor,
    guidance::pipeline::PickAndDrawRequest,
    GuidanceConfig,
) {
    let sd = load(DType::F32);
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("ref.png");
    reference_image().save(&image).unwrap();
    let init = sd.initial_latents(SIZE, SIZE, 5).unwrap();
    let req = pnd_request(
        &init,
        &image,
        &model_dir().display().to_string(),
        tmp.path().join("cache"),
    );
    let config = GuidanceConfig {
        inversion: InversionConfig {
            inner_steps: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    (sd, tmp, init, req, config)
}

/// An appearance window that runs past the last sampling step (window 10..20, 12 steps): the
/// palette holds steps 10 and 11, and a second run reads exactly those back from the cache (it
/// used to look for step 12 and fail with "no tensor '12.up_blocks…'").
#[test]
fn a_palette_whose_window_passes_the_last_step_is_read_back_from_the_cache() {
    use guidance::pipeline::pick_and_draw;
    let (sd, _tmp, _init, mut req, config) = guided_setup();
    req.steps = 12;
    assert_eq!(config.appearance_window.range(), 10..20);
    let first = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
    assert!(!first.timings.cache_hit);
    let second = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
    assert!(second.timings.cache_hit, "second run missed the cache");
    assert_eq!(
        max_abs_diff(&first.latents, &second.latents),
        0.0,
        "a cached palette changed the result"
    );
}

#[test]
fn pick_and_draw_end_to_end_with_cache_and_components() {
    use guidance::config::Components;
    use guidance::pipeline::pick_and_draw;
    let (sd, tmp, init, mut req, config) = guided_setup();
    req.trace = vec![tmp.path().join("t.jsonl")];
    let first = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
    assert!(!first.timings.cache_hit);
    assert!(!first.timings.template_cache_hit);
    assert!(first.skipped_updates.is_empty());
    assert_eq!(
        guidance::trace::read_trace(&req.trace[0]).unwrap().len(),
        60
    );
    let second = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
    assert!(second.timings.cache_hit, "second run missed the cache");
    assert!(
        second.timings.template_cache_hit,
        "second run missed the template cache"
    );
    assert_eq!(
        max_abs_diff(&first.latents, &second.latents),
        0.0,
        "a cached palette changed the result"
    );

    // No loss component: exactly the unguided sample, no trace rows.
    let none = GuidanceConfig {
        components: Components::None,
        ..config.clone()
    };
    req.trace = vec![tmp.path().join("none.jsonl")];
    let z0 = pick_and_draw(&sd, None, &none, &req, &mut |_, _| {})
        .unwrap()
        .latents;
    assert_eq!(max_abs_diff(&z0, &unguided(&sd, &init)), 0.0);
    assert!(guidance::trace::read_trace(&req.trace[0])
        .unwrap()
        .is_empty());

    // A prompt without the class or the identifier is one clear error.
    req.prompt = "a cat on the beach".into();
    let err = pick_and_draw(&sd, None, &none, &req, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'dog'") && err.contains("a cat on the beach"),
        "{err}"
    );
}

/// Records every site the UNet reaches (the UNet asks the hook at each) and passes everything on
/// to `inner`, which decides what it keeps and when the forward ends.
struct SiteLog {
    inner: SiteCapture,
    reached: std::cell::RefCell<Vec<String>>,
}

impl SiteLog {
    fn new(inner: SiteCapture) -> Self {
        SiteLog {
            inner,
            reached: Default::default(),
        }
    }
    fn reached(&self) -> Vec<String> {
        self.reached.borrow().clone()
    }
}

impl Hook for SiteLog {
    fn wants_attention(&self, site: &str) -> bool {
        self.reached.borrow_mut().push(site.to_string());
        self.inner.wants_attention(site)
    }
    fn attention(&mut self, site: &str, probs: &Tensor) -> candle_core::Result<()> {
        self.inner.attention(site, probs)
    }
    fn wants_block_output(&self, site: &str) -> bool {
        self.reached.borrow_mut().push(site.to_string());
        self.inner.wants_block_output(site)
    }
    fn block_output(&mut self, site: &str, hidden: &Tensor) -> candle_core::Result<()> {
        self.inner.block_output(site, hidden)
    }
    fn flow(&self) -> std::ops::ControlFlow<()> {
        self.inner.flow()
    }
}

/// Issue 11 item 7: the appearance pass's capture (`up_blocks.2` maps and block outputs) ends the
/// forward at its last site, a block output, so `up_blocks.3` never runs; the layout pass needs
/// every cross-attention site and runs to the last one.
#[test]
fn the_gradient_pass_forward_stops_after_its_last_site() {
    let sd = load(DType::F32);
    let (p, tpos, _) = tokens(&sd);
    let config = GuidanceConfig::default();
    let (reference, template) = targets(&sd, &config, &p, &tpos);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let z = randn(8, &[1, 4, 8, 8], DType::F32);
    let run = |targets: &StepTargets<'_>| {
        let mut log = SiteLog::new(guidance::guide::step_capture(&p, targets));
        let flow = sd.unet.forward_until(&z, 601.0, &cond, &mut log).unwrap();
        (flow.is_break(), log)
    };
    let appearance = StepTargets {
        appearance: Some(&reference),
        layout: None,
    };
    let (stopped, log) = run(&appearance);
    let last = reference.last().unwrap().site.clone();
    assert!(stopped, "the appearance pass ran to the end");
    assert!(log.inner.is_complete());
    let reached = log.reached();
    assert_eq!(reached.last(), Some(&last), "{reached:?}");
    assert!(
        reached.iter().all(|s| !s.starts_with("up_blocks.3")),
        "{reached:?}"
    );
    // Without the stop the same capture reaches up_blocks.3 (the log sees every site).
    let mut full = SiteLog::new(guidance::guide::step_capture(&p, &appearance));
    full.inner.stop_when_complete = false;
    sd.unet.forward_with(&z, 601.0, &cond, &mut full).unwrap();
    assert!(full.flow().is_continue());
    let all = full.reached();
    assert!(all.iter().any(|s| s.starts_with("up_blocks.3")), "{all:?}");
    assert!(all.len() > reached.len());

    let layout = StepTargets {
        appearance: None,
        layout: Some(&template),
    };
    let (_, log) = run(&layout);
    assert_eq!(
        log.reached().last(),
        sd.unet.cross_attention_sites().last(),
        "the layout pass reads every cross-attention site"
    );
    // A hook that ends the pass is an error for forward_with (which must return a prediction).
    let mut early = guidance::guide::step_capture(&p, &appearance);
    let err = sd
        .unet
        .forward_with(&z, 601.0, &cond, &mut early)
        .unwrap_err();
    assert!(err.to_string().contains("forward_until"), "{err}");
}

/// Issue 11 item 8: a NaN in the null-text optimization is one clear error naming the step.
#[test]
fn null_text_optimization_reports_a_non_finite_loss() {
    let sd = load(DType::F32);
    let cond = sd.encode_prompt("a sks dog").unwrap();
    let nan = (cond.zeros_like().unwrap() + f64::NAN).unwrap();
    let err = guidance::inversion::invert_embeddings(
        &sd,
        &reference_image(),
        &cond,
        &nan,
        4,
        &InversionConfig::default(),
    )
    .err()
    .expect("a NaN starting embedding fails");
    assert!(
        matches!(
            err,
            guidance::Error::NullTextNonFinite {
                step: 0,
                iteration: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("not finite"), "{err}");
}

/// Issue 11 item 5: `subject_token` picks the pseudo-word of a Textual Inversion model by default
/// (SPEC §7) and the class noun when asked; DreamBooth's identifier is never the subject.
#[test]
fn subject_token_follows_the_option() {
    use guidance::config::SubjectToken::{Class, Identifier};
    use guidance::pipeline::subject_word;
    let mut sd = load(DType::F32);
    let ti = "a <dog7> dog on the beach";
    let pick = |sd: &StableDiffusion, prompt: &str, id: &str, choice| {
        subject_word(sd, prompt, "dog", Some(id), choice).unwrap()
    };
    // No learned embedding: the identifier (DreamBooth's `sks`) is not a pseudo-word.
    assert_eq!(pick(&sd, PROMPT, "sks", Identifier), "dog");
    assert_eq!(pick(&sd, PROMPT, "sks", Class), "dog");
    let id = sd.tokenizer.add_token("<dog7>").unwrap();
    sd.provenance.learned_token = Some(diffusion::textual_inversion::LearnedToken {
        token: "<dog7>".into(),
        id,
        file: "learned_embeds.safetensors".into(),
        file_key: "<dog7>".into(),
    });
    assert_eq!(pick(&sd, ti, "<dog7>", Identifier), "<dog7>");
    assert_eq!(pick(&sd, ti, "<dog7>", Class), "dog");
    // Either choice falls back to the word the prompt holds.
    assert_eq!(
        pick(&sd, "a <dog7> on the beach", "<dog7>", Class),
        "<dog7>"
    );
    assert_eq!(pick(&sd, "a dog on the beach", "<dog7>", Identifier), "dog");
    let err = subject_word(&sd, "a cat", "dog", Some("<dog7>"), Identifier).unwrap_err();
    assert!(
        matches!(err, guidance::Error::SubjectNotInPrompt { .. }),
        "{err}"
    );
}

/// Issue 11 item 13: a config built in code with a bad resolution is an error, not a panic.
#[test]
fn unvalidated_config_is_an_error_not_a_panic() {
    let sd = load(DType::F32);
    let bad = GuidanceConfig {
        resolution: 48,
        ..Default::default()
    };
    let err = guidance::pipeline::appearance_sites(&sd, &bad).unwrap_err();
    assert!(err.to_string().contains("resolution = 48"), "{err}");
}

/// Issue 11 item 11: the layout template is cached by (base model, prompt, initial latents,
/// sampling settings); a hit gives exactly the computed maps, whatever personalized model asks.
#[test]
fn layout_template_cache_hit_is_identical() {
    use guidance::pipeline::{layout_template, pick_and_draw, TemplateRequest};
    let sd = load(DType::F32);
    let (_, tpos, template) = tokens(&sd);
    let tmp = tempfile::tempdir().unwrap();
    let init = sd.initial_latents(SIZE, SIZE, 4).unwrap();
    let req = TemplateRequest {
        prompt: &template,
        negative_prompt: "",
        init: &init,
        steps: 20,
        cfg_scale: 7.5,
        tokens: &tpos,
        window: 0..4,
    };
    let first = layout_template(&sd, &req, tmp.path()).unwrap();
    assert!(!first.hit());
    let again = layout_template(&sd, &req, tmp.path()).unwrap();
    assert!(again.hit());
    let computed = {
        let emb = sd.encode_prompts(&template, "").unwrap();
        template_maps(&sd, &emb, &init, 20, 7.5, &tpos, 0..4).unwrap()
    };
    for t in [&first.value, &again.value] {
        assert_eq!(t.steps.len(), 4);
        for (step, maps) in &computed.steps {
            assert_eq!(t.steps[step].len(), maps.len());
            for ((s1, m1), (s2, m2)) in t.steps[step].iter().zip(maps) {
                assert_eq!(s1, s2);
                assert_eq!(max_abs_diff(m1, m2), 0.0, "{step} {s1}");
            }
        }
    }
    // Another seed is another template.
    let other = sd.initial_latents(SIZE, SIZE, 5).unwrap();
    let miss = layout_template(
        &sd,
        &TemplateRequest {
            init: &other,
            ..req
        },
        tmp.path(),
    )
    .unwrap();
    assert!(!miss.hit());

    // Two methods (model keys) with the same base model, prompt and seed share one template; the
    // result with the cached template is the one computed without it.
    let image = tmp.path().join("ref.png");
    reference_image().save(&image).unwrap();
    let config = GuidanceConfig {
        components: guidance::config::Components::Layout,
        ..Default::default()
    };
    let request = |model_key: &str, cache: &str| {
        pnd_request(&init, &image, model_key, tmp.path().join(cache))
    };
    let [a, b, fresh] = [
        ("method-a", "shared"),
        ("method-b", "shared"),
        ("method-b", "fresh"),
    ]
    .map(|(key, cache)| {
        pick_and_draw(&sd, None, &config, &request(key, cache), &mut |_, _| {}).unwrap()
    });
    assert!(!a.timings.template_cache_hit && b.timings.template_cache_hit);
    assert!(!fresh.timings.template_cache_hit);
    assert_eq!(max_abs_diff(&b.latents, &fresh.latents), 0.0);
}

#[test]
fn a_guided_f16_pass_stays_finite_and_each_update_lowers_its_loss() {
    // Each update is a step of length 0.05 along −∇ (the latent's norm is 16), large enough for
    // f16's resolution.
    guided_half_pass_lowers_its_losses(DType::F16, 0.05, true);
}

#[test]
fn a_guided_bf16_pass_stays_finite_and_each_update_lowers_its_loss() {
    // bf16 keeps 8 bits of mantissa (f16: 11): a step of 0.05 would round away in most elements,
    // and the loss itself is known only roughly: at the same latent the gradient pass and a plain
    // forward (other kernels, other roundings) gave appearance losses 0.004–0.12 apart here, as
    // the masks' thresholds flip. One update may land inside that noise; each step's three
    // updates together must lower its loss.
    guided_half_pass_lowers_its_losses(DType::BF16, 0.2, false);
}

/// The gradient pass in the model's half precision `dtype`; the maps and features enter the
/// losses in f32 (`appearance::loss_precision`). At five steps, updates of length `step_len` along
/// −∇ lower the loss (`each_update`: every one of the three; else the three together), and every
/// value stays finite.
fn guided_half_pass_lowers_its_losses(dtype: DType, step_len: f64, each_update: bool) {
    let sd = load(dtype);
    let (p, tpos, _) = tokens(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let config = GuidanceConfig::default();
    let (reference, template) = targets(&sd, &config, &p, &tpos);
    let ddim = sd.ddim(50).unwrap();
    for (k, &step) in [0usize, 5, 10, 15, 19].iter().enumerate() {
        let t = ddim.timesteps()[step];
        let targets = StepTargets {
            appearance: config.appearance_at(step).then_some(reference.as_slice()),
            layout: config.layout_at(step).then_some(template.as_slice()),
        };
        let mut z = randn(20 + k as u64, &[1, 4, 8, 8], dtype);
        let (mut first, mut last) = (None, f64::NAN);
        for it in 0..config.iterations {
            let StepGradient { loss: before, grad } =
                step_gradient(&sd.unet, &config, &z, t, &cond, &p, &targets).unwrap();
            assert_eq!(grad.dtype(), dtype);
            assert_eq!(
                before.total.dtype(),
                DType::F32,
                "the loss is computed in f32"
            );
            let l0 = before.total.to_scalar::<f32>().unwrap() as f64;
            let g: Vec<f32> = grad
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                l0.is_finite() && g.iter().all(|v| v.is_finite()),
                "step {step}: non-finite"
            );
            let gn = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            assert!(gn > 0.0, "step {step}: zero gradient");
            z = (&z - (grad * (step_len / gn)).unwrap()).unwrap();
            let l1 = step_loss(&sd.unet, &config, &z, t, &cond, &p, &targets)
                .unwrap()
                .total
                .to_scalar::<f32>()
                .unwrap() as f64;
            eprintln!("{dtype:?} step {step} iteration {it}: loss {l0:.6} → {l1:.6}");
            assert!(l1.is_finite(), "step {step}: loss {l0} → {l1}");
            assert!(!each_update || l1 < l0, "step {step}: loss {l0} → {l1}");
            first.get_or_insert(l0);
            last = l1;
        }
        let first = first.unwrap();
        assert!(
            last < first,
            "step {step}: loss {first} → {last} after the updates"
        );
    }
}

#[test]
fn null_text_inversion_of_an_f16_model_optimizes_in_f32_and_beats_plain_ddim() {
    // The UNet runs in f16; the null embedding, its Adam state and the fitted loss are f32 by
    // default (`null_text_precision = "f32"`), and the stored embeddings are the model's dtype.
    // 5 sampling steps of up to 5 Adam updates: f16 runs slowly on the CPU.
    let sd = load(DType::F16);
    let settings = InversionConfig {
        inner_steps: 5,
        ..Default::default()
    };
    let inv = invert(&sd, &reference_image(), "a sks dog", 5, &settings).unwrap();
    let r = &inv.report;
    println!("f16: {}", serde_json::to_string(r).unwrap());
    assert_eq!(inv.null_embeddings.dtype(), DType::F16);
    assert!(r.updates.iter().all(|&u| (1..=5).contains(&u)));
    assert!(r.psnr.is_finite() && r.final_mse.is_finite(), "{r:?}");
    assert!(r.trajectory_mse < r.trajectory_mse_ddim, "{r:?}");
}

/// Template maps of `PROMPT`'s template tokens at a latent drawn from `seed` (a stand-in for an
/// image's own layout template).
fn template_at(sd: &StableDiffusion, tpos: &[usize], seed: u64) -> Vec<(String, Tensor)> {
    let tcond = sd
        .encode_prompt(&template_prompt(PROMPT, Some("sks")))
        .unwrap();
    let mut tcap = SiteCapture::new(0, tpos.to_vec(), sd.unet.cross_attention_sites(), vec![]);
    sd.unet
        .forward_with(
            &randn(seed, &[1, 4, 8, 8], sd.dtype()),
            601.0,
            &tcond,
            &mut tcap,
        )
        .unwrap();
    tcap.maps
        .into_iter()
        .map(|(s, m)| (s, m.detach()))
        .collect()
}

#[test]
fn a_batch_gradient_is_each_images_own_gradient_and_matches_finite_differences() {
    use guidance::guide::{batch_step_gradient, batch_step_loss, BatchStepGradient};
    let sd = load(DType::F64);
    let (p, tpos, _) = tokens(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let config = GuidanceConfig::default();
    let (reference, _) = targets(&sd, &config, &p, &tpos);
    // Three images, each with its own template; the reference is shared.
    let templates: Vec<_> = (0..3).map(|i| template_at(&sd, &tpos, 60 + i)).collect();
    let zs: Vec<Tensor> = (0..3)
        .map(|i| randn(40 + i, &[1, 4, 8, 8], DType::F64))
        .collect();
    let z = Tensor::cat(&zs, 0).unwrap();
    for (app, lay) in [(true, true), (true, false), (false, true)] {
        let targets: Vec<StepTargets> = templates
            .iter()
            .map(|t| StepTargets {
                appearance: app.then_some(reference.as_slice()),
                layout: lay.then_some(t.as_slice()),
            })
            .collect();
        let BatchStepGradient { losses, grad, .. } =
            batch_step_gradient(&sd.unet, &config, &z, 601, &cond, &p, &targets).unwrap();
        assert_eq!(grad.dims(), &[3, 4, 8, 8]);
        for (i, zi) in zs.iter().enumerate() {
            let StepGradient { loss, grad: gi } =
                step_gradient(&sd.unet, &config, zi, 601, &cond, &p, &targets[i]).unwrap();
            let max_abs = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let scale = max_abs(&gi);
            let err = max_abs(&(grad.narrow(0, i, 1).unwrap() - &gi).unwrap());
            eprintln!("app={app} lay={lay} image {i}: max |∇ batch − ∇ alone| {err:e} (max |∇| {scale:e})");
            assert!(
                scale > 0.0 && err <= 1e-9 * scale.max(1.0),
                "image {i}: {err}"
            );
            let (a, b) = (
                losses[i].total.to_scalar::<f64>().unwrap(),
                loss.total.to_scalar::<f64>().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-10 * b.abs().max(1.0),
                "image {i}: loss {a} vs {b}"
            );
            assert_eq!(losses[i].masks, loss.masks);
        }
        // The batch gradient is the gradient of the summed losses.
        let f = |x: &Tensor| -> f64 {
            batch_step_loss(&sd.unet, &config, x, 601, &cond, &p, &targets)
                .unwrap()
                .iter()
                .map(|l| l.total.to_scalar::<f64>().unwrap())
                .sum()
        };
        let directions: Vec<Tensor> = (0..3)
            .map(|k| {
                let u = randn(200 + k, &[3, 4, 8, 8], DType::F64);
                let norm = u.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
                u.broadcast_div(&norm).unwrap()
            })
            .collect();
        let label = format!("batch of 3, app={app} lay={lay}");
        assert_directional_gradient(f, &z, &grad, &directions, 1e-5, &label);
    }
    // Targets for another number of images than the latents hold: one clear error.
    let one = [StepTargets {
        appearance: Some(reference.as_slice()),
        layout: None,
    }];
    let err = batch_step_loss(&sd.unet, &config, &z, 601, &cond, &p, &one)
        .err()
        .expect("3 latents, 1 set of targets")
        .to_string();
    assert!(
        err.contains("[1, 4, h, w]") && err.contains("[3, 4, 8, 8]"),
        "{err}"
    );
}

#[test]
fn a_guided_batch_of_three_seeds_equals_three_single_runs() {
    use guidance::config::Window;
    use guidance::pipeline::pick_and_draw;
    let sd = load(DType::F32);
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("ref.png");
    reference_image().save(&image).unwrap();
    let config = GuidanceConfig {
        layout_window: Window { start: 0, end: 4 },
        appearance_window: Window { start: 4, end: 8 },
        inversion: InversionConfig {
            inner_steps: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let seeds = [0u64, 1, 2];
    let key = model_dir().display().to_string();
    let request = |init: &Tensor, cache: &str, traces: Vec<PathBuf>| {
        let mut r = pnd_request(init, &image, &key, tmp.path().join(cache));
        r.steps = 20;
        r.trace = traces;
        r
    };
    // The batch first, with its own cache: its templates are computed, not read back.
    let init = sd.seeded_latents(SIZE, SIZE, &seeds).unwrap();
    let traces: Vec<PathBuf> = seeds
        .iter()
        .map(|s| tmp.path().join(format!("batch-{s}.jsonl")))
        .collect();
    let mut steps = 0;
    let batch = pick_and_draw(
        &sd,
        None,
        &config,
        &request(&init, "cache-batch", traces.clone()),
        &mut |_, _| steps += 1,
    )
    .unwrap();
    assert_eq!(steps, 20);
    assert!(!batch.timings.template_cache_hit);
    assert_eq!(batch.latents.dims(), &[3, 4, 8, 8]);
    for (i, &s) in seeds.iter().enumerate() {
        let init = sd.initial_latents(SIZE, SIZE, s).unwrap();
        let trace = tmp.path().join(format!("single-{s}.jsonl"));
        let single = pick_and_draw(
            &sd,
            None,
            &config,
            &request(&init, "cache-single", vec![trace.clone()]),
            &mut |_, _| {},
        )
        .unwrap();
        let scale = single
            .latents
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = max_abs_diff(&batch.latents.narrow(0, i, 1).unwrap(), &single.latents);
        eprintln!("guided seed {s}: max |batch − single| {err:e} (latents' max |z| {scale})");
        // 2e-4: the tiny guided model drives latents to |z| ≈ 600, where the batched GEMMs'
        // other summation order moves them by up to 1.15e-4 × |z| since the CPU host kernels of
        // issue 13 (measured on seed 2; 1e-4 held before them).
        assert!(err <= 2e-4 * scale, "seed {s}: {err} > 2e-4 × {scale}");
        // Each image's trace is its own run's trace, up to float noise: the batched UNet sums in
        // another order (≈1e-7 relative), which can move a pixel of a thresholded mask across τ.
        let (b, o) = (
            guidance::trace::read_trace(&traces[i]).unwrap(),
            guidance::trace::read_trace(&trace).unwrap(),
        );
        assert_eq!(b.len(), 24, "8 guided steps × 3 iterations");
        assert_eq!(b.len(), o.len());
        let (mut worst_loss, mut mask_pixels) = (0.0f64, 0usize);
        for (rb, ro) in b.iter().zip(&o) {
            assert_eq!((rb.step, rb.iteration), (ro.step, ro.iteration));
            for (x, y) in [(rb.loss_app, ro.loss_app), (rb.loss_lay, ro.loss_lay)] {
                assert_eq!(x.is_some(), y.is_some(), "{rb:?} vs {ro:?}");
                if let (Some(x), Some(y)) = (x, y) {
                    worst_loss = worst_loss.max((x - y).abs() / y.abs().max(1e-12));
                }
            }
            assert_eq!(rb.masks.len(), ro.masks.len());
            for (mb, mo) in rb.masks.iter().zip(&ro.masks) {
                assert_eq!((&mb.layer, mb.reference), (&mo.layer, mo.reference));
                mask_pixels += mb.generated.abs_diff(mo.generated);
            }
        }
        eprintln!(
            "guided seed {s}: trace losses within {worst_loss:e} relative, generated masks differ by {mask_pixels} pixel(s) in all"
        );
        assert!(
            worst_loss <= 1e-2,
            "seed {s}: trace losses differ by {worst_loss:e}"
        );
        assert!(
            mask_pixels <= 3,
            "seed {s}: masks differ by {mask_pixels} pixels"
        );
    }
    // A trace list of another length than the batch: one clear error.
    let err = pick_and_draw(
        &sd,
        None,
        &config,
        &request(&init, "cache-batch", traces[..2].to_vec()),
        &mut |_, _| {},
    )
    .err()
    .expect("3 images, 2 traces")
    .to_string();
    assert!(
        err.contains("[2, 4, h, w]") && err.contains("[3, 4, 8, 8]"),
        "{err}"
    );
}

/// [`guided_setup`] over 4 sampling steps, with the layout window on the first two and the
/// appearance window on the last two: every cache entry is made, at a fraction of the cost.
fn short_guided_setup() -> (
    StableDiffusion,
    tempfile::TempDir,
    Tensor,
    guidance::pipeline::PickAndDrawRequest,
    GuidanceConfig,
) {
    use guidance::config::Window;
    let (sd, tmp, init, mut req, mut config) = guided_setup();
    req.steps = 4;
    config.layout_window = Window { start: 0, end: 2 };
    config.appearance_window = Window { start: 2, end: 4 };
    (sd, tmp, init, req, config)
}

/// The cache entry of `req`'s cache folder whose name starts with `prefix` (one of each kind in a
/// one-image run).
fn cache_entry(dir: &std::path::Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".safetensors")
        })
        .collect();
    assert_eq!(found.len(), 1, "{prefix}: {found:?}");
    found[0].clone()
}

/// Writes at `path` the damage `damage` done to the entry `good` (its clean bytes), and says what
/// its warning must say.
fn damage_entry(path: &std::path::Path, good: &[u8], damage: &str) -> &'static str {
    use weights::files::{load_checked, save_checked, save_plain, MissingChecksum};
    let header = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let n = good.len();
    let mut bytes = good.to_vec();
    let says = match damage {
        "truncated" => {
            bytes.truncate(n / 2);
            "not a safetensors file"
        }
        "garbage" => {
            bytes = b"<html>502 Bad Gateway</html>".repeat(9);
            "not a safetensors file"
        }
        "values zeroed" => {
            bytes[header..].iter_mut().for_each(|b| *b = 0);
            "checksum mismatch"
        }
        "flipped byte" => {
            bytes[header + (n - header) / 2] ^= 0x08;
            "checksum mismatch"
        }
        "NaN" | "no checksum" => {
            // Written whole, so only the NaN (under a valid checksum) or the missing checksum is
            // wrong with it.
            std::fs::write(path, good).unwrap();
            let mut f = load_checked(path, &Device::Cpu, MissingChecksum::Reject).unwrap();
            if damage == "no checksum" {
                save_plain(&f.tensors, path).unwrap();
                return "no checksum";
            }
            let mut names: Vec<String> = f.tensors.keys().cloned().collect();
            names.sort();
            let name = names
                .iter()
                .find(|k| f.tensors[*k].dtype() == DType::F32)
                .unwrap()
                .clone();
            let t = &f.tensors[&name];
            let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let i = v.len() / 3;
            v[i] = f32::NAN;
            let nan = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            f.tensors.insert(name, nan);
            save_checked(&f.tensors, &f.metadata, path).unwrap();
            return "holds a NaN or infinite value";
        }
        _ => unreachable!("{damage}"),
    };
    std::fs::write(path, bytes).unwrap();
    says
}

/// Issue 25 item 3: a truncated, garbage, value-zeroed, one-byte-flipped, NaN or checksum-less
/// inversion, palette or layout template (and a damaged inversion report) is a cache miss: one
/// warning naming the file, the entry recomputed and replaced (it verifies again and holds the
/// clean entry's tensors), and the result exactly the clean run's. Before, these were errors
/// without a path on every rerun, or silently used.
#[test]
fn a_damaged_cache_entry_is_warned_recomputed_and_replaced() {
    use guidance::pipeline::pick_and_draw;
    use weights::files::{load_checked, MissingChecksum};
    let (sd, tmp, _init, req, config) = short_guided_setup();
    let clean = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
    assert!(clean.timings.cache_warnings.is_empty());
    let dir = req.cache_dir.clone();
    let pristine: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    // Inversion (+ its report), palette, template.
    assert_eq!(pristine.len(), 4, "{pristine:?}");
    let reference = tmp.path().join("reference.safetensors");
    let tensors_of = |path: &std::path::Path, bytes: &[u8]| {
        std::fs::write(&reference, bytes).unwrap();
        let want = load_checked(&reference, &Device::Cpu, MissingChecksum::Reject).unwrap();
        let got = load_checked(path, &Device::Cpu, MissingChecksum::Reject).unwrap();
        (want, got)
    };
    let mut cases = 0;
    for kind in ["inversion-", "palette-", "template-"] {
        let path = cache_entry(&dir, kind);
        let good = &pristine.iter().find(|(p, _)| *p == path).unwrap().1;
        for damage in [
            "truncated",
            "garbage",
            "values zeroed",
            "flipped byte",
            "NaN",
            "no checksum",
        ] {
            for (p, b) in &pristine {
                std::fs::write(p, b).unwrap();
            }
            let says = damage_entry(&path, good, damage);
            let out = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
            let w = &out.timings.cache_warnings;
            assert_eq!(w.len(), 1, "{kind} {damage}: {w:?}");
            assert_eq!(w[0].path, path, "{kind} {damage}");
            let text = w[0].to_string();
            assert!(
                text.contains(&path.display().to_string()) && text.contains(says),
                "{kind} {damage}: {text}"
            );
            assert_eq!(
                max_abs_diff(&out.latents, &clean.latents),
                0.0,
                "{kind} {damage}: the result moved"
            );
            let (want, got) = tensors_of(&path, good);
            assert_eq!(got.metadata, want.metadata, "{kind} {damage}");
            for (name, t) in &want.tensors {
                let g = &got.tensors[name];
                assert_eq!(g.dims(), t.dims(), "{kind} {damage} {name}");
                // Masks are u32 indices far below 2^24: exact in f32.
                let (a, b) = (
                    g.to_dtype(DType::F32).unwrap(),
                    t.to_dtype(DType::F32).unwrap(),
                );
                assert_eq!(max_abs_diff(&a, &b), 0.0, "{kind} {damage} {name}");
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 18);

    // The inversion's report: truncated, or changed so it no longer matches its tensors.
    let inversion = cache_entry(&dir, "inversion-");
    let report = inversion.with_extension("json");
    let good = pristine
        .iter()
        .find(|(p, _)| *p == report)
        .unwrap()
        .1
        .clone();
    for bad in [good[..good.len() / 2].to_vec(), {
        let mut b = good.clone();
        let i = b.iter().position(|c| c.is_ascii_digit()).unwrap();
        b[i] = if b[i] == b'9' { b'8' } else { b[i] + 1 };
        b
    }] {
        for (p, b) in &pristine {
            std::fs::write(p, b).unwrap();
        }
        std::fs::write(&report, bad).unwrap();
        let out = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
        let w = &out.timings.cache_warnings;
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].path, inversion);
        assert!(
            w[0].to_string().contains(&report.display().to_string()),
            "{}",
            w[0]
        );
        assert_eq!(max_abs_diff(&out.latents, &clean.latents), 0.0);
        assert_eq!(std::fs::read(&report).unwrap(), good);
    }
    // Once replaced, the entries are hits again, with no warning.
    let out = pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
    assert!(out.timings.cache_hit && out.timings.template_cache_hit);
    assert!(out.timings.cache_warnings.is_empty());
}

/// Issue 25 item 7: the cache's files (and a trace) get a new file's permissions, not 0600.
#[test]
fn cache_files_get_a_new_files_permissions() {
    use guidance::pipeline::pick_and_draw;
    let (sd, tmp, _init, mut req, config) = short_guided_setup();
    req.trace = vec![tmp.path().join("trace.jsonl")];
    pick_and_draw(&sd, None, &config, &req, &mut |_, _| {}).unwrap();
    let probe = tmp.path().join("probe");
    let want = std::fs::File::create(&probe)
        .unwrap()
        .metadata()
        .unwrap()
        .permissions();
    let mut seen = 0;
    for e in std::fs::read_dir(&req.cache_dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions(),
            want,
            "{}",
            p.display()
        );
        seen += 1;
    }
    assert_eq!(seen, 4);
    assert_eq!(
        std::fs::metadata(&req.trace[0]).unwrap().permissions(),
        want
    );
}

/// The tiny UNet built from a map of its weights, so a test can look them up by tensor id.
fn unet_and_weights(
    dtype: DType,
) -> (
    diffusion::unet::UNet2DConditionModel,
    std::collections::HashMap<String, Tensor>,
) {
    let dir = model_dir().join("unet");
    let cfg = diffusion::unet::UNet2DConditionConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json")).unwrap(),
    )
    .unwrap();
    let weights: std::collections::HashMap<String, Tensor> = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
    .collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), dtype, &Device::Cpu);
    (
        diffusion::unet::UNet2DConditionModel::new(&cfg, vb).unwrap(),
        weights,
    )
}

/// A guided gradient pass on the generic path (what CUDA runs) gives no UNet weight a gradient:
/// candle's built-in backward inserts a gradient-store entry for every operand it differentiates
/// (its `Conv2D` backward runs `conv_transpose2d` and inserts the kernel's gradient; matmul and
/// broadcast ops insert the weights' or their views'), so no entry keyed by a weight, and no 4-D
/// entry (conv kernels, per-head attention operands) besides the latent's, means no weight
/// gradient was computed and no `Conv2D` backward ran. The few small entries left belong to the
/// loss's own constants (template maps, normalization ranges).
#[test]
fn a_generic_guided_pass_computes_no_weight_gradient() {
    let _guard = layers::kernels::force_generic();
    let sd = load(DType::F32);
    let (unet, weights) = unet_and_weights(DType::F32);
    let (p, tpos, _) = tokens(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let config = GuidanceConfig::default();
    let (reference, template) = targets(&sd, &config, &p, &tpos);
    let targets = [StepTargets {
        appearance: Some(reference.as_slice()),
        layout: Some(template.as_slice()),
    }];
    let var = candle_core::Var::from_tensor(&randn(7, &[1, 4, 8, 8], DType::F32)).unwrap();
    let losses =
        guidance::guide::batch_step_loss(&unet, &config, var.as_tensor(), 601, &cond, &p, &targets)
            .unwrap();
    assert!(losses[0].loss_app.is_some() && losses[0].loss_lay.is_some());
    let grads = losses[0].total.backward().unwrap();
    assert!(grads.get(var.as_tensor()).is_some(), "no latent gradient");
    let with_grad: Vec<&String> = weights
        .iter()
        .filter(|(_, w)| grads.get(w).is_some())
        .map(|(name, _)| name)
        .collect();
    assert!(
        with_grad.is_empty(),
        "weights with a gradient: {with_grad:?}"
    );
    let latent = var.as_tensor().id();
    let four_d: Vec<Vec<usize>> = grads
        .get_ids()
        .filter(|&&id| id != latent)
        .map(|&id| grads.get_id(id).unwrap().dims().to_vec())
        .filter(|d| d.len() == 4)
        .collect();
    assert!(four_d.is_empty(), "4-D gradient entries: {four_d:?}");
    let entries = grads.get_ids().count();
    let elements: usize = grads
        .get_ids()
        .filter(|&&id| id != latent)
        .map(|&id| grads.get_id(id).unwrap().elem_count())
        .sum();
    let conv_kernels = weights.values().filter(|w| w.rank() == 4).count();
    assert!(
        conv_kernels > 10,
        "the tiny UNet has {conv_kernels} conv kernels"
    );
    println!(
        "generic guided pass: {entries} gradient entries (latent + loss constants, \
         {elements} elements besides the latent's), none of {} weights ({conv_kernels} conv \
         kernels)",
        weights.len()
    );
}

/// The device→host copies of one gradient pass ([`guidance::readback`]): one for all the subject
/// masks of the batch (when the appearance term is on) and one for every loss value and gradient
/// norm, whatever the number of images and layers.
#[test]
fn a_gradient_pass_reads_back_the_masks_once_and_the_scalars_once() {
    use guidance::guide::{batch_step_gradient, BatchStepGradient};
    use guidance::readback::reads;
    let sd = load(DType::F32);
    let (p, tpos, _) = tokens(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let config = GuidanceConfig::default();
    let (reference, _) = targets(&sd, &config, &p, &tpos);
    let templates: Vec<_> = (0..2).map(|i| template_at(&sd, &tpos, 70 + i)).collect();
    let z = randn(44, &[2, 4, 8, 8], DType::F32);
    for (app, lay, want) in [(true, true, 2), (true, false, 2), (false, true, 1)] {
        let targets: Vec<StepTargets> = templates
            .iter()
            .map(|t| StepTargets {
                appearance: app.then_some(reference.as_slice()),
                layout: lay.then_some(t.as_slice()),
            })
            .collect();
        let before = reads();
        let BatchStepGradient {
            losses,
            grad,
            grad_norms,
        } = batch_step_gradient(&sd.unet, &config, &z, 601, &cond, &p, &targets).unwrap();
        let used = reads() - before;
        println!(
            "app={app} lay={lay}, 2 images, {} appearance and {} layout layers: {used} reads",
            if app { reference.len() } else { 0 },
            if lay { templates[0].len() } else { 0 },
        );
        assert_eq!(used, want, "app={app} lay={lay}");
        for (i, loss) in losses.iter().enumerate() {
            assert_eq!(loss.loss_app.is_some(), app);
            assert_eq!(loss.loss_lay.is_some(), lay);
            let norm = grad
                .narrow(0, i, 1)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(norm > 0.0);
            assert!(
                (grad_norms[i] - norm).abs() <= 1e-12 * norm,
                "image {i}: norm {} vs {norm}",
                grad_norms[i]
            );
        }
    }
}
