//! Candle building blocks shared by the metric and diffusion models.

mod activation;
pub mod allocator;
pub mod host;
pub mod kernels;
pub mod threads;

pub use activation::{Activation, UnsupportedActivation};
