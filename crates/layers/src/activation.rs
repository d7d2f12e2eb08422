//! The activation functions that transformers' `hidden_act` and diffusers' `act_fn` name.

use candle_core::{Module, Result, Tensor};
use serde::Deserialize;

/// An activation by its Hugging Face config name; deserializes from that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// Exact (erf) GELU, transformers' `"gelu"`.
    #[serde(rename = "gelu")]
    Gelu,
    /// `x · σ(1.702 x)`, transformers' `"quick_gelu"` (OpenAI CLIP).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    #[serde(alias = "gelu_new", rename = "gelu_pytorch_tanh")]
    GeluTanh,
    /// `max(x, 0)`, `"relu"`.
    #[serde(rename = "relu")]
    Relu,
    /// `x · σ(x)`, diffusers' `"silu"` (or `"swish"`).
    #[serde(alias = "swish", rename = "silu")]
    Silu,
}

/// A config names an activation this crate does not implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported activation '{name}' (supported: {})", Activation::NAMES.join(", "))]
pub struct UnsupportedActivation {
    pub name: String,
}

impl Activation {
    /// Every config name [`Activation::parse`] accepts.
    pub const NAMES: [&'static str; 7] = [
        "gelu",
        "quick_gelu",
        "gelu_new",
        "gelu_pytorch_tanh",
        "relu",
        "silu",
        "swish",
    ];

    /// The activation a config string names, as serde reads it.
    pub fn parse(name: &str) -> std::result::Result<Self, UnsupportedActivation> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "quick_gelu" => Self::QuickGelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(UnsupportedActivation {
                    name: other.to_string(),
                })
            }
        })
    }

    /// [`Activation::parse`] for a model constructor: the error names the config field at fault.
    pub fn parse_field(name: &str, field: &str) -> Result<Self> {
        Self::parse(name).map_err(|e| candle_core::Error::Msg(format!("{field}: {e}")))
    }
}

impl Module for Activation {
    /// On the CPU (f32/f64, outside autograd) one parallel pass ([`crate::host::activation`], the
    /// same values); elsewhere candle's ops.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if crate::kernels::host_kernels(xs.device())
            && matches!(
                xs.dtype(),
                candle_core::DType::F32 | candle_core::DType::F64
            )
            && !xs.track_op()
        {
            return crate::host::activation(xs, *self);
        }
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_serde_agree_on_every_name() {
        for name in Activation::NAMES {
            let by_serde: Activation = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(Activation::parse(name).unwrap(), by_serde, "{name}");
        }
        let err = Activation::parse("mish").unwrap_err().to_string();
        assert!(
            err.contains("'mish'") && err.contains("quick_gelu"),
            "{err}"
        );
        assert!(serde_json::from_value::<Activation>(serde_json::json!("mish")).is_err());
    }

    #[test]
    fn values_match_their_definitions() {
        let x = Tensor::new(&[-2.0f32, -0.5, 0.0, 0.5, 2.0], &candle_core::Device::Cpu).unwrap();
        let xs: Vec<f32> = x.to_vec1().unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let erf_gelu = |v: f32| 0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2));
        let cases: [(Activation, &dyn Fn(f32) -> f32); 4] = [
            (Activation::QuickGelu, &|v| v * sig(1.702 * v)),
            (Activation::Relu, &|v| v.max(0.0)),
            (Activation::Silu, &|v| v * sig(v)),
            (Activation::Gelu, &erf_gelu),
        ];
        for (act, f) in cases {
            let got: Vec<f32> = act.forward(&x).unwrap().to_vec1().unwrap();
            for (g, &v) in got.iter().zip(&xs) {
                assert!((g - f(v)).abs() < 1e-5, "{act:?}({v}) = {g}, want {}", f(v));
            }
        }
    }

    /// Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7), enough to check the erf GELU.
    fn erf(x: f32) -> f32 {
        let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
        (1.0 - poly * (-x * x).exp()).copysign(x)
    }
}
