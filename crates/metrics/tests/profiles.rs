//! Every protocol profile of `configs/protocol/` against its source's computation, written out in
//! numpy/transformers by `tools/fixtures/metric_profiles.py` (part 2) on tiny models and synthetic
//! images whose crop margins make torchvision's and transformers' crop offsets differ.

mod common;

use common::*;
use metrics::preprocess::load_rgb;
use metrics::protocol::{Clamp, Pairing, Rescale, Truncation};
use metrics::{Scorer, ScorerOptions, Scoring};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn profile_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs/protocol")
        .join(format!("{name}.toml"))
}

/// The `[metrics.scoring]` table of a profile, and its `[metrics]` model ids.
fn profile(name: &str) -> (Scoring, String, String) {
    let text = std::fs::read_to_string(profile_file(name)).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let m = table["metrics"].as_table().unwrap();
    let scoring: Scoring = m["scoring"].clone().try_into().unwrap();
    scoring.validate().unwrap();
    assert_eq!(scoring.profile, name);
    (
        scoring,
        m["dino"].as_str().unwrap().to_string(),
        m["clip"].as_str().unwrap().to_string(),
    )
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("profiles.json")).unwrap())
        .unwrap()
}

fn images(list: &Value) -> Vec<PathBuf> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| fixtures().join("profile_images").join(p.as_str().unwrap()))
        .collect()
}

fn scorer(scoring: Scoring, dino: &str) -> Scorer {
    let options = ScorerOptions {
        cache: None,
        ..Default::default()
    };
    Scorer::load_scoring(&fixture(dino), &fixture("clip_tiny"), scoring, options).unwrap()
}

/// Compares means and per-image values; returns the largest difference.
fn compare(what: &str, ours: &metrics::ScoreReport, want: &Value, tol: f64) -> f64 {
    let mut worst = 0f64;
    let mut check = |name: String, a: f64, b: f64| {
        let d = (a - b).abs();
        assert!(
            d <= tol,
            "{what} {name}: ours {a}, source {b} (|Δ| {d:.2e})"
        );
        worst = worst.max(d);
    };
    for (k, v) in [
        ("dino", ours.dino),
        ("clip_i", ours.clip_i),
        ("clip_t", ours.clip_t),
    ] {
        check(k.into(), v, want[k].as_f64().unwrap());
    }
    for (i, (o, w)) in ours
        .per_image
        .iter()
        .zip(want["per_image"].as_array().unwrap())
        .enumerate()
    {
        for (k, v) in [("dino", o.dino), ("clip_i", o.clip_i), ("clip_t", o.clip_t)] {
            check(format!("{k}[{i}]"), v, w[k].as_f64().unwrap());
        }
    }
    assert_eq!(ours.per_image.len(), 2);
    eprintln!("{what}: max |Δ| = {worst:.2e}");
    worst
}

#[test]
fn the_dreambooth_file_is_the_default_scoring() {
    let (s, dino, clip) = profile("dreambooth");
    assert_eq!(s, Scoring::dreambooth());
    assert_eq!(
        (dino.as_str(), clip.as_str()),
        (metrics::DEFAULT_DINO, metrics::DEFAULT_CLIP)
    );
}

#[test]
fn every_profile_parses_completely_and_unknown_keys_are_errors() {
    for name in [
        "dreambooth",
        "custom-diffusion",
        "dreambench-plus",
        "torchmetrics",
    ] {
        let (s, _, _) = profile(name);
        assert!(s.source.len() > 20, "{name}: cite the source");
        let text = std::fs::read_to_string(profile_file(name)).unwrap();
        let bad = text.replacen("clamp = ", "clip = 1\nclamp = ", 1);
        let table: toml::Table = toml::from_str(&bad).unwrap();
        let err = table["metrics"]["scoring"]
            .clone()
            .try_into::<Scoring>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `clip`"), "{name}: {err}");
    }
}

#[test]
fn dreambooth_profile_matches_its_computation() {
    let want = expected();
    let (s, _, _) = profile("dreambooth");
    let sc = scorer(s, "dino_tiny");
    let prompt = want["prompts"]["short"].as_str().unwrap();
    let r = sc
        .score(&images(&want["generated"]), &images(&want["real"]), prompt)
        .unwrap();
    compare("dreambooth", &r, &want["dreambooth"], 1e-5);
}

