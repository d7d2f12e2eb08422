//! Pick-and-Draw on a tiny SD-1.x-shaped model (built with the `tiny` crate, the real CLIP
//! tokenizer from the diffusion crate's fixtures): exact gradients through the whole UNet,
//! guided updates that lower their loss, the trace of a full guided run, null-text inversion
//! against plain DDIM inversion, and the palette cache.

use candle_core::{DType, Device, Tensor};
use diffusion::pipeline::{LoadOptions, PromptEmbeddings, StableDiffusion};
use guidance::capture::{attn2_site, SiteCapture};
use guidance::config::{Distance, GuidanceConfig, InversionConfig};
use guidance::guide::{
    guided_sample, prompt_tokens, step_gradient, step_loss, template_maps, template_prompt,
    GuidedRun, PromptTokens, ReferenceLayer, StepTargets,
};
use guidance::inversion::{invert, palette_from_inversion, CacheKey, CacheStatus, PaletteCache};
use guidance::maps::{mask_indices, min_max_normalize};
use guidance::testutil::relative_error;
use std::path::PathBuf;
use std::sync::OnceLock;
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
    let (p, t) = prompt_tokens(
        &sd.tokenizer,
        PROMPT,
        "dog",
        Some("sks"),
        &sd.tokenizer,
        &template,
    )
    .unwrap();
    (p, t, template)
}

/// Reference layers and template maps taken from other latents, for tests of the loss alone.
fn targets(
    sd: &StableDiffusion,
    cfg: &GuidanceConfig,
    p: &PromptTokens,
    tpos: &[usize],
) -> (Vec<ReferenceLayer>, Vec<(String, Tensor)>) {
    let dt = sd.dtype();
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let sites = cfg.appearance_sites(3);
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
                mask: mask_indices(&norm, cfg.tau).unwrap(),
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
        let cfg = GuidanceConfig {
            distance,
            ..Default::default()
        };
        let (reference, template) = targets(&sd, &cfg, &p, &tpos);
        let t = StepTargets {
            appearance: app.then_some(reference.as_slice()),
            layout: lay.then_some(template.as_slice()),
        };
        let (loss, grad) = step_gradient(&sd.unet, &cfg, &z, 601, &cond, &p, &t).unwrap();
        if app {
            assert_eq!(loss.skipped, 0, "{:?}", loss.masks);
        }
        let f = |x: &Tensor| -> f64 {
            step_loss(&sd.unet, &cfg, x, 601, &cond, &p, &t)
                .unwrap()
                .total
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-5;
        let (mut analytic, mut numeric) = (vec![], vec![]);
        for k in 0..3 {
            let u = randn(100 + k, &[1, 4, 8, 8], DType::F64);
            let u = (&u
                / u.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap())
            .unwrap();
            let fd = (f(&(&z + (&u * h).unwrap()).unwrap())
                - f(&(&z - (&u * h).unwrap()).unwrap()))
                / (2.0 * h);
            analytic.push(
                (&grad * &u)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
            );
            numeric.push(fd);
        }
        let err = relative_error(&analytic, &numeric);
        println!("{distance:?} app={app} lay={lay}: rel err {err:e}, analytic {analytic:?} numeric {numeric:?}");
        assert!(numeric.iter().any(|v| v.abs() > 1e-8), "zero gradient");
        assert!(err <= 1e-4, "relative error {err:e}");
    }
}

