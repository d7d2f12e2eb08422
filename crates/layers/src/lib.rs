//! Candle building blocks shared by the metric and diffusion models.

mod activation;

pub use activation::{Activation, UnsupportedActivation};
