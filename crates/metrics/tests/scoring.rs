//! Whole pipeline (JPEG decode, resize, crop, embed, score) against transformers + PIL on the tiny
//! fixture models over all 158 DreamBench images, the embedding cache, and the error paths.

mod common;

use candle_core::Device;
use common::*;
use dreambench::Dataset;
use metrics::{EmbeddingCache, Scorer, ScorerOptions};
use std::path::PathBuf;

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("oracle.json")).unwrap()).unwrap()
}

fn scorer(cache: Option<EmbeddingCache>) -> Scorer {
    Scorer::load(
        &fixture("dino_tiny"),
        &fixture("clip_tiny"),
        ScorerOptions {
            cache,
            ..Default::default()
        },
    )
    .unwrap()
}

fn subjects() -> Vec<(String, Vec<PathBuf>)> {
    let data = Dataset::open(testdata::dreambench()).unwrap();
    dreambench::SUBJECTS
        .iter()
        .map(|s| (s.name.to_string(), data.images(s.name).unwrap().to_vec()))
        .collect()
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn oracle_over_all_158_images_matches_the_reference() {
    let want = reference();
    let subjects = subjects();
    let cache = tempfile::tempdir().unwrap();
    let s = scorer(Some(EmbeddingCache::new(cache.path())));
    let paths: Vec<PathBuf> = subjects.iter().flat_map(|(_, p)| p.clone()).collect();
    assert_eq!(paths.len(), 158);

    // Per-image embeddings through the whole pipeline against PIL + transformers.
    let names: Vec<String> = serde_json::from_value(want["images"].clone()).unwrap();
    let rel: Vec<String> = paths
        .iter()
        .map(|p| {
            let n = p.components().rev().take(2).collect::<Vec<_>>();
            format!(
                "{}/{}",
                n[1].as_os_str().to_string_lossy(),
                n[0].as_os_str().to_string_lossy()
            )
        })
        .collect();
    assert_eq!(rel, names);
    let e = s.embed_images(&paths).unwrap();
    let r = candle_core::safetensors::load(
        fixtures().join("dreambench_embeddings.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let rd = r["dino"].to_vec2::<f32>().unwrap();
    let rc = r["clip_image"].to_vec2::<f32>().unwrap();
    let (mut wd, mut wc, mut cd, mut cc) = (0f32, 0f32, 1f64, 1f64);
    for i in 0..158 {
        wd = wd.max(max_abs_diff(&e.dino[i], &rd[i]));
        wc = wc.max(max_abs_diff(&e.clip[i], &rc[i]));
        cd = cd.min(metrics::scores::cosine(&e.dino[i], &rd[i]));
        cc = cc.min(metrics::scores::cosine(&e.clip[i], &rc[i]));
    }
    eprintln!(
        "whole-pipeline embeddings: DINO max |Δ| {wd:.3e} (min cosine to reference {cd:.6}), \
         CLIP max |Δ| {wc:.3e} (min cosine {cc:.6})"
    );

    let groups: Vec<(&str, std::ops::Range<usize>)> = {
        let mut start = 0;
        subjects
            .iter()
            .map(|(n, p)| {
                start += p.len();
                (n.as_str(), start - p.len()..start)
            })
            .collect()
    };
    let o = metrics::scorer::oracle_embeddings(&groups, &e);
    let wo = &want["oracle"];
    let mut worst = (o.dino - wo["dino"].as_f64().unwrap())
        .abs()
        .max((o.clip_i - wo["clip_i"].as_f64().unwrap()).abs());
    for (name, so) in &o.per_subject {
        let w = &wo["per_subject"][name];
        worst = worst
            .max((so.dino - w["dino"].as_f64().unwrap()).abs())
            .max((so.clip_i - w["clip_i"].as_f64().unwrap()).abs());
    }
    eprintln!(
        "oracle: DINO {:.6} (reference {:.6}), CLIP-I {:.6} (reference {:.6}); max |Δ| over \
         overall and 30 subjects {worst:.3e}",
        o.dino, wo["dino"], o.clip_i, wo["clip_i"]
    );
    assert_eq!(o.n_images, 158);
    assert_eq!(o.per_subject.len(), 30);
    assert!(
        worst <= 1e-3,
        "oracle differs from the reference by {worst}"
    );

    // Scorer::oracle (the path `pnd oracle` takes, here from the cache) gives the same numbers.
    let direct = s.oracle(&subjects).unwrap();
    assert_eq!(direct.dino, o.dino);
    assert_eq!(direct.clip_i, o.clip_i);
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn score_matches_the_reference_and_the_cache_reproduces_it() {
    let want = &reference()["score"];
    let cache_dir = tempfile::tempdir().unwrap();
    let s = scorer(Some(EmbeddingCache::new(cache_dir.path())));
    let generated = metrics::list_images(&testdata::dreambench().join("cat/00.jpg")).unwrap();
    let real = metrics::list_images(&testdata::dreambench().join("dog")).unwrap();
    let prompt = want["prompt"].as_str().unwrap();
    let first = s.score(&generated, &real, prompt).unwrap();
    let mut worst = 0f64;
    for k in ["dino", "clip_i", "clip_t"] {
        let ours = match k {
            "dino" => first.dino,
            "clip_i" => first.clip_i,
            _ => first.clip_t,
        };
        worst = worst.max((ours - want[k].as_f64().unwrap()).abs());
    }
    eprintln!(
        "score: DINO {:.6} CLIP-I {:.6} CLIP-T {:.6}; max |Δ| to the reference {worst:.3e}",
        first.dino, first.clip_i, first.clip_t
    );
    assert!(worst <= 1e-3, "{worst}");
    assert_eq!(first.n_generated, 1);
    assert_eq!(first.n_real, 5);

    // Second run: all 6 images come from the cache (2 models → 12 entries) and scores are identical.
    let entries: usize = std::fs::read_dir(cache_dir.path())
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(entries, 12);
    let again = s.score(&generated, &real, prompt).unwrap();
    assert_eq!(again.dino, first.dino);
    assert_eq!(again.clip_i, first.clip_i);
    assert_eq!(again.clip_t, first.clip_t);
}

#[test]
fn missing_model_folder_is_one_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let err = metrics::DinoModel::load(missing.to_str().unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no-such-model"), "{err}");

    // A folder without weights names what was looked for.
    std::fs::copy(
        fixtures().join("dino_tiny/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = metrics::DinoModel::load(dir.path().to_str().unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("pytorch_model.bin"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shapes_are_one_error_naming_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("dino_tiny/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("dino_tiny/config.json")).unwrap(),
    )
    .unwrap();
    cfg["intermediate_size"] = 48.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = metrics::DinoModel::load(dir.path().to_str().unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("intermediate.dense.weight"), "{err}");
    assert!(err.contains("shape mismatch"), "{err}");

    // CLIP: a ViT checkpoint is not a CLIP checkpoint.
    std::fs::copy(
        fixtures().join("clip_tiny/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = metrics::ClipModel::load(dir.path().to_str().unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("vision_model"),
        "{err}"
    );
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn unreadable_or_truncated_images_are_one_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = scorer(None);
    let bytes = std::fs::read(testdata::dreambench().join("dog/00.jpg")).unwrap();
    let truncated = dir.path().join("truncated.jpg");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"this is not an image").unwrap();
    let missing = dir.path().join("missing.jpg");
    for p in [&truncated, &garbage, &missing] {
        let err = s
            .embed_images(std::slice::from_ref(p))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&p.display().to_string()), "{err}");
        eprintln!("{err}");
    }
    let empty = tempfile::tempdir().unwrap();
    let err = metrics::list_images(empty.path()).unwrap_err().to_string();
    assert!(err.contains("no images"), "{err}");
}

/// The real-weight check (downloads ~700 MB once into the Hugging Face cache):
/// `cargo test --release -p metrics --test scoring -- --ignored real_weight_oracle --nocapture`.
/// The paper's Table 1 "Real Images" row: DINO 0.774, CLIP-I 0.885.
#[test]
#[ignore = "needs the real DINO and CLIP weights (~700 MB from the Hugging Face hub) and DreamBench"]
fn real_weight_oracle_matches_the_paper() {
    let s = Scorer::load(
        metrics::DEFAULT_DINO,
        metrics::DEFAULT_CLIP,
        ScorerOptions::default(),
    )
    .unwrap();
    let o = s.oracle(&subjects()).unwrap();
    eprintln!(
        "real-weight oracle: DINO {:.4}, CLIP-I {:.4}",
        o.dino, o.clip_i
    );
    assert!((o.dino - 0.774).abs() <= 0.01, "DINO {}", o.dino);
    assert!((o.clip_i - 0.885).abs() <= 0.01, "CLIP-I {}", o.clip_i);
}