#[test]
fn every_guided_update_lowers_its_loss() {
    let sd = load(DType::F64);
    let (p, tpos, _) = tokens(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let cfg = GuidanceConfig::default();
    let (reference, template) = targets(&sd, &cfg, &p, &tpos);
    let ddim = sd.ddim(50).unwrap();
    for (k, &step) in [0usize, 5, 9, 10, 15, 19].iter().enumerate() {
        let t = ddim.timesteps()[step];
        let targets = StepTargets {
            appearance: cfg.appearance_at(step).then_some(reference.as_slice()),
            layout: cfg.layout_at(step).then_some(template.as_slice()),
        };
        let mut z = randn(20 + k as u64, &[1, 4, 8, 8], DType::F64);
        for _ in 0..cfg.iterations {
            let (before, grad) = step_gradient(&sd.unet, &cfg, &z, t, &cond, &p, &targets).unwrap();
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
            let l1 = step_loss(&sd.unet, &cfg, &z, t, &cond, &p, &targets)
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
    let cfg = GuidanceConfig {
        inversion: InversionConfig {
            inner_steps: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let (p, tpos, template) = tokens(&sd);
    let sites = cfg.appearance_sites(3);
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
        inversion: format!("{:?}", cfg.inversion),
        dtype: "f32".into(),
    };
    let subject = *sd
        .tokenizer
        .word_positions("a sks dog", "dog")
        .unwrap()
        .last()
        .unwrap();
    let window = cfg.appearance_window.range();
    let build = |calls: &mut usize| {
        let (inv, s1) = cache.inversion(&key, &sd, || {
            *calls += 1;
            invert(&sd, &img, "a sks dog", 50, &cfg.inversion)
        })?;
        let (pal, s2) = cache.palette(&key, &sites, cfg.tau, window.clone(), &sd, || {
            *calls += 1;
            palette_from_inversion(
                &sd,
                &inv,
                "a sks dog",
                subject,
                &sites,
                cfg.tau,
                7.5,
                window.clone(),
            )
        })?;
        Ok::<_, guidance::Error>((pal, s1, s2))
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
            let d = (&a.features - &b.features)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
        }
    }

    let init = sd.initial_latents(SIZE, SIZE, 3).unwrap();
    let temb = sd.encode_prompts(&template, "").unwrap();
    let tmaps =
        template_maps(&sd, &temb, &init, 50, 7.5, &tpos, cfg.layout_window.range()).unwrap();
    assert_eq!(tmaps.steps.len(), 10);
    assert_eq!(tmaps.steps[&0].len(), 16);
    let emb: PromptEmbeddings = sd.encode_prompts(PROMPT, "").unwrap();
    let run = GuidedRun {
        sd: &sd,
        cfg: &cfg,
        emb: &emb,
        steps: 50,
        cfg_scale: 7.5,
        tokens: p,
        palette: Some(&palette),
        template: Some(&tmaps),
    };
    let trace_path = tmp.path().join("trace.jsonl");
    let mut writer = guidance::trace::TraceWriter::create(&trace_path).unwrap();
    let z = guided_sample(&run, &init, &mut |row| writer.write(row), &mut |_, _| {}).unwrap();
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
    let plain = sd
        .sample(
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
        .unwrap();
    let d = (&z - &plain)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-4, "guided and unguided samples are equal");
}

#[test]
fn pick_and_draw_end_to_end_with_cache_and_components() {
    use guidance::config::Components;
    use guidance::pipeline::{pick_and_draw, PickAndDrawRequest};
    let sd = load(DType::F32);
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("ref.png");
    reference_image().save(&image).unwrap();
    let init = sd.initial_latents(SIZE, SIZE, 5).unwrap();
    let mut req = PickAndDrawRequest {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        steps: 50,
        cfg_scale: 7.5,
        height: SIZE,
        width: SIZE,
        init: init.clone(),
        reference: image,
        class: "dog".into(),
        identifier: Some("sks".into()),
        template_prompt: None,
        model_key: model_dir().display().to_string(),
        cache_dir: tmp.path().join("cache"),
        trace: Some(tmp.path().join("t.jsonl")),
    };
    let cfg = GuidanceConfig {
        inversion: InversionConfig {
            inner_steps: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let (z1, t1) = pick_and_draw(&sd, None, &cfg, &req, &mut |_, _| {}).unwrap();
    assert!(!t1.cache_hit);
    assert_eq!(
        guidance::trace::read_trace(req.trace.as_ref().unwrap())
            .unwrap()
            .len(),
        60
    );
    let (z2, t2) = pick_and_draw(&sd, None, &cfg, &req, &mut |_, _| {}).unwrap();
    assert!(t2.cache_hit, "second run missed the cache");
    let d = (&z1 - &z2)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0, "a cached palette changed the result");

    // No loss component: exactly the unguided sample, no trace rows.
    let none = GuidanceConfig {
        components: Components::None,
        ..cfg.clone()
    };
    req.trace = Some(tmp.path().join("none.jsonl"));
    let (z0, _) = pick_and_draw(&sd, None, &none, &req, &mut |_, _| {}).unwrap();
    let plain = sd
        .sample(
            &diffusion::pipeline::SampleRequest {
                prompt: PROMPT.into(),
                steps: 50,
                height: SIZE,
                width: SIZE,
                init_latents: Some(init),
                ..Default::default()
            },
            &mut |_, _| {},
        )
        .unwrap();
    let d = (&z0 - &plain)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    assert!(guidance::trace::read_trace(req.trace.as_ref().unwrap())
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
