//! AutoencoderKL against diffusers (fixture: tools/fixtures/sd_pipeline.py).

mod pipeline_support;

use candle_core::{DType, Device};
use diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use pipeline_support::*;

fn load() -> AutoencoderKL {
    let dir = model_dir();
    let cfg: AutoencoderKLConfig = weights::read_json(&dir.join("vae/config.json")).unwrap();
    let vb = weights::var_builder(
        &[dir.join("vae/diffusion_pytorch_model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    AutoencoderKL::new(&cfg, vb).unwrap()
}

#[test]
fn decode_matches_diffusers() {
    let vae = load();
    assert_eq!(vae.config().downsample_factor(), 8);
    let exp = expected();
    let got = vae.decode_latents(&exp["vae_decode_latent"]).unwrap();
    let err = max_abs_diff(&got, &exp["vae_decode_image"]);
    eprintln!("vae decode: max abs diff {err:e}");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn encode_mean_matches_diffusers() {
    let vae = load();
    let exp = expected();
    let u8s = &exp["vae_encode_image_u8"];
    let (_, _, h, w) = u8s.dims4().unwrap();
    let raw: Vec<u8> = u8s
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let img = image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap();
    let x = diffusion::vae::image_to_tensor(&img, &Device::Cpu).unwrap();
    let got = vae.encode_mean(&x).unwrap();
    let err = max_abs_diff(&got, &exp["vae_encode_mean"]);
    eprintln!("vae encode mean: max abs diff {err:e}");
    assert!(err <= 1e-4, "{err}");
}
