//! Exact gradients through one CFG DDIM step with respect to the unconditional embedding (what
//! null-text inversion optimises, SPEC §7) and the latent, checked by finite differences in f64
//! on the fixture model.

mod pipeline_support;

use candle_core::{DType, Tensor, Var};
use diffusion::hooks::NoHook;
use diffusion::pipeline::{LoadOptions, PromptEmbeddings, StableDiffusion};
use pipeline_support::*;

#[test]
fn cfg_step_gradients_match_finite_differences_f64() {
    let opts = LoadOptions {
        dtype: DType::F64,
        ..Default::default()
    };
    let sd = StableDiffusion::load(model_dir().to_str().unwrap(), &opts).unwrap();
    let emb = sd.encode_prompts("a photo of a sks dog", "").unwrap();
    let z0 = expected()["init_latents"].to_dtype(DType::F64).unwrap();
    let ddim = sd.ddim(10).unwrap();
    let target = z0.affine(0.9, 0.05).unwrap();
    // MSE between the CFG step and a target latent, as the null-text objective.
    let loss = |z: &Tensor, uncond: &Tensor| -> Tensor {
        let e = PromptEmbeddings {
            uncond: uncond.clone(),
            cond: emb.cond.clone(),
        };
        let out = sd
            .cfg_step(&ddim, z, 3, &e, 7.5, &mut NoHook)
            .unwrap()
            .latents;
        (out - &target).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let zv = Var::from_tensor(&z0).unwrap();
    let uv = Var::from_tensor(&emb.uncond).unwrap();
    let grads = loss(zv.as_tensor(), uv.as_tensor()).backward().unwrap();
    let h = 1e-5;
    for (name, var) in [("latent", &zv), ("uncond embedding", &uv)] {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.as_tensor().shape().clone();
        // A few coordinates spread over the tensor, plus the one with the largest gradient.
        let mut idx: Vec<usize> = (0..5).map(|k| k * base.len() / 5 + 7).collect();
        idx.push(
            g.iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap()
                .0,
        );
        let mut worst = 0f64;
        for &i in &idx {
            let at = |s: f64| {
                let mut v = base.clone();
                v[i] += s * h;
                let t = Tensor::from_vec(v, shape.clone(), sd.device()).unwrap();
                let l = if name == "latent" {
                    loss(&t, &emb.uncond)
                } else {
                    loss(&z0, &t)
                };
                l.to_scalar::<f64>().unwrap()
            };
            let fd = (at(1.0) - at(-1.0)) / (2.0 * h);
            let rel = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-10);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-4,
                "{name}[{i}]: finite difference {fd:e}, autograd {:e}",
                g[i]
            );
        }
        assert!(
            g.iter().any(|v| v.abs() > 1e-8),
            "{name}: gradient is all zero"
        );
        eprintln!(
            "d loss / d {name}: max relative error {worst:e} over {} coordinates",
            idx.len()
        );
    }
}

#[test]
fn f64_pipeline_decodes_like_f32() {
    let z = expected()["vae_decode_latent"].clone();
    let mut imgs = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let opts = LoadOptions {
            dtype,
            ..Default::default()
        };
        let sd = StableDiffusion::load(model_dir().to_str().unwrap(), &opts).unwrap();
        imgs.push(sd.decode(&z.to_dtype(dtype).unwrap()).unwrap());
    }
    let err = max_abs_diff(&imgs[0], &imgs[1]);
    assert!(err < 1e-4, "{err}");
}
