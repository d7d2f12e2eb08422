//! `pnd generate` end to end on the tiny diffusers fixture pipeline of the diffusion crate
//! (tools/fixtures/sd_pipeline.py): same final latents and PNG as diffusers.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../diffusion/tests/fixtures/pipeline")
}

fn facts() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn pnd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pnd"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_with_init_latents_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.png");
    let saved = tmp.path().join("final.safetensors");
    let f = facts();
    let model = fixtures().join("model");
    let init = fixtures().join("init_latents.safetensors");
    let o = pnd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        f["prompt"].as_str().unwrap(),
        "--steps",
        "10",
        "--cfg-scale",
        "7.5",
        "--height",
        "64",
        "--width",
        "128",
        "--init-latents",
        init.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let ours: Vec<f32> = diffusion::pipeline::read_latents(&saved)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> =
        diffusion::pipeline::read_latents(&fixtures().join("final_latents.safetensors"))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    assert_eq!(ours.len(), want.len());
    let err = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("pnd generate: final latents max abs diff {err:e}");
    assert!(err <= 1e-3, "{err}");

    let img = image::open(&out).unwrap().to_rgb8();
    let want = image::open(fixtures().join("expected.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (128, 64));
    let worst = img
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    eprintln!("pnd generate: PNG max abs diff {worst}/255");
    assert!(worst <= 2, "{worst}");
}

#[test]
fn generate_with_wrong_shape_init_latents_fails_with_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let init = fixtures().join("init_latents.safetensors");
    let model = fixtures().join("model");
    let o = pnd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a dog",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--init-latents",
        init.to_str().unwrap(),
        "--out",
        tmp.path().join("x.png").to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("init_latents.safetensors")
            && err.contains("[1, 4, 8, 8]")
            && err.contains("[1, 4, 8, 16]"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
    assert!(!tmp.path().join("x.png").exists());
}

#[test]
fn generate_with_missing_model_weights_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let o = pnd(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "a dog",
        "--out",
        tmp.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unet/config.json") && err.contains(tmp.path().to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn tiny_model_command_then_generate_with_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("tiny");
    let tok = fixtures().join("model/tokenizer");
    let o = pnd(&[
        "tiny-model",
        "--out",
        m.to_str().unwrap(),
        "--seed",
        "3",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--embedding-token",
        "<tiny-dog>",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let emb = m.join("learned_embeds.safetensors");
        let o = pnd(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "a <tiny-dog> dog",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--seed",
            seed,
            "--embeddings",
            emb.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out).unwrap()
    };
    let (a, b, c) = (run("a.png", "1"), run("b.png", "1"), run("c.png", "2"));
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a, c, "other seed, other image");
}
