//! UNet parity with diffusers on the tiny SD-1.5-shaped fixture (`tools/fixtures/sd_unet.py`):
//! noise prediction, every cross-attention map and every transformer-block output, batch 2.

mod pipeline_support;

use candle_core::{DType, Device, Tensor};
use diffusion::hooks::{Hook, Recorder};
use diffusion::unet::{ComputePath, UNet2DConditionModel, UNetError};
use pipeline_support::{fixture, max_abs_diff, unet_fixture};
use std::collections::HashMap;

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("unet").join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn sites() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(fixture("unet").join("sites.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    (list("attention"), list("blocks"))
}

/// Runs the model on the fixture inputs and checks every output against diffusers.
fn check_parity(path: ComputePath) {
    let mut unet = unet_fixture("model", DType::F32);
    unet.set_compute_path(path);
    let exp = expected();
    let t = exp["timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let mut rec = Recorder::all();
    let eps = unet
        .forward_with(&exp["sample"], t, &exp["encoder_hidden_states"], &mut rec)
        .unwrap();
    let d = max_abs_diff(&eps, &exp["noise_pred"]);
    println!("{path:?}: noise_pred max abs diff {d:.3e}");
    assert!(d <= 1e-4, "noise prediction differs by {d}");

    let (attn_sites, block_sites) = sites();
    let got_attn: Vec<&String> = rec.attention.iter().map(|(s, _)| s).collect();
    assert_eq!(got_attn, attn_sites.iter().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (site, probs) in &rec.attention {
        let d = max_abs_diff(probs, &exp[&format!("attn:{site}")]);
        worst = worst.max(d);
        assert!(d <= 1e-4, "{site}: attention differs by {d}");
    }
    println!(
        "{path:?}: attention maps ({}) max abs diff {worst:.3e}",
        rec.attention.len()
    );
    let got_blocks: Vec<&String> = rec.blocks.iter().map(|(s, _)| s).collect();
    assert_eq!(got_blocks, block_sites.iter().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (site, hidden) in &rec.blocks {
        let d = max_abs_diff(hidden, &exp[&format!("block:{site}")]);
        worst = worst.max(d);
        assert!(d <= 1e-4, "{site}: block output differs by {d}");
    }
    println!(
        "{path:?}: block outputs ({}) max abs diff {worst:.3e}",
        rec.blocks.len()
    );
}

#[test]
fn fused_path_matches_diffusers() {
    check_parity(ComputePath::Fused);
}

#[test]
fn differentiable_path_matches_diffusers() {
    check_parity(ComputePath::Differentiable);
}

#[test]
fn site_lists_follow_diffusers_names_and_order() {
    let unet = unet_fixture("model", DType::F32);
    let (attn_sites, block_sites) = sites();
    assert_eq!(unet.cross_attention_sites(), attn_sites);
    assert_eq!(unet.transformer_block_sites(), block_sites);
    assert_eq!(attn_sites.len(), 16);
    assert!(attn_sites.contains(&"up_blocks.2.attentions.2.transformer_blocks.0.attn2".into()));
    // The legacy attention_head_dim is the number of heads: 2 heads per map.
    assert_eq!(unet.config().heads().unwrap(), vec![2, 2, 2, 2]);
}

/// A hook that asks for one site of each kind and counts what it is offered and given.
struct OneSite {
    asked: usize,
    given: Vec<String>,
}

impl Hook for OneSite {
    fn wants_attention(&self, site: &str) -> bool {
        site == "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    }
    fn attention(&mut self, site: &str, probs: &Tensor) -> candle_core::Result<()> {
        assert_eq!(probs.dims(), &[2, 2, 64, 77]);
        self.given.push(site.into());
        Ok(())
    }
    fn wants_block_output(&self, site: &str) -> bool {
        site == "mid_block.attentions.0.transformer_blocks.0"
    }
    fn block_output(&mut self, site: &str, hidden: &Tensor) -> candle_core::Result<()> {
        assert_eq!(hidden.dims(), &[2, 4, 32]);
        self.asked += 1;
        self.given.push(site.into());
        Ok(())
    }
}

#[test]
fn hook_receives_only_what_it_asks_for() {
    let unet = unet_fixture("model", DType::F32);
    let exp = expected();
    let mut hook = OneSite {
        asked: 0,
        given: vec![],
    };
    unet.forward_with(
        &exp["sample"],
        601.0,
        &exp["encoder_hidden_states"],
        &mut hook,
    )
    .unwrap();
    assert_eq!(
        hook.given,
        vec![
            "mid_block.attentions.0.transformer_blocks.0".to_string(),
            "up_blocks.2.attentions.1.transformer_blocks.0.attn2".to_string()
        ]
    );
    assert_eq!(hook.asked, 1);
}

#[test]
fn f64_model_matches_diffusers() {
    let unet = unet_fixture("model", DType::F64);
    let exp = expected();
    let sample = exp["sample"].to_dtype(DType::F64).unwrap();
    let ctx = exp["encoder_hidden_states"].to_dtype(DType::F64).unwrap();
    let eps = unet.forward(&sample, 601.0, &ctx).unwrap();
    assert_eq!(eps.dtype(), DType::F64);
    let d = max_abs_diff(&eps, &exp["noise_pred"]);
    println!("f64: noise_pred max abs diff {d:.3e}");
    assert!(d <= 1e-4, "f64 noise prediction differs by {d}");
}

#[test]
fn config_that_does_not_match_the_weights_names_tensor_shape_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("unet").join("model");
    std::fs::copy(
        model.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(model.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["cross_attention_dim"] = serde_json::json!(48);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let src = weights::ModelSource::parse(dir.path().to_str().unwrap()).unwrap();
    let err = UNet2DConditionModel::load(&src, "", DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, UNetError::Weights { .. }), "{err:?}");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains("attn2.to_k.weight"), "{msg}");
    assert!(
        msg.contains("[16, 48]") && msg.contains("[16, 32]"),
        "{msg}"
    );
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn unsupported_config_is_one_clear_error() {
    let text = std::fs::read_to_string(fixture("unet").join("model/config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["class_embed_type"] = serde_json::json!("timestep");
    let cfg: diffusion::unet::UNet2DConditionConfig = serde_json::from_value(cfg).unwrap();
    let err = cfg.check().unwrap_err().to_string();
    assert!(
        err.contains("class_embed_type") && err.contains("timestep"),
        "{err}"
    );
}

#[test]
fn sd2_style_model_at_an_odd_latent_size_matches_diffusers() {
    // use_linear_projection, per-level legacy head counts (1, 2, 2, 2), upcast_attention, and a
    // 12x10 latent: up blocks resize to the skip connections' sizes (forward_upsample_size).
    let mut unet = unet_fixture("model_v2", DType::F32);
    assert_eq!(unet.config().heads().unwrap(), vec![1, 2, 2, 2]);
    let exp = candle_core::safetensors::load(
        fixture("unet").join("expected_v2.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for path in [ComputePath::Fused, ComputePath::Differentiable] {
        unet.set_compute_path(path);
        let eps = unet
            .forward(&exp["sample"], 301.0, &exp["encoder_hidden_states"])
            .unwrap();
        let d = max_abs_diff(&eps, &exp["noise_pred"]);
        println!("v2 {path:?}: noise_pred max abs diff {d:.3e}");
        assert!(d <= 1e-4, "{path:?}: {d}");
    }
}