#[test]
fn custom_diffusion_profile_matches_evaluate_py() {
    let want = expected();
    let (s, dino, clip) = profile("custom-diffusion");
    assert_eq!(
        (dino.as_str(), clip.as_str()),
        ("facebook/dino-vits16", "openai/clip-vit-base-patch32")
    );
    assert_eq!((s.clip_t.scale, s.clip_t.clamp), (2.5, Clamp::PerPair));
    let sc = scorer(s, "dino_tiny");
    let (gen, real) = (images(&want["generated"]), images(&want["real"]));
    for case in ["short", "mixed", "long"] {
        let prompt = want["prompts"][case].as_str().unwrap();
        let r = sc.score(&gen, &real, prompt).unwrap();
        let w = &want["custom-diffusion"][case];
        compare(&format!("custom-diffusion ({case} prompt)"), &r, w, 1e-5);
        // With equal numbers of real images per generated image, the mean of per-image means is
        // evaluate.py's mean of the whole `feats @ ref.T` matrix.
        assert!((r.dino - w["matrix_mean"]["dino"].as_f64().unwrap()).abs() < 1e-5);
        assert!((r.clip_i - w["matrix_mean"]["clip_i"].as_f64().unwrap()).abs() < 1e-5);
    }
    // The per-pair clip is active: one image's cosine is negative and scores 0.
    let r = sc
        .score(&gen, &real, want["prompts"]["short"].as_str().unwrap())
        .unwrap();
    assert_eq!(r.per_image[1].clip_t, 0.0);
}

