//! Gradients with respect to WEIGHTS (issue 14: training), finite differences in f64 on the tiny
//! SD pipeline fixture (`tests/fixtures/pipeline/model`: its UNet, SD-1.5-shaped with cross-attention
//! dim 16, and the CLIP text encoder whose hidden size matches it).
//!
//! The loss is the diffusion training loss `L = mean((unet(z_t, 601, text(ids)) - eps)^2)` with
//! fixed random `z_t` (`[2, 4, 12, 10]`: batch 2, and an odd size, so one downsampler runs candle's
//! stride-2 conv and the next the stride-1-and-subsample path, and the upsamplers both resize and
//! double), `eps` and token ids. Each test loads one model's weights as `Var`s
//! ([`diffusion::trainable`]), runs ONE backward and projects the gradient of each sampled tensor
//! `w` (every layer kind; list below) on a random unit direction `u`, against the central
//! difference `fd = (L(w + h u) - L(w - h u)) / 2h`, h = 1e-4.
//! Asserted: `|<grad, u> - fd| / |fd| <= 1e-5` for every tensor, and a finite gradient for every
//! variable of the model. Measured worst per layer kind (x86-64, printed with `--nocapture`):
//! UNet 3.3e-7 (transformer LayerNorm norm3.weight), 2.2e-7 (GEGLU proj), 1.8e-7 (resnet
//! GroupNorm), 8.9e-8 (stride-2 downsampler, odd-size path), 5.1e-8 (time embedding), the other
//! UNet kinds <= 4e-8; text encoder 3.9e-7 (self_attn out_proj), 3.4e-7 (layer_norm1),
//! 3.4e-8 (token embedding), 1.2e-8 (position embedding); Textual Inversion row 4.4e-9. These are
//! the finite difference's own error (at h = 1e-5 the small ones shrink, and the ones with a
//! directional derivative near 1e-5 grow to ~6e-6 from rounding); the bound leaves a 25x margin.
//! A gradient that never arrives (as with the fused kernels) fails the every-variable check.
//!
//! The UNet test runs twice: with the CPU kernels and with the device-generic fallback forced
//! (`layers::kernels::force_generic`, what other devices run); the UNet figures above are the same
//! for both.
//!
//! The UNet's latent and text embedding are plain tensors in the UNet test: with `ComputePath::Auto`
//! it must still pick the differentiable kernels wherever a trainable weight feeds them
//! (`auto_path_trains_weights_with_plain_inputs` checks the same in f32, where the fused kernels
//! differ).

mod pipeline_support;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use diffusion::text::{ClipTextConfig, ClipTextModel};
use diffusion::trainable::{load_vars, save_vars, var_builder};
use diffusion::unet::{ComputePath, UNet2DConditionConfig, UNet2DConditionModel};
use pipeline_support::{max_abs_diff_f64, model_dir, randn};
use std::collections::HashMap;
use std::path::PathBuf;

const T: f64 = 601.0;
const H: f64 = 1e-4;
const BOUND: f64 = 1e-5;

fn unet_file() -> PathBuf {
    model_dir().join("unet/diffusion_pytorch_model.safetensors")
}

fn text_file() -> PathBuf {
    model_dir().join("text_encoder/model.safetensors")
}

fn unet_cfg() -> UNet2DConditionConfig {
    weights::read_json(&model_dir().join("unet/config.json")).unwrap()
}

fn text_cfg() -> ClipTextConfig {
    weights::read_json(&model_dir().join("text_encoder/config.json")).unwrap()
}

fn plain_unet(dtype: DType) -> UNet2DConditionModel {
    let vb = weights::var_builder(&[unet_file()], dtype, &Device::Cpu).unwrap();
    UNet2DConditionModel::new(&unet_cfg(), vb).unwrap()
}

fn plain_text(dtype: DType) -> ClipTextModel {
    let vb = weights::var_builder(&[text_file()], dtype, &Device::Cpu).unwrap();
    ClipTextModel::new(&text_cfg(), vb).unwrap()
}

fn trainable_unet(dtype: DType) -> (UNet2DConditionModel, VarMap) {
    let vm = load_vars(&[&unet_file()], dtype, &Device::Cpu).unwrap();
    let unet = UNet2DConditionModel::new(&unet_cfg(), var_builder(&vm).unwrap()).unwrap();
    (unet, vm)
}

