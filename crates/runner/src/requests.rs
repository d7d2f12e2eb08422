//! The requests of the three generators from one sampling request (prompt, negative prompt,
//! schedule, size, seed, initial latents): plain Stable Diffusion takes it as it is, Pick-and-Draw
//! and BLIP-Diffusion add what they need. `pnd generate` and the sweep's jobs both build theirs here.

use candle_core::Tensor;
use diffusion::blip::{blip_text_prompt, BlipRequest};
use diffusion::pipeline::SampleRequest;
use guidance::pipeline::PickAndDrawRequest;
use std::path::PathBuf;

/// What Pick-and-Draw adds to a sampling request (see [`PickAndDrawRequest`] for each field).
#[derive(Debug, Clone)]
pub struct Guided {
    pub reference: PathBuf,
    pub class: String,
    pub identifier: Option<String>,
    pub template_prompt: Option<String>,
    pub model_key: String,
    pub cache_dir: PathBuf,
    /// One trace file per image, or none.
    pub trace: Vec<PathBuf>,
}

/// Pick-and-Draw of `sample`'s prompt, schedule and size, from `init` (`[N, 4, h/8, w/8]`, one
/// entry per image).
pub fn pick_and_draw(sample: SampleRequest, init: Tensor, guided: Guided) -> PickAndDrawRequest {
    PickAndDrawRequest {
        prompt: sample.prompt,
        negative_prompt: sample.negative_prompt,
        steps: sample.steps,
        cfg_scale: sample.cfg_scale,
        height: sample.height,
        width: sample.width,
        init,
        reference: guided.reference,
        class: guided.class,
        identifier: guided.identifier,
        template_prompt: guided.template_prompt,
        model_key: guided.model_key,
        cache_dir: guided.cache_dir,
        trace: guided.trace,
    }
}

/// BLIP-Diffusion of `sample` from a reference image of `category`: the prompt loses a leading
/// `a {category}`, which the pipeline prepends itself (see [`blip_text_prompt`]).
pub fn blip(sample: SampleRequest, reference: PathBuf, category: String) -> BlipRequest {
    BlipRequest {
        reference,
        prompt: blip_text_prompt(&sample.prompt, &category),
        subject_category: category,
        target_category: None,
        negative_prompt: sample.negative_prompt,
        steps: sample.steps,
        cfg_scale: sample.cfg_scale,
        height: sample.height,
        width: sample.width,
        seed: sample.seed,
        init_latents: sample.init_latents,
        ..Default::default()
    }
}
