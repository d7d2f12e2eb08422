//! Pick-and-Draw on BLIP-Diffusion (issue 7) with the tiny BLIP model of the `tiny` crate
//! (`tiny::blip`, the real CLIP tokenizer from the diffusion crate's fixtures), on a
//! short schedule with the windows scaled to it: the trace of a full guided run, the cache, the
//! unguided equivalence, token positions, and guided updates that lower their own loss.

mod support;

use candle_core::{DType, Device, Tensor};
use diffusion::blip::{BlipDiffusionPipeline, BlipRequest};
use guidance::blip::{
    blip_prompt_tokens, blip_reference_palette, pick_and_draw_blip, BlipPickAndDrawRequest,
};
use guidance::config::{Components, GuidanceConfig, InversionConfig, Window};
use guidance::guide::{step_gradient, step_loss, template_maps, StepGradient, StepTargets};
use guidance::pipeline::Timings;
use std::path::PathBuf;
use std::sync::OnceLock;
use support::{assert_directional_gradient, max_abs_diff};
use tiny::blip::{write_tiny_blip_model, TinyBlipSpec};

const SIZE: usize = 64;
const STEPS: usize = 8;

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    reference: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../diffusion/tests/fixtures/pipeline/model/tokenizer");
        let model = tmp.path().join("blip");
        write_tiny_blip_model(&model, 5, &tok, &TinyBlipSpec::default()).unwrap();
        // A bright blob on a dark background: the "subject".
        let reference = tmp.path().join("ref.png");
        image::RgbImage::from_fn(48, 40, |x, y| {
            let (dx, dy) = (x as f64 - 24.0, y as f64 - 20.0);
            if dx * dx + dy * dy < 150.0 {
                image::Rgb([230, 180, 60])
            } else {
                image::Rgb([20, (x * 3) as u8, (y * 4) as u8])
            }
        })
        .save(&reference)
        .unwrap();
        Fixture {
            _tmp: tmp,
            model,
            reference,
        }
    })
}