fn trainable_text(dtype: DType) -> (ClipTextModel, VarMap) {
    let vm = load_vars(&[&text_file()], dtype, &Device::Cpu).unwrap();
    let text = ClipTextModel::new(&text_cfg(), var_builder(&vm).unwrap()).unwrap();
    (text, vm)
}

/// The fixed training example: noisy latent, target noise, token ids (`[2, 12]`: BOS, ten
/// pseudo-random ids, EOS).
struct Example {
    z: Tensor,
    eps: Tensor,
    ids: Tensor,
}

impl Example {
    fn new(dtype: DType) -> Self {
        let ids: Vec<u32> = (0..2u32)
            .flat_map(|b| {
                let mut row = vec![49406];
                row.extend((0..10u32).map(move |i| (b * 7919 + i * 104_729 + 17) % 49_406));
                row.push(49407);
                row
            })
            .collect();
        Self {
            z: randn(&[2, 4, 12, 10], 31).to_dtype(dtype).unwrap(),
            eps: randn(&[2, 4, 12, 10], 32).to_dtype(dtype).unwrap(),
            ids: Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap(),
        }
    }

    /// `mean((unet(z, T, text(ids)) - eps)^2)`.
    fn loss(&self, unet: &UNet2DConditionModel, text: &ClipTextModel) -> Tensor {
        let ctx = text.forward(&self.ids).unwrap();
        let pred = unet.forward(&self.z, T, &ctx).unwrap();
        (pred - &self.eps)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn unit(shape: &[usize], seed: u64) -> Tensor {
    let u = randn(shape, seed);
    let norm = scalar(&u.sqr().unwrap().sum_all().unwrap()).sqrt();
    (u / norm).unwrap()
}

fn vars(vm: &VarMap) -> HashMap<String, Var> {
    vm.data().lock().unwrap().clone()
}

/// One backward of `loss`, then for each `(name, kind)` the directional derivative against the
/// central difference (the variable is set to `w ± h u` and restored). Asserts that every variable
/// of `vm` got a finite gradient. Returns the worst relative error per kind, in first-seen order.
fn check_weights(
    vm: &VarMap,
    sample: &[(&str, &str)],
    loss: impl Fn() -> Tensor,
) -> Vec<(String, f64, String)> {
    let all = vars(vm);
    let grads = loss().backward().unwrap();
    for (name, var) in &all {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let m = scalar(&g.abs().unwrap().max_all().unwrap());
        assert!(m.is_finite(), "{name}: gradient not finite");
    }
    let mut worst: Vec<(String, f64, String)> = Vec::new();
    for (k, (name, kind)) in sample.iter().enumerate() {
        let var = all
            .get(*name)
            .unwrap_or_else(|| panic!("{name}: not a variable of the model"));
        let g = grads.get(var.as_tensor()).unwrap();
        let w0 = var.as_tensor().copy().unwrap();
        let u = unit(w0.dims(), 500 + k as u64)
            .to_dtype(w0.dtype())
            .unwrap();
        let analytic = scalar(&(g * &u).unwrap().sum_all().unwrap());
        var.set(&(&w0 + (&u * H).unwrap()).unwrap()).unwrap();
        let plus = scalar(&loss());
        var.set(&(&w0 - (&u * H).unwrap()).unwrap()).unwrap();
        let minus = scalar(&loss());
        var.set(&w0).unwrap();
        let fd = (plus - minus) / (2.0 * H);
        assert!(
            fd.abs() > 1e-9,
            "{name}: directional derivative {fd} too small to test"
        );
        let rel = (analytic - fd).abs() / fd.abs();
        assert!(
            rel <= BOUND,
            "{name} ({kind}): autograd {analytic} vs finite difference {fd} (rel {rel:.2e})"
        );
        match worst.iter_mut().find(|(k, _, _)| k == kind) {
            Some(w) if rel > w.1 => {
                w.1 = rel;
                w.2 = name.to_string();
            }
            Some(_) => {}
            None => worst.push((kind.to_string(), rel, name.to_string())),
        }
    }
    for (kind, rel, name) in &worst {
        println!("{kind:<28} worst rel {rel:.1e}  ({name})");
    }
    worst
}

const ATTN: &str = "down_blocks.1.attentions.0";
const BLOCK: &str = "down_blocks.1.attentions.0.transformer_blocks.0";

fn unet_sample() -> Vec<(String, &'static str)> {
    let mut s: Vec<(String, &str)> = vec![
        ("conv_in.weight".into(), "conv_in"),
        ("conv_in.bias".into(), "conv_in"),
        ("time_embedding.linear_1.weight".into(), "time_embedding"),
        ("time_embedding.linear_1.bias".into(), "time_embedding"),
        ("time_embedding.linear_2.weight".into(), "time_embedding"),
        (
            "down_blocks.0.resnets.0.norm1.weight".into(),
            "resnet norm (GroupNorm)",
        ),
        (
            "down_blocks.0.resnets.0.norm1.bias".into(),
            "resnet norm (GroupNorm)",
        ),
        (
            "mid_block.resnets.1.norm2.weight".into(),
            "resnet norm (GroupNorm)",
        ),
        (
            "down_blocks.0.resnets.0.conv1.weight".into(),
            "resnet conv1/conv2",
        ),
        (
            "down_blocks.0.resnets.1.conv2.weight".into(),
            "resnet conv1/conv2",
        ),
        (
            "up_blocks.1.resnets.2.conv1.bias".into(),
            "resnet conv1/conv2",
        ),
        (
            "down_blocks.0.resnets.0.time_emb_proj.weight".into(),
            "time_emb_proj",
        ),
        (
            "mid_block.resnets.0.time_emb_proj.bias".into(),
            "time_emb_proj",
        ),
        (
            "down_blocks.2.resnets.0.conv_shortcut.weight".into(),
            "conv_shortcut",
        ),
        (
            "up_blocks.3.resnets.0.conv_shortcut.weight".into(),
            "conv_shortcut",
        ),
        // 12x10 -> 6x5 (candle's stride-2 conv) and 6x5 -> 3x3 (stride 1, then every 2nd).
        (
            "down_blocks.0.downsamplers.0.conv.weight".into(),
            "downsampler (stride 2)",
        ),
        (
            "down_blocks.1.downsamplers.0.conv.weight".into(),
            "downsampler (stride 2)",
        ),
        (
            "down_blocks.1.downsamplers.0.conv.bias".into(),
            "downsampler (stride 2)",
        ),
        // 2x2 -> 3x3 (resize to the skip's size) and 6x5 -> 12x10 (doubling).
        (
            "up_blocks.0.upsamplers.0.conv.weight".into(),
            "upsampler conv",
        ),
        (
            "up_blocks.2.upsamplers.0.conv.weight".into(),
            "upsampler conv",
        ),
        (format!("{ATTN}.norm.weight"), "attention norm (GroupNorm)"),
        (format!("{ATTN}.norm.bias"), "attention norm (GroupNorm)"),
        (format!("{ATTN}.proj_in.weight"), "proj_in / proj_out"),
        (format!("{ATTN}.proj_out.weight"), "proj_in / proj_out"),
        (format!("{ATTN}.proj_out.bias"), "proj_in / proj_out"),
        ("conv_norm_out.weight".into(), "conv_norm_out"),
        ("conv_norm_out.bias".into(), "conv_norm_out"),
        ("conv_out.weight".into(), "conv_out"),
        ("conv_out.bias".into(), "conv_out"),
    ];
    for attn in ["attn1", "attn2"] {
        for p in [
            "to_q.weight",
            "to_k.weight",
            "to_v.weight",
            "to_out.0.weight",
            "to_out.0.bias",
        ] {
            let kind = if attn == "attn1" {
                "attn1 (self)"
            } else {
                "attn2 (cross)"
            };
            s.push((format!("{BLOCK}.{attn}.{p}"), kind));
        }
    }
    for n in ["norm1", "norm2", "norm3"] {
        for p in ["weight", "bias"] {
            s.push((format!("{BLOCK}.{n}.{p}"), "transformer LayerNorm"));
        }
    }
    s.push((format!("{BLOCK}.ff.net.0.proj.weight"), "ff GEGLU proj"));
    s.push((format!("{BLOCK}.ff.net.0.proj.bias"), "ff GEGLU proj"));
    s.push((format!("{BLOCK}.ff.net.2.weight"), "ff net.2"));
    s.push((format!("{BLOCK}.ff.net.2.bias"), "ff net.2"));
    // The decoder's and the mid block's transformers too.
    let up = "up_blocks.3.attentions.2.transformer_blocks.0";
    s.push((format!("{up}.attn1.to_q.weight"), "attn1 (self)"));
    s.push((format!("{up}.attn2.to_k.weight"), "attn2 (cross)"));
    s.push((format!("{up}.norm2.weight"), "transformer LayerNorm"));
    let mid = "mid_block.attentions.0.transformer_blocks.0";
    s.push((format!("{mid}.attn2.to_v.weight"), "attn2 (cross)"));
    s.push((format!("{mid}.ff.net.0.proj.weight"), "ff GEGLU proj"));
    s
}

/// The UNet's weights trainable, its inputs (latent, text embedding) plain.
fn check_unet_weights() {
    let (unet, vm) = trainable_unet(DType::F64);
    let text = plain_text(DType::F64);
    let ex = Example::new(DType::F64);
    let sample = unet_sample();
    let sample: Vec<(&str, &str)> = sample.iter().map(|(n, k)| (n.as_str(), *k)).collect();
    let worst = check_weights(&vm, &sample, || ex.loss(&unet, &text));
    assert_eq!(worst.len(), 17, "every layer kind is sampled");
}

#[test]
fn unet_weight_gradients_match_finite_differences() {
    check_unet_weights();
}

#[test]
fn unet_weight_gradients_match_finite_differences_on_the_generic_path() {
    // The device-generic fallback (what CUDA/Metal run): candle's ops for every kernel.
    let _generic = layers::kernels::force_generic();
    check_unet_weights();
}

#[test]
fn text_encoder_weight_gradients_match_finite_differences() {
    let unet = plain_unet(DType::F64);
    let (text, vm) = trainable_text(DType::F64);
    let ex = Example::new(DType::F64);
    let mut sample: Vec<(String, &str)> = vec![
        (
            "embeddings.token_embedding.weight".into(),
            "token embedding",
        ),
        (
            "embeddings.position_embedding.weight".into(),
            "position embedding",
        ),
        ("final_layer_norm.weight".into(), "final_layer_norm"),
        ("final_layer_norm.bias".into(), "final_layer_norm"),
    ];
    for l in 0..2 {
        let p = format!("encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            sample.push((
                format!("{p}.self_attn.{proj}.weight"),
                "self_attn q/k/v/out",
            ));
        }
        sample.push((format!("{p}.self_attn.q_proj.bias"), "self_attn q/k/v/out"));
        sample.push((format!("{p}.layer_norm1.weight"), "layer_norm1/2"));
        sample.push((format!("{p}.layer_norm1.bias"), "layer_norm1/2"));
        sample.push((format!("{p}.layer_norm2.weight"), "layer_norm1/2"));
        sample.push((format!("{p}.mlp.fc1.weight"), "mlp fc1/fc2"));
        sample.push((format!("{p}.mlp.fc1.bias"), "mlp fc1/fc2"));
        sample.push((format!("{p}.mlp.fc2.weight"), "mlp fc1/fc2"));
    }
    let sample: Vec<(&str, &str)> = sample.iter().map(|(n, k)| (n.as_str(), *k)).collect();
    let worst = check_weights(&vm, &sample, || ex.loss(&unet, &text));
    assert_eq!(worst.len(), 6);

