//! Files the tiny writers and the metrics' embedding cache leave (issue 25): every one with the
//! permissions the umask gives a new file, and every damaged embedding cache entry detected,
//! recomputed and replaced, with the scores of a clean run.

use metrics::cache::{EmbeddingCache, Lookup};
use metrics::{Scorer, ScorerOptions};
use std::path::{Path, PathBuf};
use tiny::blip::{write_tiny_blip_model, TinyBlipSpec};
use tiny::{write_tiny_embedding, write_tiny_metric_models, write_tiny_model, TinySpec};

fn tokenizer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion/tests/fixtures/pipeline/model/tokenizer")
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn new_file_mode(dir: &Path) -> std::fs::Permissions {
    let probe = dir.join("probe");
    let mode = std::fs::File::create(&probe)
        .unwrap()
        .metadata()
        .unwrap()
        .permissions();
    std::fs::remove_file(probe).unwrap();
    mode
}

/// Every file of the tiny SD, BLIP-Diffusion, metric models and a Textual Inversion embedding
/// (weights, configs, tokenizer copies) has a new file's mode (it was 0600 for the weights, and
/// the tokenizer copies were made world-writable).
#[test]
fn every_tiny_file_gets_a_new_files_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("out");
    let spec = TinySpec::default();
    write_tiny_model(&root.join("sd"), 1, &tokenizer(), &spec).unwrap();
    write_tiny_blip_model(
        &root.join("blip"),
        2,
        &tokenizer(),
        &TinyBlipSpec::default(),
    )
    .unwrap();
    write_tiny_metric_models(&root.join("metrics"), &tokenizer(), 3).unwrap();
    write_tiny_embedding(&root.join("ti.safetensors"), "<t>", 4, &spec).unwrap();
    let want = new_file_mode(tmp.path());
    let all = files(&root);
    assert!(all.len() > 20, "{all:?}");
    assert!(all
        .iter()
        .any(|p| p.ends_with("unet/diffusion_pytorch_model.safetensors")));
    for f in &all {
        let got = std::fs::metadata(f).unwrap().permissions();
        assert_eq!(got, want, "{}", f.display());
    }
}

/// A small deterministic RGB image.
fn image(path: &Path, seed: u32) {
    let img = image::RgbImage::from_fn(48, 40, |x, y| {
        let v = |k: u32| ((x * (3 + k) + y * (5 + seed) + k * 70 + seed * 31) % 256) as u8;
        image::Rgb([v(0), v(1), v(2)])
    });
    img.save(path).unwrap();
}

