//! `pnd maps` on the tiny model (issue 27 item 2, the paper's Fig. 3): the files are written; the
//! sheet's pixels are the captured tensors drawn by the documented rule (nearest upscaling,
//! gray level round(255 · v)); the tensors are what the guidance reads (the layout template's
//! capture, the palette's masks) and what its functions compute from them; bad input is one
//! clear error.

mod common;

use candle_core::{DType, Device, Tensor};
use common::pnd;
use diffusion::pipeline::{LoadOptions, SampleRequest, StableDiffusion};
use guidance::capture::attn2_site;
use guidance::config::{GuidanceConfig, Kernel};
use guidance::layout::layout_maps;
use guidance::maps::{mask_indices, min_max_normalize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const PROMPT: &str = "a photo of a dog on the beach";

/// The built-in tiny model (seed 0) with the built-in CLIP vocabulary, under `dir`.
fn tiny_model(dir: &Path) -> PathBuf {
    let tok = dir.join("tokenizer");
    clip_tokenizer::write_builtin(&tok).unwrap();
    let model = dir.join("tiny");
    tiny::write_tiny_model(&model, 0, &tok, &Default::default()).unwrap();
    model
}

fn load(model: &Path) -> StableDiffusion {
    StableDiffusion::load(model.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

/// Runs `pnd maps ARGS`; panics with its output when it fails; returns stdout.
fn maps(args: &[&str]) -> String {
    let mut all = vec!["maps", "--device", "cpu"];
    all.extend_from_slice(args);
    let o = pnd(&all);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "pnd {all:?}:\n{out}\n{err}");
    out
}

/// What `pnd maps` wrote into `dir`: the index, the tensors and the sheet.
struct Written {
    index: serde_json::Value,
    tensors: HashMap<String, Tensor>,
    sheet: image::RgbImage,
}

fn read(dir: &Path) -> Written {
    for f in ["maps.png", "maps.safetensors", "maps.json", "image.png"] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    Written {
        index: serde_json::from_str(&std::fs::read_to_string(dir.join("maps.json")).unwrap())
            .unwrap(),
        tensors: candle_core::safetensors::load(dir.join("maps.safetensors"), &Device::Cpu)
            .unwrap(),
        sheet: image::open(dir.join("maps.png")).unwrap().to_rgb8(),
    }
}

fn grid(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(
        &a.to_dtype(DType::F32).unwrap(),
        &b.to_dtype(DType::F32).unwrap(),
    )
}

/// Every pixel of the tile at `at` (upscaled by `scale`) is `want(value)` in R, G and B.
fn check_tile(
    sheet: &image::RgbImage,
    at: &serde_json::Value,
    scale: u32,
    values: &[Vec<f32>],
    want: impl Fn(f32) -> u8,
    what: &str,
) {
    let (x0, y0) = (
        at[0].as_u64().unwrap() as u32,
        at[1].as_u64().unwrap() as u32,
    );
    // The tile ends where the map does: its gray frame lies just outside.
    let (w, h) = (values[0].len() as u32 * scale, values.len() as u32 * scale);
    for (x, y) in [
        (x0 - 1, y0),
        (x0 + w, y0 + h - 1),
        (x0, y0 - 1),
        (x0 + w - 1, y0 + h),
    ] {
        assert_eq!(
            sheet.get_pixel(x, y).0,
            [150; 3],
            "{what}: frame at ({x}, {y})"
        );
    }
    for (i, row) in values.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let level = want(v);
            for dy in 0..scale {
                for dx in 0..scale {
                    let (x, y) = (x0 + j as u32 * scale + dx, y0 + i as u32 * scale + dy);
                    assert_eq!(
                        sheet.get_pixel(x, y).0,
                        [level; 3],
                        "{what}: pixel ({x}, {y}) of map position [{i}][{j}] (value {v})"
                    );
                }
            }
        }
    }
}