    // The token table's gradient lives on the rows the ids use, and only there.
    let table = vars(&vm)["embeddings.token_embedding.weight"].clone();
    let grads = ex.loss(&unet, &text).backward().unwrap();
    let g = grads.get(table.as_tensor()).unwrap();
    let used: Vec<u32> = {
        let mut v = ex.ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        v.sort_unstable();
        v.dedup();
        v
    };
    let row_norms = g.sqr().unwrap().sum(D::Minus1).unwrap();
    let row_norms = row_norms.to_vec1::<f64>().unwrap();
    for (id, n) in row_norms.iter().enumerate() {
        if used.binary_search(&(id as u32)).is_ok() {
            assert!(*n > 0.0, "row {id} is used but has no gradient");
        } else {
            assert_eq!(*n, 0.0, "row {id} is unused but has a gradient");
        }
    }
    // Positions past the 12 tokens get none either.
    let pos = grads
        .get(vars(&vm)["embeddings.position_embedding.weight"].as_tensor())
        .unwrap();
    let tail = pos.narrow(0, 12, 77 - 12).unwrap();
    assert_eq!(scalar(&tail.abs().unwrap().max_all().unwrap()), 0.0);
}

#[test]
fn textual_inversion_row_gradient_matches_finite_differences() {
    // Textual Inversion: one new row appended to a constant table; the rest of the encoder and the
    // UNet are constant. The gradient must reach the row (and nothing else is trainable).
    let unet = plain_unet(DType::F64);
    let base = plain_text(DType::F64);
    let frozen = base.token_embedding().clone();
    let vocab = frozen.dim(0).unwrap();
    let row = Var::from_tensor(&(randn(&[1, 16], 41) * 0.02).unwrap()).unwrap();
    // The table is a snapshot of the row (candle is eager): rebuilt for every forward.
    let text = || {
        let mut text = base.clone();
        let table = Tensor::cat(&[&frozen, row.as_tensor()], 0).unwrap();
        text.set_token_embedding(table).unwrap();
        text
    };
    let mut ex = Example::new(DType::F64);
    // "a photo of <new> ..." in both rows of the batch, at different positions.
    let mut ids = ex.ids.to_vec2::<u32>().unwrap();
    ids[0][3] = vocab as u32;
    ids[1][5] = vocab as u32;
    ex.ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let vm = VarMap::new();
    vm.data()
        .lock()
        .unwrap()
        .insert("new_token".into(), row.clone());
    let worst = check_weights(&vm, &[("new_token", "textual inversion row")], || {
        ex.loss(&unet, &text())
    });
    assert_eq!(worst.len(), 1);
}

