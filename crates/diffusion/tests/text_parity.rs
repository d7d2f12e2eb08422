//! CLIP text encoder against transformers' `CLIPTextModel` (fixture: tools/fixtures/sd_pipeline.py).

mod pipeline_support;

use candle_core::{DType, Device, Tensor};
use diffusion::text::{ClipTextConfig, ClipTextModel};
use diffusion::tokenizer::ClipTokenizer;
use pipeline_support::*;

fn load() -> (ClipTextModel, ClipTokenizer) {
    let dir = model_dir();
    let cfg: ClipTextConfig = weights::read_json(&dir.join("text_encoder/config.json")).unwrap();
    let vb = weights::var_builder(
        &[dir.join("text_encoder/model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let model = ClipTextModel::new(&cfg, vb).unwrap();
    let tok = ClipTokenizer::from_folder(&dir.join("tokenizer")).unwrap();
    (model, tok)
}

fn embed(model: &ClipTextModel, tok: &ClipTokenizer, prompt: &str) -> Tensor {
    let ids = tok.encode(prompt).unwrap().ids;
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&ids).unwrap()
}

#[test]
fn text_embeddings_match_transformers() {
    let (model, tok) = load();
    let exp = expected();
    let prompt = facts()["prompt"].as_str().unwrap().to_string();
    for (p, key) in [
        (prompt.as_str(), "text_embeddings_prompt"),
        ("", "text_embeddings_empty"),
    ] {
        let got = embed(&model, &tok, p);
        let err = max_abs_diff(&got, &exp[key]);
        eprintln!("{key}: max abs diff {err:e}");
        assert!(err <= 1e-4, "{key}: {err}");
    }
}

#[test]
fn pushed_embedding_row_is_used() {
    let (mut model, _) = load();
    let v = Tensor::arange(0f32, 16., &Device::Cpu).unwrap();
    let id = model.push_token_embedding(&v).unwrap();
    assert_eq!(id, 49408);
    let row = model.token_embedding().get(id as usize).unwrap();
    assert_eq!(max_abs_diff(&row, &v), 0.0);
    let bad = Tensor::new(&[[49406u32, 49409]], &Device::Cpu).unwrap();
    assert!(model
        .forward(&bad)
        .unwrap_err()
        .to_string()
        .contains("49409"));
}
