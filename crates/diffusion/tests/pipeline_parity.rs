//! The full pipeline against diffusers' `StableDiffusionPipeline` on the tiny fixture model, plus
//! Textual Inversion, DreamBooth and the loading errors (fixture: tools/fixtures/sd_pipeline.py).

mod pipeline_support;

use candle_core::{Device, Tensor};
use diffusion::hooks::NoHook;
use diffusion::pipeline::{LoadOptions, SampleRequest, StableDiffusion};
use pipeline_support::*;
use std::path::{Path, PathBuf};

fn load(model: &Path, opts: &LoadOptions) -> StableDiffusion {
    StableDiffusion::load(model.to_str().unwrap(), opts).unwrap()
}

/// The message of the error loading `model` with `opts` gives.
fn load_error(model: &Path, opts: &LoadOptions) -> String {
    StableDiffusion::load(model.to_str().unwrap(), opts)
        .err()
        .expect("the load should fail")
        .to_string()
}

/// Writes a safetensors file holding the one tensor `name`.
fn save_one(path: &Path, name: &str, t: Tensor) {
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(name.to_string(), t)]),
        path,
    )
    .unwrap();
}

fn request() -> SampleRequest {
    pipeline_support::fixture_request()
}

#[test]
fn first_cfg_noise_prediction_matches_diffusers() {
    let sd = load(&model_dir(), &LoadOptions::default());
    let exp = expected();
    let req = request();
    let emb = sd.encode_prompts(&req.prompt, "").unwrap();
    let ddim = sd.ddim(req.steps).unwrap();
    let t = ddim.timesteps()[0] as f64;
    let init = &exp["init_latents"];
    let input = Tensor::cat(&[init, init], 0).unwrap();
    let pred = sd.unet.forward(&input, t, &emb.batched().unwrap()).unwrap();
    let err = max_abs_diff(&pred, &exp["first_step_noise_pred"]);
    eprintln!("first-step noise prediction: max abs diff {err:e}");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn ten_step_cfg_sampling_and_png_match_diffusers() {
    let sd = load(&model_dir(), &LoadOptions::default());
    let exp = expected();
    let mut calls = 0;
    let latents = sd.sample(&request(), &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, 10);
    let err = max_abs_diff(&latents, &exp["final_latents"]);
    eprintln!("10-step final latents: max abs diff {err:e}");
    assert!(err <= 1e-3, "{err}");

    let img = sd.decode_images(&latents).unwrap().remove(0);
    let want = image::open(fixtures().join("expected.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), want.dimensions());
    let worst = img
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    let differing = img
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    eprintln!(
        "PNG: max abs diff {worst}/255, {differing} of {} values differ",
        want.as_raw().len()
    );
    assert!(worst <= 2, "{worst}/255");
}

#[test]
fn step_api_equals_sample() {
    let sd = load(&model_dir(), &LoadOptions::default());
    let mut req = request();
    req.steps = 3;
    let ddim = sd.ddim(3).unwrap();
    let emb = sd.encode_prompts(&req.prompt, "").unwrap();
    let mut z = req.init_latents.clone().unwrap();
    for i in 0..3 {
        z = sd
            .cfg_step(&ddim, &z, i, &emb, req.cfg_scale, &mut NoHook)
            .unwrap()
            .latents;
    }
    let whole = sd.sample(&req, &mut |_, _| {}).unwrap();
    assert_eq!(max_abs_diff(&z, &whole), 0.0);
}

#[test]
fn seeded_noise_is_reproducible_and_seed_dependent() {
    let sd = load(&model_dir(), &LoadOptions::default());
    let a = sd.initial_latents(64, 128, 1).unwrap();
    assert_eq!(a.dims(), &[1, 4, 8, 16]);
    assert_eq!(
        max_abs_diff(&a, &sd.initial_latents(64, 128, 1).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&a, &sd.initial_latents(64, 128, 2).unwrap()) > 0.5);
    assert!(sd
        .initial_latents(60, 128, 1)
        .unwrap_err()
        .to_string()
        .contains("60"));
}

fn final_latents(sd: &StableDiffusion, prompt: &str) -> Tensor {
    let mut req = request();
    req.prompt = prompt.into();
    req.steps = 4;
    sd.sample(&req, &mut |_, _| {}).unwrap()
}

#[test]
fn textual_inversion_adds_the_files_vector_and_changes_the_output() {
    let f = facts();
    let token = f["ti_token"].as_str().unwrap();
    let prompt = f["ti_prompt"].as_str().unwrap();
    let base = load(&model_dir(), &LoadOptions::default());
    for file in ["learned_embeds.safetensors", "learned_embeds.bin"] {
        let opts = LoadOptions {
            embeddings: Some(fixtures().join(file)),
            ..Default::default()
        };
        let ti = load(&model_dir(), &opts);
        let learned = ti.provenance.learned_token.clone().unwrap();
        let (tok, id) = (learned.token, learned.id);
        assert_eq!(tok, token);
        assert_eq!(id as u64, f["ti_token_id"].as_u64().unwrap());
        let file_vec = candle_core::safetensors::load(
            fixtures().join("learned_embeds.safetensors"),
            &Device::Cpu,
        )
        .unwrap()[token]
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let row = ti.text_encoder.token_embedding().get(id as usize).unwrap();
        assert_eq!(max_abs_diff(&row, &file_vec), 0.0, "{file}");
        let emb = ti.encode_prompt(prompt).unwrap();
        let err = max_abs_diff(&emb, &expected()["ti_text_embeddings"]);
        eprintln!("{file}: TI text embeddings max abs diff {err:e}");
        assert!(err <= 1e-4, "{err}");
        let changed = max_abs_diff(&final_latents(&ti, prompt), &final_latents(&base, prompt));
        assert!(changed > 1e-3, "TI did not change the output ({changed})");
    }
}

#[test]
fn dreambooth_folder_loads_with_base_components_and_changes_the_output() {
    let db_dir = fixtures().join("dreambooth");
    let err = load_error(&db_dir, &LoadOptions::default());
    assert!(
        err.contains("vae/config.json") && err.contains("dreambooth"),
        "{err}"
    );
    let opts = LoadOptions {
        base: Some(model_dir().to_str().unwrap().into()),
        ..Default::default()
    };
    let db = load(&db_dir, &opts);
    assert!(db.provenance.unet.ends_with("dreambooth"));
    assert!(db.provenance.text_encoder.ends_with("model"));
    let base = load(&model_dir(), &LoadOptions::default());
    let p = "a photo of a sks dog";
    let changed = max_abs_diff(&final_latents(&db, p), &final_latents(&base, p));
    assert!(
        changed > 1e-3,
        "DreamBooth UNet did not change the output ({changed})"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

#[test]
fn missing_weights_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_dir(&model_dir(), &m);
    std::fs::remove_file(m.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let err = load_error(&m, &LoadOptions::default());
    assert!(
        err.contains("vae/diffusion_pytorch_model.safetensors")
            && err.contains(m.to_str().unwrap()),
        "{err}"
    );
}

/// The load error of a copy of the fixture model whose `config` has `from` replaced by `to`.
fn load_error_with_edited_config(config: &str, from: &str, to: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_dir(&model_dir(), &m);
    let cfg_path = m.join(config);
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(text.contains(from), "{config} lacks {from}");
    std::fs::write(&cfg_path, text.replace(from, to)).unwrap();
    load_error(&m, &LoadOptions::default())
}

#[test]
fn config_not_matching_weights_is_one_clear_error() {
    let err = load_error_with_edited_config(
        "text_encoder/config.json",
        "\"intermediate_size\": 32",
        "\"intermediate_size\": 48",
    );
    assert!(
        err.contains("text encoder weights") && err.contains("config.json") && err.contains("48"),
        "{err}"
    );

    // The VAE too.
    let err = load_error_with_edited_config(
        "vae/config.json",
        "\"latent_channels\": 4",
        "\"latent_channels\": 8",
    );
    assert!(
        err.contains("VAE weights") && err.contains("vae/config.json"),
        "{err}"
    );
}

#[test]
fn wrong_shape_init_latents_is_one_clear_error() {
    let sd = load(&model_dir(), &LoadOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.safetensors");
    let t = Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    save_one(&path, "latents", t);
    let err = sd
        .read_init_latents(&path, 64, 128, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors")
            && err.contains("[1, 4, 8, 16]")
            && err.contains("[1, 4, 8, 8]"),
        "{err}"
    );
    let ok = sd.read_init_latents(&path, 64, 64, 1).unwrap();
    assert_eq!(ok.dims(), &[1, 4, 8, 8]);
}

/// The load error of the fixture model with the Textual Inversion file `{token: vector}` at `file`.
fn textual_inversion_error(file: PathBuf, token: &str, vector: Tensor) -> String {
    save_one(&file, token, vector);
    let opts = LoadOptions {
        embeddings: Some(file),
        ..Default::default()
    };
    load_error(&model_dir(), &opts)
}

#[test]
fn bad_textual_inversion_files_are_one_clear_error_each() {
    let tmp = tempfile::tempdir().unwrap();
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let wrong_dim = tmp.path().join("wrong_dim.safetensors");
    let err = textual_inversion_error(wrong_dim, "<x>", zeros(7));
    assert!(
        err.contains("wrong_dim.safetensors") && err.contains("[7]") && err.contains("[16]"),
        "{err}"
    );
    // A token the vocabulary already has.
    let clash = tmp.path().join("clash.safetensors");
    let err = textual_inversion_error(clash, "dog</w>", zeros(16));
    assert!(err.contains("dog</w>") && err.contains("already"), "{err}");
}
