//! Textual Inversion against diffusers' script (`tools/fixtures/train_step.py`): two optimizer
//! steps of batch 2 with 2 accumulation steps on the tiny pipeline model, every random draw fed
//! from the fixture. Checked: our transforms give the script's pixels and token ids exactly, the
//! loss of each micro-batch, the accumulated gradient of the new row and the row after each
//! AdamW step (through [`training::train_loop::run`]).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, model, Fixed};
use std::collections::HashMap;
use std::path::PathBuf;
use training::textual_inversion::{TextualInversion, TiInputs, TiSettings};
use training::train_loop::{self, LoopSettings};

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (d / n).sqrt()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn two_steps_match_the_script() {
    let facts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("ti.json")).unwrap())
            .unwrap();
    let want: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("ti.safetensors"), &Device::Cpu).unwrap();
    let mut settings = TiSettings::new(
        facts["token"].as_str().unwrap(),
        facts["init_token"].as_str().unwrap(),
    );
    settings.batch = 2;
    settings.grad_accum = 2;
    settings.lr = 5e-2;
    settings.steps = 2;
    settings.resolution = 64;
    assert_eq!(settings.effective_lr(), facts["lr"].as_f64().unwrap());
    let ti = TextualInversion::new(
        &model(),
        &fixtures().join("images"),
        settings.clone(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ti.token_id() as u64, facts["token_id"].as_u64().unwrap());
    assert_eq!(max_abs(ti.row().as_tensor(), &want["row.init"]), 0.0);

    // Our transforms and tokenizer against the script's, then the script's draws as inputs.
    let files = training::data::list_images(&fixtures().join("images")).unwrap();
    let resized =
        training::data::load_resized(&files, |i| training::data::ti_resize(i, 64)).unwrap();
    let tok =
        diffusion::tokenizer::ClipTokenizer::from_folder(&PathBuf::from(model()).join("tokenizer"));
    let mut tok = tok.unwrap();
    tok.add_token(&settings.token).unwrap();
    let mut inputs = Vec::new();
    for (k, m) in facts["micro"].as_array().unwrap().iter().enumerate() {
        let pixels: Vec<Tensor> = m["images"]
            .as_array()
            .unwrap()
            .iter()
            .zip(m["flips"].as_array().unwrap())
            .map(|(i, f)| {
                training::data::ti_pixels(
                    &resized[i.as_u64().unwrap() as usize],
                    f.as_bool().unwrap(),
                    &Device::Cpu,
                )
                .unwrap()
            })
            .collect();
        let pixels = Tensor::stack(&pixels, 0).unwrap();
        assert_eq!(
            max_abs(&pixels, &want[&format!("pixels.{k}")]),
            0.0,
            "pixels {k}"
        );
        let prompts: Vec<String> = m["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        let ids: Vec<Tensor> = prompts
            .iter()
            .map(|p| Tensor::new(tok.encode(p).unwrap().ids.as_slice(), &Device::Cpu).unwrap())
            .collect();
        let ids = Tensor::stack(&ids, 0).unwrap();
        let want_ids = want[&format!("ids.{k}")].to_dtype(DType::U32).unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            want_ids.to_vec2::<u32>().unwrap(),
            "ids {k}"
        );
        inputs.push(TiInputs {
            pixels,
            ids,
            posterior_noise: want[&format!("posterior_noise.{k}")].clone(),
            noise: want[&format!("noise.{k}")].clone(),
            timesteps: m["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as usize)
                .collect(),
            prompts,
        });
    }

    // The first step's accumulated gradient.
    let g: Tensor = (0..2)
        .map(|k| {
            let l = (ti.loss_of(&inputs[k]).unwrap() / 2.0).unwrap();
            ti.row_grad(&l).unwrap()
        })
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let g_err = rel(&g, &want["grad.0"]);
    eprintln!("grad step 0: relative error {g_err:.2e}");
    assert!(g_err < 1e-4, "{g_err}");

    let dir = tempfile::tempdir().unwrap();
    let loop_settings = LoopSettings {
        steps: 2,
        grad_accum: 2,
        batch: 2,
        dataset_len: 4,
        seed: 0,
        max_grad_norm: None,
        checkpoint_every: None,
        checkpoint_dir: dir.path().join("ckpt"),
        trace: None,
        fingerprint: String::new(),
        stop_after: None,
        loss_scaling: false,
    };
    let mut opt = ti.optimizer().unwrap();
    let row = ti.row().clone();
    let mut rows = Vec::new();
    let loss_of = |x: &training::train_loop::StepInputs| ti.loss_of(x);
    let mut obj = Fixed {
        loss_of: &loss_of,
        inputs,
        losses: Vec::new(),
    };
    train_loop::run(&mut opt, &mut obj, &loop_settings, &mut |_| {
        rows.push(row.as_tensor().copy().unwrap())
    })
    .unwrap();
    for (k, m) in facts["micro"].as_array().unwrap().iter().enumerate() {
        let w = m["loss"].as_f64().unwrap();
        let e = (obj.losses[k] - w).abs() / w;
        eprintln!(
            "loss {k}: ours {:.7} script {w:.7} relative {e:.2e}",
            obj.losses[k]
        );
        assert!(e < 1e-5, "loss {k}: {e}");
    }
    for (s, r) in rows.iter().enumerate() {
        let e = max_abs(r, &want[&format!("row.{s}")]);
        eprintln!("row after step {s}: max abs error {e:.2e}");
        assert!(e < 1e-5, "row {s}: {e}");
    }
}

/// The new token's lookup-and-replace forward is the appended-table forward, exactly, and its
/// gradient reaches the row.
#[test]
fn the_new_token_forward_equals_the_grown_table() {
    let src = weights::ModelSource::parse(&model()).unwrap();
    let text = diffusion::pipeline::load_text_encoder(&src, DType::F32, &Device::Cpu).unwrap();
    let id = text.token_embedding().dim(0).unwrap() as u32;
    let row = candle_core::Var::from_tensor(
        &text
            .token_embedding()
            .narrow(0, 5988, 1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .affine(1.3, 0.1)
            .unwrap(),
    )
    .unwrap();
    let ids = Tensor::new(
        &[
            [49406u32, 320, id, 1929, 49407, 49407],
            [49406, id, id, 49407, 49407, 49407],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mut grown = text.clone();
    assert_eq!(grown.push_token_embedding(row.as_tensor()).unwrap(), id);
    let want = grown.forward(&ids).unwrap();
    let got = text
        .forward_with_new_token(&ids, id, row.as_tensor())
        .unwrap();
    assert_eq!(max_abs(&got, &want), 0.0);
    let g = got.sum_all().unwrap().backward().unwrap();
    assert!(g.get(row.as_tensor()).is_some());
    let bad = Tensor::new(&[[49406u32, id + 1]], &Device::Cpu).unwrap();
    assert!(text
        .forward_with_new_token(&bad, id, row.as_tensor())
        .is_err());
}