#[test]
fn set_token_embedding_rejects_a_table_of_the_wrong_width() {
    let mut text = plain_text(DType::F32);
    let err = text
        .set_token_embedding(Tensor::zeros((10, 8), DType::F32, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[10, 8]") && err.contains("hidden size 16"),
        "{err}"
    );
}

/// The max over variables of the relative max-abs difference between two gradient sets.
fn grad_gap(
    vm: &VarMap,
    a: &candle_core::backprop::GradStore,
    b: &candle_core::backprop::GradStore,
) -> (f64, String) {
    let mut worst = (0.0, "all variables".to_string());
    for (name, var) in vars(vm) {
        let (ga, gb) = (
            a.get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient")),
            b.get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        let scale = scalar(&gb.abs().unwrap().max_all().unwrap()).max(1e-12);
        let d = max_abs_diff_f64(
            &ga.to_dtype(DType::F64).unwrap(),
            &gb.to_dtype(DType::F64).unwrap(),
        ) / scale;
        if d > worst.0 {
            worst = (d, name);
        }
    }
    worst
}

#[test]
fn auto_path_trains_weights_with_plain_inputs() {
    // f32, where Auto could pick candle's fused layer norm / softmax / upsampling (no or wrong
    // backward): with trainable weights and a plain latent and text embedding, Auto must give the
    // gradients of the forced differentiable path.
    let (mut unet, vm) = trainable_unet(DType::F32);
    let text = plain_text(DType::F32);
    let ex = Example::new(DType::F32);
    assert_eq!(unet.compute_path(), ComputePath::Auto);
    let auto = ex.loss(&unet, &text).backward().unwrap();
    unet.set_compute_path(ComputePath::Differentiable);
    let forced = ex.loss(&unet, &text).backward().unwrap();
    let (gap, name) = grad_gap(&vm, &auto, &forced);
    println!("Auto vs Differentiable weight gradients (f32): max rel gap {gap:.1e} ({name})");
    assert!(gap <= 1e-5, "{name}: {gap}");
}

#[test]
fn trainable_models_compute_what_the_plain_loaders_do() {
    let ex = Example::new(DType::F32);
    // Text encoder: the same ops either way, so the same bits.
    let (text_t, _) = trainable_text(DType::F32);
    let text_p = plain_text(DType::F32);
    let ctx_t = text_t.forward(&ex.ids).unwrap();
    let ctx_p = text_p.forward(&ex.ids).unwrap();
    assert_eq!(max_abs_diff_f64(&ctx_t, &ctx_p), 0.0);
    // UNet: the weights are the loader's bit for bit ...
    let (unet_t, vm) = trainable_unet(DType::F32);
    let plain = candle_core::safetensors::load(unet_file(), &Device::Cpu).unwrap();
    assert_eq!(plain.len(), vars(&vm).len());
    for (name, var) in vars(&vm) {
        // The fixture is stored in f16; both loaders convert to f32 exactly.
        let p = plain[&name].to_dtype(DType::F32).unwrap();
        assert_eq!(max_abs_diff_f64(var.as_tensor(), &p), 0.0, "{name}");
    }
    // ... and the forward is the same function (Auto runs the differentiable kernels with
    // trainable weights, the fused ones without: f32 rounding apart).
    let unet_p = plain_unet(DType::F32);
    let a = unet_t.forward(&ex.z, T, &ctx_p).unwrap();
    let b = unet_p.forward(&ex.z, T, &ctx_p).unwrap();
    let d = max_abs_diff_f64(&a, &b);
    println!("trainable vs plain UNet output: max |diff| {d:.1e}");
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn saved_vars_read_back_identically_and_load_with_the_plain_loader() {
    let dir = tempfile::tempdir().unwrap();
    let (text, vm) = trainable_text(DType::F32);
    // A "training step": change one variable in place.
    let fc1 = vars(&vm)["encoder.layers.1.mlp.fc1.weight"].clone();
    fc1.set(&(fc1.as_tensor() * 1.5).unwrap()).unwrap();
    let path = dir.path().join("model.safetensors");
    save_vars(&vm, |_| true, &path).unwrap();
    let back = load_vars(&[&path], DType::F32, &Device::Cpu).unwrap();
    let (a, b) = (vars(&vm), vars(&back));
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    let mut back_names: Vec<&String> = b.keys().collect();
    back_names.sort();
    assert_eq!(names, back_names);
    for name in names {
        assert_eq!(a[name].dtype(), b[name].dtype());
        assert_eq!(
            max_abs_diff_f64(a[name].as_tensor(), b[name].as_tensor()),
            0.0,
            "{name}"
        );
    }
    // The plain loader reads the file as a checkpoint: same output as the trained model.
    let vb = weights::var_builder(std::slice::from_ref(&path), DType::F32, &Device::Cpu).unwrap();
    let reloaded = ClipTextModel::new(&text_cfg(), vb).unwrap();
    let ids = Example::new(DType::F32).ids;
    assert_eq!(
        max_abs_diff_f64(
            &text.forward(&ids).unwrap(),
            &reloaded.forward(&ids).unwrap()
        ),
        0.0
    );
    // A filter keeps only the names it passes.
    let part = dir.path().join("embeddings.safetensors");
    save_vars(&vm, |n| n.starts_with("embeddings."), &part).unwrap();
    let mut kept: Vec<String> = candle_core::safetensors::load(&part, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            "embeddings.position_embedding.weight",
            "embeddings.token_embedding.weight"
        ]
    );
    let err = save_vars(&vm, |_| false, &dir.path().join("none.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no variable name passes"), "{err}");
}

#[test]
fn load_vars_names_a_missing_file() {
    let missing = model_dir().join("unet/no_such_file.safetensors");
    let err = load_vars(&[&unet_file(), &missing], DType::F32, &Device::Cpu)
        .err()
        .expect("a missing file is an error")
        .to_string();
    assert!(
        err.contains("no_such_file.safetensors") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn var_builder_refuses_a_missing_weight_instead_of_creating_it() {
    let vm = load_vars(&[&unet_file()], DType::F32, &Device::Cpu).unwrap();
    vm.data().lock().unwrap().remove("conv_out.bias");
    let err = UNet2DConditionModel::new(&unet_cfg(), var_builder(&vm).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("conv_out.bias"), "{err}");
    assert!(!vm.data().lock().unwrap().contains_key("conv_out.bias"));
    // A wrong shape names the tensor and both shapes.
    let vm = load_vars(&[&text_file()], DType::F32, &Device::Cpu).unwrap();
    let mut cfg = text_cfg();
    cfg.intermediate_size = 24;
    let err = ClipTextModel::new(&cfg, var_builder(&vm).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp.fc1.weight") && err.contains("24"),
        "{err}"
    );
    // An empty VarMap has no dtype or device to build with.
    let err = var_builder(&VarMap::new())
        .err()
        .expect("an empty VarMap is an error")
        .to_string();
    assert!(err.contains("no variables"), "{err}");
}
