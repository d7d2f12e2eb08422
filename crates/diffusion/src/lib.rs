//! Stable Diffusion v1.x in candle (SPEC §6): UNet with capture hooks and exact gradients, VAE,
//! CLIP text encoder and tokenizer, DDIM, and the sampling pipeline.

pub mod blip;
pub mod ddim;
pub mod hooks;
pub mod ip_adapter;
pub mod noise;
pub mod ops;
pub mod pipeline;
pub mod text;
pub mod textual_inversion;
pub mod tokenizer;
pub mod trainable;
pub mod unet;
pub mod vae;