fn pipe() -> BlipDiffusionPipeline {
    BlipDiffusionPipeline::load(fixture().model.to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
}

fn blip_request(prompt: &str) -> BlipRequest {
    BlipRequest {
        reference: fixture().reference.clone(),
        subject_category: "dog".into(),
        prompt: prompt.into(),
        steps: STEPS,
        height: SIZE,
        width: SIZE,
        seed: 3,
        ..Default::default()
    }
}

/// The paper's settings with the windows scaled to 8 steps: layout [0, 2), appearance [2, 4).
fn short_config() -> GuidanceConfig {
    GuidanceConfig {
        layout_window: Window { start: 0, end: 2 },
        appearance_window: Window { start: 2, end: 4 },
        iterations: 3,
        inversion: InversionConfig {
            inner_steps: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn request(cache: &std::path::Path, trace: Option<PathBuf>) -> BlipPickAndDrawRequest {
    BlipPickAndDrawRequest {
        blip: blip_request("in the jungle"),
        template_prompt: None,
        model_key: fixture().model.display().to_string(),
        cache_dir: cache.to_path_buf(),
        trace,
    }
}

#[test]
fn guided_blip_run_writes_a_full_trace_and_hits_the_cache() {
    let pipe = pipe();
    let config = short_config();
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace.jsonl");
    let req = request(&tmp.path().join("cache"), Some(trace.clone()));
    let first = pick_and_draw_blip(&pipe, &pipe.sd, &config, &req, &mut |_, _| {}).unwrap();
    let z = first.latents;
    assert!(!first.timings.cache_hit);
    assert!(first.skipped_updates.is_empty());
    assert_eq!(z.dims(), &[1, 4, SIZE / 8, SIZE / 8]);
    let rows = guidance::trace::read_trace(&trace).unwrap();
    assert_eq!(
        rows.len(),
        4 * 3,
        "(2 layout + 2 appearance steps) × 3 iterations"
    );
    let sites = config.appearance_sites(3).unwrap();
    for (k, r) in rows.iter().enumerate() {
        assert_eq!((r.step, r.iteration), (k / 3, k % 3), "{r:?}");
        assert_eq!(r.loss_lay.is_some(), r.step < 2, "{r:?}");
        assert_eq!(r.loss_app.is_some(), (2..4).contains(&r.step), "{r:?}");
        for v in [r.loss_lay, r.loss_app, r.grad_norm].into_iter().flatten() {
            assert!(v.is_finite(), "{r:?}");
        }
        assert!(!r.non_finite && r.grad_norm.is_some(), "{r:?}");
        assert_eq!(
            r.masks.len(),
            if r.loss_app.is_some() { sites.len() } else { 0 }
        );
        if r.loss_app.is_some() {
            assert!(r.skipped_layers < sites.len(), "every layer skipped: {r:?}");
        }
    }
    assert!(
        rows.iter().any(|r| r.grad_norm.unwrap() > 0.0),
        "no guidance gradient at all"
    );

    // The guidance changed the sample.
    let plain = pipe.generate(&req.blip, &mut |_, _| {}).unwrap();
    assert!(max_abs_diff(&z, &plain.latents) > 1e-5);

    // Second run: inversion and palette from the cache, same result.
    let second = pick_and_draw_blip(&pipe, &pipe.sd, &config, &req, &mut |_, _| {}).unwrap();
    assert!(second.timings.cache_hit, "second run missed the cache");
    assert!(second.timings.template_cache_hit);
    assert_eq!(
        max_abs_diff(&z, &second.latents),
        0.0,
        "a cached palette changed the result"
    );
}

#[test]
fn without_guidance_the_result_is_blip_diffusions_own() {
    let pipe = pipe();
    let tmp = tempfile::tempdir().unwrap();
    let req = request(&tmp.path().join("cache"), Some(tmp.path().join("t.jsonl")));
    let plain = pipe.generate(&req.blip, &mut |_, _| {}).unwrap();

    // η = 0: every update is a no-op, the trace is still full.
    let zero = GuidanceConfig {
        eta: 0.0,
        ..short_config()
    };
    let z = pick_and_draw_blip(&pipe, &pipe.sd, &zero, &req, &mut |_, _| {})
        .unwrap()
        .latents;
    assert_eq!(max_abs_diff(&z, &plain.latents), 0.0);
    assert_eq!(
        guidance::trace::read_trace(req.trace.as_ref().unwrap())
            .unwrap()
            .len(),
        12
    );

    // No loss component: no inversion, no template, no trace rows.
    let req = request(&tmp.path().join("cache-none"), req.trace.clone());
    let none = GuidanceConfig {
        components: Components::None,
        ..short_config()
    };
    let out = pick_and_draw_blip(&pipe, &pipe.sd, &none, &req, &mut |_, _| {}).unwrap();
    let (z, t) = (out.latents, out.timings);
    assert_eq!(max_abs_diff(&z, &plain.latents), 0.0);
    assert!(guidance::trace::read_trace(req.trace.as_ref().unwrap())
        .unwrap()
        .is_empty());
    assert_eq!((t.inversion_s, t.palette_s), (0.0, 0.0));
    assert!(
        !tmp.path().join("cache-none").exists(),
        "nothing was cached"
    );
}

#[test]
fn token_positions_follow_the_inserted_queries() {
    let pipe = pipe();
    let tok = &pipe.blip.tokenizer;
    let cond = pipe.condition(&blip_request("in the jungle")).unwrap();
    let q = cond.num_query_tokens();
    assert_eq!(q, TinyBlipSpec::default().num_query_tokens);
    assert_eq!(cond.query_positions(), 2..2 + q);
    let m =
        blip_prompt_tokens(tok, &cond, "dog", &pipe.sd.tokenizer, "a dog in the jungle").unwrap();
    let (p, t) = (m.prompt, m.template);
    // `<bos> a [queries] dog in the jungle , a dog …`
    assert_eq!(p.subject, 2 + q);
    assert_eq!(p.layout, vec![1, 2 + q, 3 + q, 4 + q, 5 + q]);
    assert_eq!(t, vec![1, 2, 3, 4, 5]);

    // A prompt kept whole (`a dog a red dog`): the pipeline's `a dog` prefix is dropped before
    // matching the template `a red dog`; the subject token stays the one after the queries.
    let cond = pipe.condition(&blip_request("a red dog")).unwrap();
    assert_eq!(cond.single_prompt, "a dog a red dog");
    let m = blip_prompt_tokens(tok, &cond, "dog", &pipe.sd.tokenizer, "a red dog").unwrap();
    let (p, t) = (m.prompt, m.template);
    assert_eq!(p.subject, 2 + q);
    assert_eq!(p.layout, vec![3 + q, 4 + q, 5 + q]);
    assert_eq!(t, vec![1, 2, 3]);

    // A template of another length matches neither way: one clear error naming the tokens.
    let err = blip_prompt_tokens(
        tok,
        &cond,
        "dog",
        &pipe.sd.tokenizer,
        "a cat on the sofa at night",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cannot match the prompt tokens"), "{err}");
}

#[test]
fn guided_updates_lower_their_own_loss() {
    let pipe = pipe();
    let sd = &pipe.sd;
    let config = short_config();
    let tmp = tempfile::tempdir().unwrap();
    let req = request(&tmp.path().join("cache"), None);
    let palette = blip_reference_palette(&pipe, &config, &req, &mut Timings::default()).unwrap();
    let cond = pipe.condition(&req.blip).unwrap();
    let template = cond.single_prompt.clone();
    let m =
        blip_prompt_tokens(&pipe.blip.tokenizer, &cond, "dog", &sd.tokenizer, &template).unwrap();
    let (tokens, tpos) = (m.prompt, m.template);
    let init = pipe.initial_latents(&req.blip).unwrap();
    let temb = sd.encode_prompts(&template, "").unwrap();
    let tmaps = template_maps(
        sd,
        &temb,
        &init,
        STEPS,
        7.5,
        &tpos,
        config.layout_window.range(),
    )
    .unwrap();
    let ddim = sd.ddim(STEPS).unwrap();
    let z = diffusion::noise::seeded_normal(9, &[1, 4, 8, 8], &Device::Cpu).unwrap();
    for (step, app) in [(1usize, false), (3, true)] {
        let targets = StepTargets {
            appearance: app.then(|| palette.steps[&step].as_slice()),
            layout: (!app).then(|| tmaps.steps[&step].as_slice()),
        };
        let t = ddim.timesteps()[step];
        let StepGradient { loss: before, grad } =
            step_gradient(&sd.unet, &config, &z, t, &cond.cond, &tokens, &targets).unwrap();
        let b = before.total.to_scalar::<f32>().unwrap();
        let gn = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gn > 0.0 && b > 0.0, "step {step}: loss {b}, |grad|² {gn}");
        // A small step along −∇ (scaled to a fixed latent displacement of 1e-3).
        let eta = 1e-3 / gn.sqrt() as f64;
        let z2 = (&z - (grad * eta).unwrap()).unwrap();
        let after = step_loss(&sd.unet, &config, &z2, t, &cond.cond, &tokens, &targets)
            .unwrap()
            .total
            .to_scalar::<f32>()
            .unwrap();
        assert!(after < b, "step {step}: loss {b} → {after}");
    }
}

#[test]
fn missing_subject_category_is_one_clear_error() {
    let pipe = pipe();
    let tmp = tempfile::tempdir().unwrap();
    let mut req = request(tmp.path(), None);
    req.blip.subject_category = " ".into();
    let err = pick_and_draw_blip(&pipe, &pipe.sd, &short_config(), &req, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("subject category"), "{err}");
}

/// d(α ℓ_app + β ℓ_lay)/dz through the whole UNet under the BLIP conditioning (queries in the
/// context), against central finite differences in f64 along random directions. The BLIP
/// conditioning and palette come from the f32 pipeline (candle's CPU layer norm, used by the
/// Q-Former, has no f64 kernel), the UNet and the gradients are f64.
#[test]
fn blip_guidance_gradient_matches_finite_differences() {
    let pipe = pipe();
    let opts = diffusion::pipeline::LoadOptions {
        dtype: DType::F64,
        ..Default::default()
    };
    let mut sd =
        diffusion::pipeline::StableDiffusion::load(fixture().model.to_str().unwrap(), &opts)
            .unwrap();
    sd.scheduler = pipe.sd.scheduler.clone();
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let config = short_config();
    let tmp = tempfile::tempdir().unwrap();
    let req = request(&tmp.path().join("cache"), None);
    let mut palette =
        blip_reference_palette(&pipe, &config, &req, &mut Timings::default()).unwrap();
    let reference: Vec<_> = palette
        .steps
        .remove(&2)
        .unwrap()
        .into_iter()
        .map(|mut l| {
            l.features = f64_(&l.features);
            l
        })
        .collect();
    let cond = pipe.condition(&req.blip).unwrap();
    let template = cond.single_prompt.clone();
    let m =
        blip_prompt_tokens(&pipe.blip.tokenizer, &cond, "dog", &sd.tokenizer, &template).unwrap();
    let (tokens, tpos) = (m.prompt, m.template);
    let init = f64_(&pipe.initial_latents(&req.blip).unwrap());
    let temb = sd.encode_prompts(&template, "").unwrap();
    let tmaps = template_maps(&sd, &temb, &init, STEPS, 7.5, &tpos, 0..3).unwrap();
    // Both terms at once: the appearance targets and the template maps of step 2.
    let targets = StepTargets {
        appearance: Some(reference.as_slice()),
        layout: Some(tmaps.steps[&2].as_slice()),
    };
    let c = f64_(&cond.cond);
    let t = sd.ddim(STEPS).unwrap().timesteps()[2];
    let z = diffusion::noise::seeded_normal(13, &[1, 4, 8, 8], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let StepGradient { loss, grad } =
        step_gradient(&sd.unet, &config, &z, t, &c, &tokens, &targets).unwrap();
    assert!(loss.loss_app.is_some() && loss.loss_lay.is_some());
    assert!(loss.skipped < reference.len(), "{:?}", loss.masks);
    let f = |x: &Tensor| -> f64 {
        step_loss(&sd.unet, &config, x, t, &c, &tokens, &targets)
            .unwrap()
            .total
            .to_scalar::<f64>()
            .unwrap()
    };
    let directions: Vec<Tensor> = (0..3u64)
        .map(|k| {
            diffusion::noise::seeded_normal(200 + k, &[1, 4, 8, 8], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        })
        .collect();
    assert_directional_gradient(f, &z, &grad, &directions, 1e-5, "BLIP");
}
