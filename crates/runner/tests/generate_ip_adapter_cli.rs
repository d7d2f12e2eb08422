//! `pnd generate --method ip-adapter` end to end on the tiny model and its tiny IP-Adapter (both
//! written by `pnd tiny-model --ip-adapter DIR`): unguided it gives the library's latents; with
//! `--pick-and-draw` it writes the full trace and changes the image; both adapters run; bad flags
//! and a missing image encoder give one clear error each.

use diffusion::ip_adapter::{with_image_tokens, IpAdapter, IpAdapterKind, IpAdapterSource};
use diffusion::pipeline::{LoadOptions, SampleRequest, StableDiffusion};
use diffusion::unet::IpAdapterScale;

mod common;

use common::{fixture_tokenizer, max_abs_diff, pnd, write_reference_image, write_short_guidance};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The tiny model, its tiny IP-Adapter (through `pnd tiny-model`) and a reference image.
fn setup(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let model = root.join("sd");
    let adapter = root.join("ip");
    let o = pnd(&[
        "tiny-model",
        "--out",
        &s(&model),
        "--tokenizer",
        &s(&fixture_tokenizer()),
        "--ip-adapter",
        &s(&adapter),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = root.join("ref.png");
    write_reference_image(&reference);
    (model, adapter, reference)
}

fn base_args(model: &Path, adapter: &Path, reference: &Path) -> Vec<String> {
    [
        "generate",
        "--method",
        "ip-adapter",
        "--model",
        &s(model),
        "--ip-adapter",
        &s(adapter),
        "--reference",
        &s(reference),
        "--prompt",
        "a photo of a dog in the jungle",
        "--steps",
        "8",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "4",
        "--quiet",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

fn run(base: &[String], extra: &[String]) -> std::process::Output {
    let mut a = base.to_vec();
    a.extend(extra.iter().cloned());
    pnd(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn generate_ip_adapter_plain_and_guided() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (model, adapter, reference) = setup(root);
    let base = base_args(&model, &adapter, &reference);

    // Unguided, scale 0.5: the library's latents for the same request.
    let latents = root.join("plain.safetensors");
    let t0 = Instant::now();
    let o = run(
        &base,
        &[
            "--ip-scale".into(),
            "0.5".into(),
            "--out".into(),
            s(&root.join("plain.png")),
            "--save-latents".into(),
            s(&latents),
        ],
    );
    let unguided_s = t0.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut sd = StableDiffusion::load(&s(&model), &LoadOptions::default()).unwrap();
    let source = IpAdapterSource {
        repo: s(&adapter),
        kind: IpAdapterKind::Plain,
    };
    let ip =
        IpAdapter::load_source(&source, None, &mut sd.unet, &IpAdapterScale::All(0.5)).unwrap();
    let img = metrics::preprocess::load_rgb(&reference).unwrap();
    let tokens = ip.image_tokens(&img).unwrap();
    let emb = with_image_tokens(
        &sd.encode_prompts("a photo of a dog in the jungle", "")
            .unwrap(),
        &tokens,
    )
    .unwrap();
    let req = SampleRequest {
        prompt: String::new(),
        steps: 8,
        height: 64,
        width: 64,
        seed: 4,
        ..Default::default()
    };
    let expected = sd.sample_embeddings(&emb, &req, &mut |_, _| {}).unwrap();
    let ours = diffusion::pipeline::read_latents(&latents).unwrap();
    assert_eq!(max_abs_diff(&ours, &expected), 0.0);
    // The image prompt matters.
    let text_only = sd
        .without_ip_adapter()
        .sample(
            &SampleRequest {
                prompt: "a photo of a dog in the jungle".into(),
                ..req.clone()
            },
            &mut |_, _| {},
        )
        .unwrap();
    assert!(max_abs_diff(&ours, &text_only) > 1e-3);

    // Guided, windows scaled to the 8-step schedule: 2 layout + 2 appearance steps × 3 updates.
    let cfg_path = write_short_guidance(root);
    let trace = root.join("trace.jsonl");
    let guided_latents = root.join("guided.safetensors");
    let guided = |extra: &[String]| {
        let mut a = vec![
            "--pick-and-draw".to_string(),
            "--class".into(),
            "dog".into(),
            "--guidance-config".into(),
            s(&cfg_path),
            "--trace".into(),
            s(&trace),
            "--palette-cache".into(),
            s(&root.join("cache")),
            "--out".into(),
            s(&root.join("guided.png")),
            "--save-latents".into(),
            s(&guided_latents),
        ];
        a.extend(extra.iter().cloned());
        run(&base, &a)
    };
    let t0 = Instant::now();
    let half = ["--ip-scale".to_string(), "0.5".into()];
    let o = guided(&half);
    let guided_s = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("pick-and-draw: inversion"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pick-and-draw: layout template from '{}'",
            s(&model)
        )),
        "{stderr}"
    );
    let rows = guidance::trace::read_trace(&trace).unwrap();
    assert_eq!(rows.len(), 12);
    for r in &rows {
        assert_eq!(r.loss_lay.is_some(), r.step < 2, "{r:?}");
        assert_eq!(r.loss_app.is_some(), (2..4).contains(&r.step), "{r:?}");
    }
    let g = diffusion::pipeline::read_latents(&guided_latents).unwrap();
    assert!(max_abs_diff(&g, &ours) > 0.0, "guidance changed nothing");
    // The second run reads the inversion, palette and template from the cache.
    let t0 = Instant::now();
    let o = guided(&half);
    let cached_s = t0.elapsed().as_secs_f64();
    assert!(o.status.success());
    let again = diffusion::pipeline::read_latents(&guided_latents).unwrap();
    assert_eq!(max_abs_diff(&again, &g), 0.0);
    println!(
        "tiny 64x64, 8 steps (process wall time, debug build, shared machine): unguided \
         {unguided_s:.2}s, guided {guided_s:.2}s (with inversion and template), guided from the \
         cache {cached_s:.2}s"
    );

    // The palette comes from an inversion conditioned as the generation is: its null-text
    // embeddings are the negative branch, 77 text tokens and the 4 negative image tokens.
    let inversions = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                name.starts_with("inversion-") && name.ends_with(".safetensors")
            })
            .collect();
        v.sort();
        v
    };
    let ip_inv = inversions(&root.join("cache"));
    assert_eq!(ip_inv.len(), 1, "{ip_inv:?}");
    let null = candle_core::safetensors::load(&ip_inv[0], &candle_core::Device::Cpu).unwrap()
        ["null_embeddings"]
        .clone();
    assert_eq!(null.dims(), &[8, 77 + 4, 32]);
    // Plain Stable Diffusion guided with the same reference and cache gets its own inversion
    // (77 text tokens), never the IP-Adapter's.
    let mut sd_args: Vec<String> = base.clone();
    sd_args[2] = "stable-diffusion".into();
    let i = sd_args.iter().position(|x| x == "--ip-adapter").unwrap();
    sd_args.drain(i..i + 2);
    let o = run(
        &sd_args,
        &[
            "--pick-and-draw".into(),
            "--class".into(),
            "dog".into(),
            "--guidance-config".into(),
            s(&cfg_path),
            "--palette-cache".into(),
            s(&root.join("cache")),
            "--out".into(),
            s(&root.join("sd.png")),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let both = inversions(&root.join("cache"));
    assert_eq!(both.len(), 2, "{both:?}");
    let sd_inv = both.iter().find(|p| **p != ip_inv[0]).unwrap();
    let sd_null = candle_core::safetensors::load(sd_inv, &candle_core::Device::Cpu).unwrap()
        ["null_embeddings"]
        .clone();
    assert_eq!(sd_null.dims(), &[8, 77, 32]);

    // Plus runs too, guided, with a per-block scale.
    let o = guided(&[
        "--ip-adapter-kind".into(),
        "plus".into(),
        "--ip-scale".into(),
        r#"{"up": {"block_1": [0.0, 1.0, 0.0]}}"#.into(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plus = diffusion::pipeline::read_latents(&guided_latents).unwrap();
    assert!(max_abs_diff(&plus, &g) > 0.0);
}

#[test]
fn ip_adapter_flags_give_one_clear_error_each() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (model, adapter, reference) = setup(root);
    let base = base_args(&model, &adapter, &reference);
    let out = ["--out".to_string(), s(&root.join("x.png"))];
    let err = |extra: &[&str]| {
        let mut a: Vec<String> = out.to_vec();
        a.extend(extra.iter().map(|x| x.to_string()));
        let o = run(&base, &a);
        assert!(!o.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(&["--ip-scale", "{\"sideways\": 1}"]);
    assert!(e.contains("--ip-scale"), "{e}");
    let e = err(&["--ip-scale", "{\"down\": {\"block_7\": 1}}"]);
    assert!(e.contains("down.block_7"), "{e}");
    let e = err(&["--ip-adapter-kind", "huge"]);
    assert!(e.contains("plain") && e.contains("plus"), "{e}");
    let e = err(&["--subject-category", "dog"]);
    assert!(e.contains("--method blip-diffusion only"), "{e}");
    // Without the reference.
    let mut a: Vec<String> = base.clone();
    let i = a.iter().position(|x| x == "--reference").unwrap();
    a.drain(i..i + 2);
    let o = run(&a, &out);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("needs --reference"), "{e}");
    // A folder without the image encoder: named.
    std::fs::remove_dir_all(adapter.join("models/image_encoder")).unwrap();
    let e = err(&[]);
    assert!(e.contains("models/image_encoder/config.json"), "{e}");
}