#[test]
fn dreambench_plus_profile_matches_its_dino_and_clip_scores() {
    let want = expected();
    let (mut s, dino, clip) = profile("dreambench-plus");
    assert_eq!(
        (dino.as_str(), clip.as_str()),
        ("facebook/dino-vits8", "openai/clip-vit-base-patch32")
    );
    assert_eq!(s.extra["dinov2"].model, "facebook/dinov2-small");
    assert_eq!(s.dino.pairing, Pairing::OneToOne);
    assert_eq!(s.clip_t.truncation, Truncation::Error);
    s.extra.get_mut("dinov2").unwrap().model = fixture("dinov2_tiny");
    let pre = s.extra["dinov2"].preprocess.recipe();
    let clip_pre = s.clip_i.preprocess.recipe();
    let sc = scorer(s, "dino_s8_tiny");
    let (gen, real) = (images(&want["generated"]), images(&want["real"]));
    let reference = vec![fixtures().join("profile_images/real/0.png")];
    let prompt = want["prompts"]["mixed"].as_str().unwrap();
    let r = sc
        .score_with_reference(&gen, &real, &reference, prompt)
        .unwrap();
    let w = &want["dreambench-plus"];
    let worst = compare("dreambench-plus", &r, w, 1e-3);
    let d2 = (r.extra["dinov2"] - w["extra"]["dinov2"].as_f64().unwrap()).abs();
    for (i, v) in w["per_image_extra"]["dinov2"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let d = (r.per_image[i].extra["dinov2"] - v.as_f64().unwrap()).abs();
        assert!(d < 1e-3, "dinov2[{i}]: {d}");
    }
    eprintln!("dreambench-plus DINOv2: |Δ| = {d2:.2e} (scores ×100; others {worst:.2e})");
    assert!(d2 < 1e-3);
    // One reference image, or one per generated image; anything else is one clear error.
    let err = sc
        .score_with_reference(&gen, &real, &real, prompt)
        .unwrap_err()
        .to_string();
    assert!(err.contains("one-to-one"), "{err}");
    // A prompt over 77 tokens is refused, as DreamBench++'s untruncated tokenization fails.
    let long = want["prompts"]["long"].as_str().unwrap();
    let err = sc
        .score_with_reference(&gen, &real, &reference, long)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not truncate"), "{err}");

    // The processors' inputs themselves: BitImageProcessor / CLIPImageProcessor (floor crop offset,
    // float64 rescale), rows 96..112 of both generated images.
    let px = candle_core::safetensors::load(
        fixtures().join("profile_pixels.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (tag, p) in [("bit", pre), ("clip", clip_pre)] {
        assert_eq!(p.rescale, Rescale::MultiplyF64);
        for (i, g) in gen.iter().enumerate() {
            let ours = p.apply(&load_rgb(g).unwrap());
            let side = p.crop as usize;
            let rows: Vec<f32> = (0..3)
                .flat_map(|c| {
                    ours[c * side * side + 96 * side..c * side * side + 112 * side].to_vec()
                })
                .collect();
            let want = px[&format!("{tag}_{i}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d = max_abs_diff(&rows, &want);
            assert!(d == 0.0, "{tag}_{i}: pixel values differ by {d}");
        }
    }
}

#[test]
fn torchmetrics_profile_matches_clip_score() {
    let want = expected();
    let (s, _, clip) = profile("torchmetrics");
    assert_eq!(clip, "openai/clip-vit-large-patch14");
    assert_eq!((s.clip_t.scale, s.clip_t.clamp), (100.0, Clamp::Mean));
    // The tiny CLIP of the B/32 kind stands in for ViT-L/14 (whose architecture parity_models.rs
    // checks): this test is about the formula, the processor and the truncation.
    let sc = scorer(s, "dino_tiny");
    let (gen, real) = (images(&want["generated"]), images(&want["real"]));
    for case in ["short", "mixed", "long"] {
        let prompt = want["prompts"][case].as_str().unwrap();
        let r = sc.score(&gen, &real, prompt).unwrap();
        compare(
            &format!("torchmetrics ({case} prompt)"),
            &r,
            &want["torchmetrics"][case],
            1e-3,
        );
    }
    // The mean is clipped, not each image: "short" has a negative mean (→ 0) and a positive image.
    let r = sc
        .score(&gen, &real, want["prompts"]["short"].as_str().unwrap())
        .unwrap();
    assert_eq!(r.clip_t, 0.0);
    assert!(
        r.per_image.iter().any(|p| p.clip_t > 0.0) && r.per_image.iter().any(|p| p.clip_t < 0.0)
    );
}

#[test]
fn profiles_share_cached_embeddings_where_model_and_preprocessing_agree() {
    // `--protocol all` embeds each distinct (model, preprocessing) once: the cache key is exactly
    // that, so profiles that agree reuse each other's entries, and a cached run reproduces a fresh one.
    let want = expected();
    let cache = tempfile::tempdir().unwrap();
    let with_cache = |s: Scoring, dino: &str| {
        let options = ScorerOptions {
            cache: Some(metrics::EmbeddingCache::new(cache.path())),
            ..Default::default()
        };
        Scorer::load_scoring(&fixture(dino), &fixture("clip_tiny"), s, options).unwrap()
    };
    let folders = || std::fs::read_dir(cache.path()).unwrap().count();
    let (gen, real) = (images(&want["generated"]), images(&want["real"]));
    let prompt = want["prompts"]["mixed"].as_str().unwrap();

    let db = with_cache(profile("dreambooth").0, "dino_tiny");
    let a = db.score(&gen, &real, prompt).unwrap();
    assert_eq!(folders(), 2);
    let b = db.score(&gen, &real, prompt).unwrap();
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    // Custom Diffusion: same models, same preprocessing → no new entries.
    let cd = with_cache(profile("custom-diffusion").0, "dino_tiny");
    cd.score(&gen, &real, prompt).unwrap();
    assert_eq!(folders(), 2);
    // torchmetrics: CLIP preprocessed by CLIPImageProcessor (floor crop, f64 rescale) → one more.
    let tm = with_cache(profile("torchmetrics").0, "dino_tiny");
    tm.score(&gen, &real, prompt).unwrap();
    assert_eq!(folders(), 3);
    // DreamBench++: ViT-S/8 and DINOv2 are new; its CLIP entry is torchmetrics' (same model and
    // processor).
    let (mut s, _, _) = profile("dreambench-plus");
    s.extra.get_mut("dinov2").unwrap().model = fixture("dinov2_tiny");
    let dbp = with_cache(s, "dino_s8_tiny");
    let reference = vec![fixtures().join("profile_images/real/0.png")];
    let first = dbp
        .score_with_reference(&gen, &real, &reference, prompt)
        .unwrap();
    assert_eq!(folders(), 5);
    let again = dbp
        .score_with_reference(&gen, &real, &reference, prompt)
        .unwrap();
    assert_eq!(
        serde_json::to_string(&first).unwrap(),
        serde_json::to_string(&again).unwrap()
    );
    assert!(
        (first.extra["dinov2"] - want["dreambench-plus"]["extra"]["dinov2"].as_f64().unwrap())
            .abs()
            < 1e-3
    );
}

#[test]
fn an_inconsistent_scoring_is_one_clear_error() {
    let (mut s, _, _) = profile("dreambench-plus");
    s.extra.get_mut("dinov2").unwrap().preprocess.crop = 512;
    let options = ScorerOptions {
        cache: None,
        ..Default::default()
    };
    let err = Scorer::load_scoring(&fixture("dino_s8_tiny"), &fixture("clip_tiny"), s, options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("metric protocol") && err.contains("dinov2") && err.contains("512"),
        "{err}"
    );
}

/// The `torchmetrics` profile against torchmetrics' own `CLIPScore` and `_clip_score_update`
/// (tools/fixtures/torchmetrics_clip_score.py, torchmetrics 1.9 on transformers 4.51), prompts
/// short and over 77 tokens, under both of transformers' pooling rules: the tiny CLIP as it is
/// (`eos_token_id` 2, argmax pooling) and with `eos_token_id` 49407 (first end token; with the end
/// token cut off, position 0). The second made `pnd score` fail with "no end-of-text token".
#[test]
fn torchmetrics_profile_matches_torchmetrics_itself_on_long_prompts() {
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("torchmetrics_clip_score.json")).unwrap(),
    )
    .unwrap();
    let gen = images(&want["generated"]);
    let real = images(&serde_json::json!([
        "real/0.png",
        "real/1.png",
        "real/2.png"
    ]));
    let tmp = tempfile::tempdir().unwrap();
    for (name, eos) in [("legacy", None), ("eos", Some(49407))] {
        let clip = match eos {
            None => fixture("clip_tiny"),
            Some(eos) => {
                let d = tmp.path().join("clip_eos");
                std::fs::create_dir_all(&d).unwrap();
                for f in std::fs::read_dir(fixtures().join("clip_tiny")).unwrap() {
                    let f = f.unwrap().path();
                    std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
                }
                let mut cfg: Value =
                    serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                        .unwrap();
                cfg["text_config"]["eos_token_id"] = eos.into();
                std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
                d.display().to_string()
            }
        };
        let config = &want["configs"][name];
        assert_eq!(config["eos_token_id"], eos.unwrap_or(2));
        let (s, _, _) = profile("torchmetrics");
        let options = ScorerOptions {
            cache: None,
            ..Default::default()
        };
        let sc = Scorer::load_scoring(&fixture("dino_tiny"), &clip, s, options).unwrap();
        for case in ["short", "mixed", "long"] {
            let w = &config["cases"][case];
            let prompt = want["prompts"][case].as_str().unwrap();
            let r = sc
                .score(&gen, &real, prompt)
                .unwrap_or_else(|e| panic!("{name} {case}: {e}"));
            let per: Vec<f64> = w["per_image"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (ours, theirs) in r.per_image.iter().zip(&per) {
                let d = (ours.clip_t - theirs).abs();
                assert!(
                    d < 1e-3,
                    "{name} {case}: per-image {} vs {theirs}",
                    ours.clip_t
                );
            }
            let d = (r.clip_t - w["clip_score"].as_f64().unwrap()).abs();
            assert!(
                d < 1e-3,
                "{name} {case}: CLIPScore {} vs {}",
                r.clip_t,
                w["clip_score"]
            );
        }
        assert!(config["cases"]["long"]["tokens"].as_u64().unwrap() > 77);
    }
    // DreamBench++'s source refuses the untruncated long prompt too (the dreambench-plus test
    // checks ours): transformers' CLIP text model raises on 86 positions.
    let refused = want["untruncated_long_prompt"].as_str().unwrap();
    assert!(refused.contains("max_position_embeddings"), "{refused}");
}

/// A profile's extra score whose model cannot be loaded: the error names the extra and its
/// model, not the DINO or CLIP model.
#[test]
fn an_extra_scores_model_that_fails_to_load_is_named() {
    let (mut s, _, _) = profile("dreambench-plus");
    let missing = fixtures().join("no-such-dinov2");
    s.extra.get_mut("dinov2").unwrap().model = missing.display().to_string();
    let options = ScorerOptions {
        cache: None,
        ..Default::default()
    };
    let e = match Scorer::load_scoring(&fixture("dino_s8_tiny"), &fixture("clip_tiny"), s, options)
    {
        Ok(_) => panic!("a missing extra model loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.starts_with("the protocol's extra score 'dinov2' (model '")
            && e.contains("no-such-dinov2"),
        "{e}"
    );
}
