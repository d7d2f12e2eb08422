//! Real Stable Diffusion 1.5 weights (slow, needs the weights): run with
//! `PND_SD_MODEL=<folder or hub id> cargo test -p diffusion --release --test pipeline_real -- --ignored --nocapture`
//! (default model `stable-diffusion-v1-5/stable-diffusion-v1-5`, from the Hugging Face cache or
//! downloaded). Checks that a real folder (vocab.json + merges.txt tokenizer, PNDM scheduler
//! config read as DDIM, `text_model.` keys) loads and samples to a finite, non-constant image.

use diffusion::pipeline::{LoadOptions, SampleRequest, StableDiffusion};

#[test]
#[ignore = "needs real SD 1.5 weights (several GB) and minutes of CPU"]
fn real_sd15_generates_an_image() {
    let model = std::env::var("PND_SD_MODEL")
        .unwrap_or_else(|_| "stable-diffusion-v1-5/stable-diffusion-v1-5".into());
    let sd = StableDiffusion::load(&model, &LoadOptions::default()).unwrap();
    assert_eq!(sd.ddim(5).unwrap().timesteps(), &[801, 601, 401, 201, 1]);
    let req = SampleRequest {
        prompt: "a photo of a dog in the jungle".into(),
        steps: 10,
        height: 256,
        width: 256,
        seed: 0,
        ..Default::default()
    };
    let z = sd
        .sample(&req, &mut |i, n| eprintln!("step {i}/{n}"))
        .unwrap();
    let img = sd.decode_images(&z).unwrap().remove(0);
    let out = std::env::temp_dir().join("pnd_real_sd15.png");
    img.save(&out).unwrap();
    eprintln!("wrote {}", out.display());
    let distinct: std::collections::HashSet<u8> = img.as_raw().iter().copied().collect();
    assert!(distinct.len() > 50);
}
