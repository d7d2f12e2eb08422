//! `pnd generate --method blip-diffusion` end to end on the tiny BLIP-Diffusion model (written to
//! a temporary folder with the committed CLIP tokenizer): unguided it gives the library
//! pipeline's latents; with `--pick-and-draw` it writes the full trace; bad flags give one clear
//! error each.

use candle_core::{DType, Device};
use diffusion::blip::{BlipDiffusionPipeline, BlipRequest};
use tiny::blip::{write_tiny_blip_model, TinyBlipSpec};

mod common;

use common::{fixture_tokenizer, max_abs_diff, pnd, write_reference_image, write_short_guidance};
use std::path::{Path, PathBuf};

fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let model = root.join("blip");
    write_tiny_blip_model(&model, 1, &fixture_tokenizer(), &TinyBlipSpec::default()).unwrap();
    let reference = root.join("ref.png");
    write_reference_image(&reference);
    (model, reference)
}

#[test]
fn generate_blip_diffusion_plain_and_guided() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (model, reference) = setup(root);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = root.join("plain.png");
    let latents = root.join("plain.safetensors");
    let base_args = vec![
        "generate".to_string(),
        "--method".into(),
        "blip-diffusion".into(),
        "--model".into(),
        s(&model),
        "--reference".into(),
        s(&reference),
        "--subject-category".into(),
        "dog".into(),
        "--prompt".into(),
        "a dog in the jungle".into(),
        "--steps".into(),
        "8".into(),
        "--height".into(),
        "64".into(),
        "--width".into(),
        "64".into(),
        "--seed".into(),
        "4".into(),
        "--quiet".into(),
    ];
    let run = |extra: &[String]| {
        let mut a = base_args.clone();
        a.extend(extra.iter().cloned());
        pnd(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Unguided: the library pipeline's latents for the same request, and a 64×64 PNG.
    let o = run(&[
        "--out".into(),
        s(&out),
        "--save-latents".into(),
        s(&latents),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pipe = BlipDiffusionPipeline::load(&s(&model), DType::F32, &Device::Cpu).unwrap();
    let req = BlipRequest {
        reference: reference.clone(),
        subject_category: "dog".into(),
        prompt: "in the jungle".into(),
        steps: 8,
        height: 64,
        width: 64,
        seed: 4,
        ..Default::default()
    };
    let expected = pipe.generate(&req, &mut |_, _| {}).unwrap().latents;
    let ours = diffusion::pipeline::read_latents(&latents).unwrap();
    let d = max_abs_diff(&ours, &expected);
    assert_eq!(d, 0.0, "CLI and library latents differ by {d}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // Guided, windows scaled to the 8-step schedule: 2 layout + 2 appearance steps × 3 updates.
    let cfg_path = write_short_guidance(root);
    let trace = root.join("trace.jsonl");
    let guided_out = root.join("guided.png");
    let guided_latents = root.join("guided.safetensors");
    // The layout template comes from a vanilla Stable Diffusion (here a tiny one), not BLIP's UNet.
    let sd = root.join("sd");
    tiny::write_tiny_model(&sd, 0, &fixture_tokenizer(), &Default::default()).unwrap();
    let o = run(&[
        "--pick-and-draw".into(),
        "--base-model".into(),
        s(&sd),
        "--guidance-config".into(),
        s(&cfg_path),
        "--trace".into(),
        s(&trace),
        "--palette-cache".into(),
        s(&root.join("cache")),
        "--out".into(),
        s(&guided_out),
        "--save-latents".into(),
        s(&guided_latents),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("pick-and-draw: inversion"), "{stderr}");
    assert!(
        stderr.contains(&format!("pick-and-draw: layout template from '{}'", s(&sd))),
        "{stderr}"
    );
    let rows = guidance::trace::read_trace(&trace).unwrap();
    assert_eq!(rows.len(), 12);
    for r in &rows {
        assert_eq!(r.loss_lay.is_some(), r.step < 2, "{r:?}");
        assert_eq!(r.loss_app.is_some(), (2..4).contains(&r.step), "{r:?}");
    }
    let guided = diffusion::pipeline::read_latents(&guided_latents).unwrap();
    let d = max_abs_diff(&guided, &expected);
    assert!(d > 0.0, "guidance changed nothing");
    assert!(image::open(&guided_out).is_ok());
}

#[test]
fn blip_diffusion_flags_give_one_clear_error_each() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, reference) = setup(tmp.path());
    let out = tmp.path().join("x.png");
    let (m, r, o) = (
        model.to_str().unwrap(),
        reference.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let common = [
        "generate", "--model", m, "--prompt", "a dog", "--steps", "2", "--height", "64", "--width",
        "64", "--out", o, "--quiet",
    ];
    let err = |extra: &[&str]| {
        let mut a = common.to_vec();
        a.extend(extra);
        let o = pnd(&a);
        assert!(!o.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(&["--method", "blip-diffusion", "--subject-category", "dog"]);
    assert!(e.contains("needs --reference"), "{e}");
    let e = err(&["--method", "blip-diffusion", "--reference", r]);
    assert!(e.contains("needs --subject-category"), "{e}");
    let e = err(&[
        "--method",
        "blip-diffusion",
        "--reference",
        r,
        "--class",
        "dog",
        "--pick-and-draw",
        "--identifier",
        "sks",
    ]);
    assert!(e.contains("--identifier does not apply"), "{e}");
    let e = err(&["--subject-category", "dog"]);
    assert!(e.contains("--method blip-diffusion only"), "{e}");
    let e = err(&["--reference", r]);
    assert!(e.contains("need --pick-and-draw"), "{e}");
    let e = err(&["--method", "dalle"]);
    assert!(e.contains("blip-diffusion"), "{e}");
    // A Stable Diffusion folder is not a BLIP-Diffusion model: the missing component is named.
    let sd_only = tmp.path().join("sd");
    tiny::write_tiny_model(
        &sd_only,
        0,
        &fixture_tokenizer(),
        &tiny::TinySpec::default(),
    )
    .unwrap();
    let mut a = common.to_vec();
    let sd = sd_only.to_str().unwrap();
    a[2] = sd;
    a.extend([
        "--method",
        "blip-diffusion",
        "--reference",
        r,
        "--subject-category",
        "dog",
    ]);
    let o = pnd(&a);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("lacks its qformer"),
        "{e}"
    );
}

/// BLIP-Diffusion runs in f16 and bf16 on the CPU too (its Q-Former and vision encoder, the UNet
/// and the VAE in the chosen dtype): the latents stay finite and close to f32's.
#[test]
fn blip_diffusion_in_half_precision_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, reference) = setup(tmp.path());
    let latents = |dtype: &str| {
        let path = tmp.path().join(format!("{dtype}.safetensors"));
        let o = pnd(&[
            "generate",
            "--method",
            "blip-diffusion",
            "--model",
            model.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
            "--subject-category",
            "dog",
            "--prompt",
            "a dog in the jungle",
            "--steps",
            "8",
            "--height",
            "64",
            "--width",
            "64",
            "--seed",
            "4",
            "--quiet",
            "--device",
            "cpu",
            "--dtype",
            dtype,
            "--out",
            tmp.path().join(format!("{dtype}.png")).to_str().unwrap(),
            "--save-latents",
            path.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        diffusion::pipeline::read_latents(&path)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let want = latents("f32");
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for (dtype, bound) in [("f16", 2e-2), ("bf16", 1e-1)] {
        let got = latents(dtype);
        let values = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{dtype}: non-finite latents"
        );
        let rel = max_abs_diff(&got, &want) / scale;
        eprintln!("BLIP-Diffusion {dtype} vs f32: final latents max rel {rel:.2e}");
        assert!(
            rel <= bound,
            "{dtype}: latents differ by {rel} (bound {bound})"
        );
    }
}