/// The sheet shows the written tensors by the drawing rule, and the written tensors are the
/// guidance's functions of the captured map; returns the appearance layers' masks by `attn2` site.
fn check_sheet_and_tensors(w: &Written, tau: f64) -> HashMap<String, Vec<u32>> {
    let round = |v: f32| (255.0 * v).round().clamp(0.0, 255.0) as u8;
    let mut masks = HashMap::new();
    for layer in w.index["layers"].as_array().unwrap() {
        let n = layer["order"].as_u64().unwrap();
        let site = layer["site"].as_str().unwrap().to_string();
        let (h, wd) = (
            layer["height"].as_u64().unwrap() as usize,
            layer["width"].as_u64().unwrap() as usize,
        );
        let scale = layer["scale"].as_u64().unwrap() as u32;
        assert_eq!(scale, (128 / h.max(wd) as u32).max(1), "layer {n}");
        let t = |kind: &str| w.tensors[&format!("{kind}.{n:02}")].clone();
        let attention = t("attention");
        assert_eq!(attention.dims(), &[h, wd], "layer {n}");
        // Â = the guidance's min–max normalization of the captured map.
        let norm = min_max_normalize(&attention.reshape((1, h * wd)).unwrap())
            .unwrap()
            .reshape((h, wd))
            .unwrap();
        assert!(max_diff(&norm, &t("normalized")) < 1e-6, "layer {n}");
        // G(Â) = the layout loss's smoothing of it.
        let smoothed = layout_maps(&attention.unsqueeze(0).unwrap(), Kernel::Aa, 0.5)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert!(max_diff(&smoothed, &t("smoothed")) < 1e-6, "layer {n}");
        let tiles = &layer["tiles"];
        check_tile(
            &w.sheet,
            &tiles["attention"],
            scale,
            &grid(&t("normalized")),
            round,
            &format!("layer {n} attention"),
        );
        check_tile(
            &w.sheet,
            &tiles["smoothed"],
            scale,
            &grid(&t("smoothed")),
            round,
            &format!("layer {n} smoothed"),
        );
        if layer["appearance"].as_bool().unwrap() {
            let mask = t("mask");
            let flat: Vec<u8> = mask.flatten_all().unwrap().to_vec1().unwrap();
            let inside: Vec<u32> = (0..flat.len() as u32)
                .filter(|&i| flat[i as usize] == 1)
                .collect();
            // [Â ≥ τ] as the guidance thresholds it.
            let norm_flat = t("normalized").flatten_all().unwrap();
            assert_eq!(inside, mask_indices(&norm_flat, tau).unwrap(), "layer {n}");
            assert!(
                !inside.is_empty(),
                "layer {n}: an empty mask (the maximum is ≥ τ)"
            );
            assert!(flat.iter().all(|&v| v <= 1));
            check_tile(
                &w.sheet,
                &tiles["mask"],
                scale,
                &grid(&mask),
                |v| if v > 0.0 { 255 } else { 0 },
                &format!("layer {n} mask"),
            );
            masks.insert(site, inside);
        } else {
            assert!(tiles.get("mask").is_none(), "layer {n}");
            assert!(!w.tensors.contains_key(&format!("mask.{n:02}")));
        }
    }
    masks
}

/// A generation's maps at step 2 of 12: the captured tensors are the layout template's capture
/// of the same step (the hook the layout loss reads), the sheet draws them by the documented
/// rule, the masks sit at the appearance layers, and image.png is the generation's image.
#[test]
fn maps_of_a_generation_are_the_captured_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("maps");
    let started = std::time::Instant::now();
    let stdout = maps(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--class",
        "dog",
        "--seed",
        "3",
        "--steps",
        "12",
        "--step",
        "2",
        "--overlay",
        "--out",
        out.to_str().unwrap(),
    ]);
    eprintln!("pnd maps took {:.1?}:\n{stdout}", started.elapsed());
    let w = read(&out);

    let sd = load(&model);
    let sites = sd.unet.cross_attention_sites();
    let layers = w.index["layers"].as_array().unwrap();
    // Every cross-attention layer in inference order, numbered from 1.
    let listed: Vec<&str> = layers.iter().map(|l| l["site"].as_str().unwrap()).collect();
    assert_eq!(listed, sites);
    for (k, l) in layers.iter().enumerate() {
        assert_eq!(l["order"].as_u64().unwrap() as usize, k + 1);
    }
    assert!(stdout.contains(&format!("{} cross-attention layers at step 2", sites.len())));
    assert_eq!(
        w.index["rows"],
        serde_json::json!(["attention", "mask", "smoothed", "overlay"])
    );
    assert!(layers.iter().all(|l| l["tiles"].get("overlay").is_some()));

    // The capture the layout loss's template makes at step 2, for the subject token.
    let subject = *sd
        .tokenizer
        .word_positions(PROMPT, "dog")
        .unwrap()
        .last()
        .unwrap();
    assert_eq!(w.index["subject_token"].as_u64().unwrap() as usize, subject);
    assert_eq!(w.index["subject_word"], "dog");
    let (h, wd) = (128, 128);
    let init = sd.seeded_latents(h, wd, &[3]).unwrap();
    let emb = sd.encode_prompts(PROMPT, "").unwrap();
    let template =
        guidance::guide::template_maps(&sd, &emb, &init, 12, 7.5, &[subject], 2..3).unwrap();
    let captured = &template.steps[&2];
    assert_eq!(captured.len(), sites.len());
    for (k, (site, map)) in captured.iter().enumerate() {
        assert_eq!(site, &sites[k]);
        let ours = &w.tensors[&format!("attention.{:02}", k + 1)];
        let theirs = map.reshape(ours.dims()).unwrap();
        let d = max_diff(ours, &theirs);
        assert!(d <= 1e-7, "layer {} ({site}): {d}", k + 1);
    }

    let config = GuidanceConfig::default();
    let masks = check_sheet_and_tensors(&w, config.tau);
    let appearance: Vec<String> = guidance::pipeline::appearance_sites(&sd, &config)
        .unwrap()
        .iter()
        .map(|s| attn2_site(s))
        .collect();
    let mut masked: Vec<String> = masks.keys().cloned().collect();
    masked.sort();
    let mut want = appearance.clone();
    want.sort();
    assert_eq!(masked, want);

    // image.png is the image of this prompt and seed.
    let latents = sd
        .sample(
            &SampleRequest {
                prompt: PROMPT.into(),
                negative_prompt: String::new(),
                steps: 12,
                cfg_scale: 7.5,
                height: h,
                width: wd,
                seed: 3,
                init_latents: None,
            },
            &mut |_, _| {},
        )
        .unwrap();
    let want = sd.decode_images(&latents).unwrap().remove(0);
    let got = image::open(out.join("image.png")).unwrap().to_rgb8();
    let worst = common::max_pixel_diff(&got, &want);
    assert!(
        worst <= 1,
        "image.png differs from the generation by {worst}/255"
    );
}