/// One damage to an embedding cache entry's bytes, and what its warning says.
fn damaged(good: &[u8], damage: &str) -> (Vec<u8>, &'static str) {
    let n = good.len();
    // Layout: 8 bytes of magic, 32 of SHA-256, then the values.
    let body = &good[40..];
    match damage {
        "truncated" => (good[..n - 7].to_vec(), "bytes, not the"),
        "garbage" => (
            b"\x00garbage, not an embedding".to_vec(),
            "not an embedding",
        ),
        "zeroed" => {
            let mut b = good.to_vec();
            b[40..].iter_mut().for_each(|x| *x = 0);
            (b, "checksum mismatch")
        }
        "flipped byte" => {
            let mut b = good.to_vec();
            b[n / 2 + 20] ^= 0x04;
            (b, "checksum mismatch")
        }
        "NaN" => {
            // A correct checksum over a NaN: only the finiteness check refuses it.
            let mut v = body.to_vec();
            v[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            let sum = <sha2::Sha256 as sha2::Digest>::digest(&v);
            ([&good[..8], sum.as_slice(), &v].concat(), "value 0 is NaN")
        }
        "older format" => ([b"PNDEMB1\0".as_slice(), body].concat(), "no checksum"),
        _ => unreachable!(),
    }
}

/// Each damage to an embedding cache entry (of both models, for one real image) is unusable
/// with its path; the next scoring recomputes and replaces it, with exactly the clean run's scores
/// and the clean entry's bytes.
#[test]
fn a_damaged_embedding_cache_entry_is_recomputed_with_identical_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let (dino, clip) = write_tiny_metric_models(&tmp.path().join("m"), &tokenizer(), 9).unwrap();
    let real: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = tmp.path().join(format!("real{i}.png"));
            image(&p, i);
            p
        })
        .collect();
    let generated = vec![tmp.path().join("gen.png")];
    image(&generated[0], 7);
    let cache_dir = tmp.path().join("cache");
    let scorer = Scorer::load(
        dino.to_str().unwrap(),
        clip.to_str().unwrap(),
        ScorerOptions {
            cache: Some(EmbeddingCache::new(&cache_dir)),
            ..Default::default()
        },
    )
    .unwrap();
    let prompt = "a photo of a dog";
    let clean = scorer.score(&generated, &real, prompt).unwrap();
    let json = |r: &metrics::ScoreReport| serde_json::to_string(r).unwrap();
    let entries = files(&cache_dir);
    assert_eq!(entries.len(), 2 * 4, "{entries:?}");
    let mode = new_file_mode(tmp.path());
    for e in &entries {
        assert_eq!(std::fs::metadata(e).unwrap().permissions(), mode);
    }
    let pristine: Vec<(PathBuf, Vec<u8>)> = entries
        .iter()
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect();
    // The entries of the first real image, one per model.
    let hash = metrics::cache::sha256_hex(&std::fs::read(&real[0]).unwrap());
    let targets: Vec<&(PathBuf, Vec<u8>)> = pristine
        .iter()
        .filter(|(p, _)| p.file_stem().unwrap().to_str() == Some(hash.as_str()))
        .collect();
    assert_eq!(targets.len(), 2);
    // A damaged entry is recomputed alone (a batch of one image), and on some CPUs a batch of one
    // rounds differently from the clean run's batch of four (CLIP-I moved by 1.2e-9 on one
    // machine). So the reference for every damage is the same recomputation from an absent
    // entry, which must agree with the clean run to float noise.
    for (path, _) in &targets {
        std::fs::remove_file(path).unwrap();
    }
    let expected = scorer.score(&generated, &real, prompt).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6;
    assert!(
        close(expected.dino, clean.dino),
        "{} vs {}",
        expected.dino,
        clean.dino
    );
    assert!(
        close(expected.clip_i, clean.clip_i),
        "{} vs {}",
        expected.clip_i,
        clean.clip_i
    );
    assert!(
        close(expected.clip_t, clean.clip_t),
        "{} vs {}",
        expected.clip_t,
        clean.clip_t
    );
    let recomputed: Vec<Vec<u8>> = targets
        .iter()
        .map(|(path, _)| std::fs::read(path).unwrap())
        .collect();
    let cache = EmbeddingCache::new(&cache_dir);
    for damage in [
        "truncated",
        "garbage",
        "zeroed",
        "flipped byte",
        "NaN",
        "older format",
    ] {
        for (p, b) in &pristine {
            std::fs::write(p, b).unwrap();
        }
        for (path, good) in &targets {
            let (bytes, says) = damaged(good, damage);
            std::fs::write(path, bytes).unwrap();
            let model = path.parent().unwrap().strip_prefix(&cache_dir).unwrap();
            let model = model.to_str().unwrap();
            let dim = (good.len() - 40) / 4;
            match cache.lookup(model, &hash, dim) {
                Lookup::Unusable { path: p, reason } => {
                    assert_eq!(&p, path, "{damage}");
                    assert!(reason.contains(says), "{damage}: {reason}");
                }
                other => panic!("{damage}: {other:?}"),
            }
        }
        let again = scorer.score(&generated, &real, prompt).unwrap();
        assert_eq!(json(&again), json(&expected), "{damage}: scores moved");
        for ((path, _), good) in targets.iter().zip(&recomputed) {
            assert_eq!(
                &std::fs::read(path).unwrap(),
                good,
                "{damage}: not replaced"
            );
        }
    }
}
