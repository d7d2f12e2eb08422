//! Bad IP-Adapter input is one clear error naming the file, before anything is attached: an
//! adapter whose tokens or widths do not fit the UNet, one with the wrong number of image
//! branches, an image encoder that does not fit the adapter, a missing image encoder, a file that
//! is no IP-Adapter, and a per-block scale naming a block that does not exist.

mod pipeline_support;

use candle_core::{Device, Tensor};
use diffusion::ip_adapter::{IpAdapter, IpAdapterError, IpAdapterKind, IpAdapterSource};
use diffusion::unet::{IpAdapterScale, UNet2DConditionModel};
use pipeline_support::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn h94() -> PathBuf {
    fixture("ip_adapter").join("h94")
}

fn pipeline_unet() -> UNet2DConditionModel {
    let src = weights::ModelSource::parse(model_dir().to_str().unwrap()).unwrap();
    UNet2DConditionModel::load(&src, "unet", candle_core::DType::F32, &Device::Cpu).unwrap()
}

fn encoder() -> (PathBuf, Vec<PathBuf>) {
    let e = h94().join("models/image_encoder");
    (e.join("config.json"), vec![e.join("model.safetensors")])
}

fn plain_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        h94().join("models/ip-adapter_sd15.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Loads the adapter file `path` into `unet`; the error's message, and that nothing was attached.
fn load_err(path: &Path, unet: &mut UNet2DConditionModel, scale: &IpAdapterScale) -> String {
    let (config, files) = encoder();
    let err = IpAdapter::load(path, &config, &files, None, unet, scale)
        .err()
        .expect("the load should fail");
    assert!(unet.ip_adapter().is_none(), "attached despite: {err}");
    err.to_string()
}

fn write(dir: &Path, name: &str, tensors: HashMap<String, Tensor>) -> PathBuf {
    let p = dir.join(name);
    candle_core::safetensors::save(&tensors, &p).unwrap();
    p
}

#[test]
fn an_adapter_for_another_text_width_is_refused() {
    // The UNet fixture of sd_unet.py attends to 32-wide text; the adapter makes 16-wide tokens.
    let mut unet = unet_fixture("model", candle_core::DType::F32);
    let file = h94().join("models/ip-adapter_sd15.safetensors");
    let msg = load_err(&file, &mut unet, &IpAdapterScale::All(1.0));
    assert!(msg.contains("ip-adapter_sd15.safetensors"), "{msg}");
    assert!(msg.contains("does not fit the UNet"), "{msg}");
    assert!(msg.contains("cross_attention_dim 32"), "{msg}");
}

#[test]
fn missing_or_misshapen_image_branches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut fewer = plain_tensors();
    fewer.retain(|k, _| !k.starts_with("ip_adapter.31."));
    let p = write(dir.path(), "fewer.safetensors", fewer);
    let msg = load_err(&p, &mut pipeline_unet(), &IpAdapterScale::All(1.0));
    assert!(msg.contains("fewer.safetensors"), "{msg}");
    assert!(msg.contains("15 layers"), "{msg}");
    assert!(msg.contains("16 cross-attention layers"), "{msg}");

    let mut wide = plain_tensors();
    wide.insert(
        "ip_adapter.5.to_v_ip.weight".into(),
        Tensor::zeros((16, 24), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = write(dir.path(), "wide.safetensors", wide);
    let msg = load_err(&p, &mut pipeline_unet(), &IpAdapterScale::All(1.0));
    assert!(msg.contains("wide.safetensors"), "{msg}");
    assert!(msg.contains("ip_adapter.5.to_v_ip"), "{msg}");
    assert!(
        msg.contains("down_blocks.1.attentions.0.transformer_blocks.0.attn2"),
        "{msg}"
    );
}

#[test]
fn tokens_that_do_not_fit_the_text_width_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = plain_tensors();
    // 60 values: not a whole number of 16-wide tokens.
    t.insert(
        "image_proj.proj.weight".into(),
        Tensor::zeros((60, 24), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "image_proj.proj.bias".into(),
        Tensor::zeros(60, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = write(dir.path(), "tokens.safetensors", t);
    let msg = load_err(&p, &mut pipeline_unet(), &IpAdapterScale::All(1.0));
    assert!(msg.contains("tokens.safetensors"), "{msg}");
    assert!(msg.contains("60 values"), "{msg}");
}

#[test]
fn an_image_encoder_of_another_width_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = plain_tensors();
    t.insert(
        "image_proj.proj.weight".into(),
        Tensor::zeros((64, 20), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = write(dir.path(), "narrow.safetensors", t);
    let msg = load_err(&p, &mut pipeline_unet(), &IpAdapterScale::All(1.0));
    assert!(msg.contains("takes 20 features"), "{msg}");
    assert!(msg.contains("gives 24 (projection_dim)"), "{msg}");
    assert!(msg.contains("image_encoder"), "{msg}");
}

#[test]
fn a_missing_image_encoder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    std::fs::copy(
        h94().join("models/ip-adapter_sd15.safetensors"),
        dir.path().join("models/ip-adapter_sd15.safetensors"),
    )
    .unwrap();
    let source = IpAdapterSource {
        repo: dir.path().to_str().unwrap().into(),
        kind: IpAdapterKind::Plain,
    };
    let mut unet = pipeline_unet();
    let err = IpAdapter::load_source(&source, None, &mut unet, &IpAdapterScale::All(1.0))
        .err()
        .unwrap();
    assert!(matches!(err, IpAdapterError::Files(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("models/image_encoder/config.json"), "{msg}");
    assert!(unet.ip_adapter().is_none());
}

#[test]
fn a_file_that_is_no_ip_adapter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = HashMap::new();
    t.insert(
        "unet.conv_in.weight".to_string(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = write(dir.path(), "other.safetensors", t);
    let msg = load_err(&p, &mut pipeline_unet(), &IpAdapterScale::All(1.0));
    assert!(msg.contains("other.safetensors"), "{msg}");
    assert!(msg.contains("no 'image_proj' tensors"), "{msg}");
    // A .bin that is no pickle is named too.
    let bin = dir.path().join("broken.bin");
    std::fs::write(&bin, b"not a pickle").unwrap();
    let msg = load_err(&bin, &mut pipeline_unet(), &IpAdapterScale::All(1.0));
    assert!(msg.contains("broken.bin"), "{msg}");
}

#[test]
fn per_block_scales_are_checked_against_the_unet() {
    let file = h94().join("models/ip-adapter_sd15.safetensors");
    let bad = IpAdapterScale::parse(r#"{"down": {"block_3": 1.0}}"#).unwrap();
    let msg = load_err(&file, &mut pipeline_unet(), &bad);
    assert!(msg.contains("down.block_3"), "{msg}");
    assert!(msg.contains("block_0, block_1, block_2"), "{msg}");
    let bad = IpAdapterScale::parse(r#"{"up": {"block_1": [1.0, 0.0]}}"#).unwrap();
    let msg = load_err(&file, &mut pipeline_unet(), &bad);
    assert!(
        msg.contains("expected 3 scales for up.block_1, got 2"),
        "{msg}"
    );
    assert!(IpAdapterScale::parse("{\"sideways\": 1}").is_err());
    assert_eq!(
        IpAdapterScale::parse("0.6").unwrap(),
        IpAdapterScale::All(0.6)
    );
}

#[test]
fn per_block_scales_expand_as_diffusers_does() {
    let mut unet = pipeline_unet();
    let file = h94().join("models/ip-adapter_sd15.safetensors");
    let (config, files) = encoder();
    let scale =
        IpAdapterScale::parse(r#"{"down": {"block_2": [0.5, 1.0]}, "up": {"block_1": 0.25}}"#)
            .unwrap();
    IpAdapter::load(&file, &config, &files, None, &mut unet, &scale).unwrap();
    let scales = unet.ip_adapter().unwrap().scales();
    assert_eq!(scales.len(), 16);
    let at = |s: &str| scales[&format!("{s}.transformer_blocks.0.attn2")];
    assert_eq!(at("down_blocks.2.attentions.0"), 0.5);
    assert_eq!(at("down_blocks.2.attentions.1"), 1.0);
    assert_eq!(at("down_blocks.0.attentions.0"), 0.0);
    for j in 0..3 {
        assert_eq!(at(&format!("up_blocks.1.attentions.{j}")), 0.25);
        assert_eq!(at(&format!("up_blocks.2.attentions.{j}")), 0.0);
    }
    assert_eq!(at("mid_block.attentions.0"), 0.0);
}

#[test]
fn the_configs_ip_adapter_sites_are_the_models() {
    // diffusers' numbering (down, up, mid) from the config alone, as the sweep's check reads it,
    // equals the layers' own list; the mid block's layer comes last.
    for unet in [
        pipeline_unet(),
        unet_fixture("model", candle_core::DType::F32),
        unet_fixture("model_v2", candle_core::DType::F32),
    ] {
        let from_layers = unet.ip_adapter_sites().unwrap();
        assert_eq!(unet.config().ip_adapter_sites().unwrap(), from_layers);
        assert!(from_layers.last().unwrap().site.starts_with("mid_block."));
        assert_eq!(from_layers.len(), unet.cross_attention_sites().len());
    }
}
