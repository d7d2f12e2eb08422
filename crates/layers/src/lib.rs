//! Candle building blocks shared by the metric and diffusion models.

mod activation;
pub mod allocator;
pub mod attention;
pub mod fused;
pub mod host;
pub mod kernels;
pub mod threads;
pub mod vmath;

pub use activation::{Activation, UnsupportedActivation};
