//! Parity against transformers + PIL on the tiny fixture models (`tools/fixtures/metrics.py`).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use metrics::preprocess::{load_rgb, Preprocess};
use metrics::{ClipModel, DinoModel};

/// The fixture script's `lcg_pixels(2·3·224·224)`, bit for bit.
fn lcg_pixels() -> Tensor {
    let n = 2 * 3 * 224 * 224;
    let mut s: u32 = 12345;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, (2, 3, 224, 224), &Device::Cpu).unwrap()
}

fn load(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

#[test]
fn image_embeddings_match_transformers_on_identical_inputs() {
    let t = load("embeddings.safetensors");
    let x = &lcg_pixels();
    let dino = DinoModel::load(&fixture("dino_tiny"), &Device::Cpu).unwrap();
    let clip = ClipModel::load(&fixture("clip_tiny"), &Device::Cpu).unwrap();

    let ours = dino
        .vit
        .embed(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = t["dino"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = max_abs_diff(&ours, &want);
    eprintln!(
        "DINO embedding max |Δ| = {d:.3e} (scale {:.2})",
        want[0].abs()
    );
    let dino_ok = d <= 1e-4;

    // The full last_hidden_state CLS row equals the embedding.
    let full = dino.vit.forward(x).unwrap();
    let cls = full
        .narrow(1, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>();
    assert!(max_abs_diff(&cls.unwrap(), &ours) < 1e-6);

    let ours = clip
        .vision
        .embed(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = t["clip_image"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let d = max_abs_diff(&ours, &want);
    eprintln!("CLIP image embedding max |Δ| = {d:.3e}");
    assert!(d <= 1e-4, "CLIP image max abs diff {d}");
    assert!(dino_ok, "DINO max abs diff");
}

#[test]
fn the_device_generic_path_matches_transformers_and_the_cpu_kernels() {
    // What CUDA runs (`layers::kernels::force_generic`: the two-pass LayerNorm as candle ops),
    // on the CPU, against the CPU kernels and the transformers fixture.
    let t = load("embeddings.safetensors");
    let x = &lcg_pixels();
    let dino = DinoModel::load(&fixture("dino_tiny"), &Device::Cpu).unwrap();
    let clip = ClipModel::load(&fixture("clip_tiny"), &Device::Cpu).unwrap();
    let embed = |generic: bool| {
        let _guard = generic.then(layers::kernels::force_generic);
        let d = dino
            .vit
            .embed(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = clip
            .vision
            .embed(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (d, c)
    };
    let (host_d, host_c) = embed(false);
    let (gen_d, gen_c) = embed(true);
    let (dd, dc) = (max_abs_diff(&host_d, &gen_d), max_abs_diff(&host_c, &gen_c));
    let want_d = t["dino"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want_c = t["clip_image"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (td, tc) = (max_abs_diff(&gen_d, &want_d), max_abs_diff(&gen_c, &want_c));
    eprintln!(
        "generic vs CPU kernels: DINO {dd:.1e}, CLIP {dc:.1e}; vs transformers: {td:.1e}, {tc:.1e}"
    );
    assert!(
        dd <= 1e-5 && dc <= 1e-5,
        "generic path differs: DINO {dd}, CLIP {dc}"
    );
    assert!(
        td <= 1e-4 && tc <= 1e-4,
        "generic path vs transformers: DINO {td}, CLIP {tc}"
    );
}

#[test]
fn text_embeddings_and_token_ids_match_transformers() {
    let t = load("embeddings.safetensors");
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("prompts.json")).unwrap())
            .unwrap();
    let clip = ClipModel::load(&fixture("clip_tiny"), &Device::Cpu).unwrap();
    let ids = t["input_ids"].to_vec2::<i64>().unwrap();
    let mask = t["attention_mask"].to_vec2::<i64>().unwrap();
    let want = t["clip_text"].to_vec2::<f32>().unwrap();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ours = clip.embed_texts(&refs).unwrap();
    let mut worst = 0f32;
    for (i, p) in prompts.iter().enumerate() {
        let expected: Vec<u32> = ids[i]
            .iter()
            .zip(&mask[i])
            .filter(|(_, &m)| m == 1)
            .map(|(&t, _)| t as u32)
            .collect();
        assert_eq!(clip.tokenizer.encode(p).unwrap(), expected, "ids of '{p}'");
        worst = worst.max(max_abs_diff(&ours[i], &want[i]));
    }
    // Padded rows (as transformers batches them) pool at the same token and give the same result.
    let padded: Vec<Vec<u32>> = ids
        .iter()
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    let batch = clip.text.embed(&padded).unwrap().to_vec2::<f32>().unwrap();
    for (b, w) in batch.iter().zip(&want) {
        worst = worst.max(max_abs_diff(b, w));
    }
    eprintln!("CLIP text embedding max |Δ| = {worst:.3e}");
    assert!(worst <= 1e-4, "CLIP text max abs diff {worst}");
}

fn rgb(t: &Tensor) -> image::RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    image::RgbImage::from_raw(w as u32, h as u32, v).unwrap()
}

#[test]
fn bicubic_resize_is_bit_exact_to_pil_on_a_synthetic_image() {
    let t = load("resize.safetensors");
    let src = rgb(&t["source"]);
    let mut checked = 0;
    for (name, want) in &t {
        let want = rgb(want);
        let ours = if let Some(size) = name.strip_prefix("resize_") {
            let (w, h) = size.split_once('x').unwrap();
            metrics::preprocess::resize_bicubic(&src, w.parse().unwrap(), h.parse().unwrap())
        } else if name == "dino" {
            Preprocess::DINO.crop_u8(&src)
        } else if name == "clip" {
            Preprocess::CLIP.crop_u8(&src)
        } else {
            continue;
        };
        let differ = ours
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(ours.dimensions(), want.dimensions(), "{name}");
        assert_eq!(differ, 0, "{name}: {differ} values differ from PIL");
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn dreambench_decode_resize_crop_are_bit_exact_to_pil() {
    let stored = load("preprocess.safetensors");
    let hashes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("preprocess.json")).unwrap())
            .unwrap();
    let (mut decoded_same, mut dino_same, mut clip_same, mut n) = (0, 0, 0, 0);
    let mut worst = 0;
    for (rel, h) in hashes.as_object().unwrap() {
        let img = load_rgb(&testdata::dreambench().join(rel)).unwrap();
        n += 1;
        decoded_same += (metrics::cache::sha256_hex(img.as_raw()) == h["decoded"]) as usize;
        let dc = Preprocess::DINO.crop_u8(&img);
        let cc = Preprocess::CLIP.crop_u8(&img);
        dino_same += (metrics::cache::sha256_hex(dc.as_raw()) == h["dino_crop"]) as usize;
        clip_same += (metrics::cache::sha256_hex(cc.as_raw()) == h["clip_crop"]) as usize;
        for (tag, ours) in [("dino", &dc), ("clip", &cc)] {
            if let Some(t) = stored.get(&format!("{rel}:{tag}")) {
                let want = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                let diff = ours
                    .as_raw()
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (a as i32 - b as i32).abs())
                    .max()
                    .unwrap();
                worst = worst.max(diff);
                let count = ours
                    .as_raw()
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a != b)
                    .count();
                eprintln!(
                    "{rel} {tag}: max |Δ| = {diff}/255, {count} of {} values differ",
                    want.len()
                );
            }
        }
    }
    eprintln!(
        "{n} images: decoded RGB identical to PIL for {decoded_same}, DINO crop for {dino_same}, CLIP crop for {clip_same}"
    );
    assert_eq!(n, 158);
    assert_eq!(worst, 0, "crop differs from PIL by {worst}/255");
    assert_eq!(
        decoded_same, n,
        "JPEG decode differs from PIL/libjpeg-turbo"
    );
    assert_eq!(dino_same, n);
    assert_eq!(clip_same, n);
}

#[test]
fn transformers_5_vit_key_layout_loads_to_the_same_model() {
    // Rename the legacy keys of the fixture into transformers ≥ 5 names (with a `vit.` prefix, as a
    // ViTFor* checkpoint has them) and check the embeddings are unchanged.
    let legacy = load("dino_tiny/model.safetensors");
    let renamed: std::collections::HashMap<String, Tensor> = legacy
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("encoder.layer.", "layers.")
                .replace("attention.attention.query", "attention.q_proj")
                .replace("attention.attention.key", "attention.k_proj")
                .replace("attention.attention.value", "attention.v_proj")
                .replace("attention.output.dense", "attention.o_proj")
                .replace("intermediate.dense", "mlp.fc1")
                .replace("output.dense", "mlp.fc2");
            (format!("vit.{k}"), v)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&renamed, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        fixtures().join("dino_tiny/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let a = DinoModel::load(&fixture("dino_tiny"), &Device::Cpu).unwrap();
    let b = DinoModel::load(dir.path().to_str().unwrap(), &Device::Cpu).unwrap();
    let x = lcg_pixels();
    let ea = a
        .vit
        .embed(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let eb = b
        .vit
        .embed(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(ea, eb);
}
