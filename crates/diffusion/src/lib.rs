//! Stable Diffusion v1.x in candle (SPEC §6): UNet with capture hooks and exact gradients, VAE,
//! CLIP text encoder and tokenizer, DDIM, and the sampling pipeline.

pub mod ddim;
pub mod noise;
pub mod pipeline;
pub mod text;
pub mod tiny;
pub mod textual_inversion;
pub mod tokenizer;
pub mod vae;
pub mod blip;
pub mod hooks;
pub mod ops;
pub mod unet;