/// The reference's maps: the replay of its null-text inversion (from the palette cache), whose
/// masks at the appearance step are the palette's masks, the ones the appearance loss uses.
#[test]
fn maps_of_the_reference_are_the_palettes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let reference = tmp.path().join("ref.png");
    let img = image::RgbImage::from_fn(96, 80, |x, y| {
        let blob = ((x as f32 - 40.0).powi(2) + (y as f32 - 36.0).powi(2)).sqrt() < 20.0;
        if blob {
            image::Rgb([200, 120, 40])
        } else {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, 90])
        }
    });
    img.save(&reference).unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("ref-maps");
    let stdout = maps(&[
        "--model",
        model.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--class",
        "dog",
        "--steps",
        "12",
        "--step",
        "10",
        "--palette-cache",
        cache.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    eprintln!("{stdout}");
    let w = read(&out);
    assert_eq!(w.index["prompt"], "a dog");
    assert_eq!(
        w.index["rows"],
        serde_json::json!(["attention", "mask", "smoothed"])
    );
    let config = GuidanceConfig::default();
    let masks = check_sheet_and_tensors(&w, config.tau);

    // The palette of the same reference, model, schedule and size (the inversion from the cache
    // `pnd maps` filled): its masks at step 10 are the drawn ones.
    let sd = load(&model);
    let req = guidance::pipeline::PickAndDrawRequest {
        prompt: "a dog".into(),
        negative_prompt: String::new(),
        steps: 12,
        cfg_scale: 7.5,
        height: 128,
        width: 128,
        init: Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap(),
        reference: reference.clone(),
        class: "dog".into(),
        identifier: None,
        template_prompt: None,
        model_key: model.to_str().unwrap().to_string(),
        cache_dir: cache.clone(),
        trace: vec![],
    };
    let inversions = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("inversion-") && n.ends_with(".safetensors"))
            .collect();
        v.sort();
        v
    };
    let before = inversions();
    assert_eq!(before.len(), 1, "{before:?}");
    let mut timings = guidance::pipeline::Timings::default();
    let palette = guidance::pipeline::reference_palette(&sd, &config, &req, &mut timings).unwrap();
    // One cache key: the guided generation's palette read the inversion pnd maps cached.
    assert_eq!(inversions(), before);
    let layers = &palette.steps[&10];
    assert_eq!(layers.len(), masks.len());
    for l in layers {
        assert_eq!(masks[&attn2_site(&l.site)], l.mask, "{}", l.site);
    }
}

#[test]
fn bad_step_unknown_model_and_absent_subject_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("never");
    let run = |model: &str, prompt: &str, step: &str| {
        let o = pnd(&[
            "maps",
            "--device",
            "cpu",
            "--model",
            model,
            "--prompt",
            prompt,
            "--class",
            "dog",
            "--steps",
            "12",
            "--step",
            step,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let m = model.to_str().unwrap();
    let err = run(m, PROMPT, "12");
    assert!(
        err.contains("step 12 is outside the 12-step schedule (steps 0 to 11)"),
        "{err}"
    );
    let missing = tmp.path().join("no-such-model");
    let err = run(missing.to_str().unwrap(), PROMPT, "2");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    let err = run(m, "a photo of a cat", "2");
    assert!(
        err.contains("'dog'") && err.contains("a photo of a cat"),
        "{err}"
    );
    assert!(!out.exists(), "an error left '{}' behind", out.display());
    // --prompt and --reference exclude each other; one of them is needed.
    let o = pnd(&["maps", "--model", m, "--class", "dog", "--out", "x"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--prompt"));
}
