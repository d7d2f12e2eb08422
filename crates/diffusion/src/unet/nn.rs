//! Layers of the UNet with a switch between the differentiable and the fused kernels
//! ([`crate::ops::ComputePath`]). Parameter names are the checkpoint's (`weight`, `bias`).

use crate::hooks::Hook;
use crate::ops;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
pub(crate) use layers::Activation;
use std::ops::ControlFlow;

/// What a forward pass carries down the module tree: the kernel path and the hook.
pub(crate) struct Ctx<'a> {
    /// The whole pass takes the differentiable kernels: [`ops::ComputePath::Differentiable`], or
    /// `Auto` with an input of the forward call in an autograd graph.
    pub differentiable: bool,
    /// The path is `Auto`: a kernel also takes the differentiable path when one of its own
    /// operands is in a graph (a trainable weight, or a value computed from one).
    pub auto: bool,
    pub hook: &'a mut dyn Hook,
    /// The IP-Adapter's image branches, when one is attached to the UNet.
    pub ip: Option<&'a super::ip::IpAdapterLayers>,
}

/// The result of a module's forward pass that a hook may end early: `Break` when the hook asked
/// to stop (the remaining modules are not run).
pub(crate) type Flow<T> = Result<ControlFlow<(), T>>;

/// The value of a [`Flow`], or an early `return Ok(Break(()))` from the enclosing forward when
/// the hook ended the pass.
macro_rules! proceed {
    ($flow:expr) => {
        match $flow? {
            std::ops::ControlFlow::Continue(v) => v,
            std::ops::ControlFlow::Break(()) => return Ok(std::ops::ControlFlow::Break(())),
        }
    };
}
pub(crate) use proceed;

impl Ctx<'_> {
    /// Whether a kernel with these operands takes the differentiable path (see the fields).
    pub fn differentiable(&self, operands: &[&Tensor]) -> bool {
        self.differentiable || (self.auto && operands.iter().any(|t| t.track_op()))
    }

    /// Hands a cross-attention site's probabilities to the hook when it wants them, then asks it
    /// whether to go on.
    pub fn attention(&mut self, site: &str, probs: &Tensor) -> Result<ControlFlow<()>> {
        if !self.hook.wants_attention(site) {
            return Ok(ControlFlow::Continue(()));
        }
        self.hook.attention(site, probs)?;
        Ok(self.hook.flow())
    }

    /// Hands a transformer block's output to the hook when it wants it, then asks it whether to
    /// go on.
    pub fn block_output(&mut self, site: &str, hidden: &Tensor) -> Result<ControlFlow<()>> {
        if !self.hook.wants_block_output(site) {
            return Ok(ControlFlow::Continue(()));
        }
        self.hook.block_output(site, hidden)?;
        Ok(self.hook.flow())
    }
}

/// `torch.nn.Linear`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// # Shapes
    /// - `xs`: `[..., in]`; result: `[..., out]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::linear(xs, &self.weight, self.bias.as_ref())
    }

    /// `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// `torch.nn.Conv2d` (groups 1, dilation 1).
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
        let bias = vb.get(out_ch, "bias")?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    pub fn device(&self) -> &candle_core::Device {
        self.weight.device()
    }

    /// # Shapes
    /// - `xs`: `[b, in, h, w]`; result: `[b, out, h', w']`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::conv2d(
            xs,
            &self.weight,
            Some(&self.bias),
            self.padding,
            self.stride,
        )
    }
}

/// `torch.nn.GroupNorm` (affine).
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!(
                "GroupNorm '{}': {channels} channels do not split into {groups} groups",
                vb.prefix()
            );
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    /// # Shapes
    /// - `xs`: `[b, c, ...]`; result: like `xs`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::group_norm(xs, self.groups, &self.weight, &self.bias, self.eps)
    }

    /// `act(self.forward(xs))`, with GroupNorm + SiLU fused into one pass where it can be
    /// ([`ops::group_norm_silu`]).
    pub fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::Silu => {
                ops::group_norm_silu(xs, self.groups, &self.weight, &self.bias, self.eps)
            }
            _ => activate(act, &self.forward(xs)?),
        }
    }
}

/// `torch.nn.LayerNorm` (affine) over the last dim.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// # Shapes
    /// - `xs`: `[..., dim]`; result: like `xs`.
    pub fn forward(&self, xs: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let differentiable = ctx.differentiable(&[xs, &self.weight, &self.bias]);
        // candle's fused layer norm has no f64 kernel; f64 takes the composition either way.
        if differentiable || xs.dtype() == candle_core::DType::F64 {
            ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

pub(crate) fn softmax_last_dim(xs: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    if ctx.differentiable(&[xs]) {
        ops::softmax_last_dim(xs)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// The activation a diffusers UNet config names (`act_fn`, `time_embedding_act_fn`,
/// `timestep_post_act`): SiLU (`"silu"`, `"swish"`) is the one SD uses and the one supported.
pub(crate) fn parse_activation(
    name: &str,
    field: &str,
) -> std::result::Result<Activation, super::UNetError> {
    match Activation::parse(name) {
        Ok(Activation::Silu) => Ok(Activation::Silu),
        _ => Err(super::UNetError::Unsupported {
            field: field.to_string(),
            value: name.to_string(),
        }),
    }
}

/// `act(xs)` with the exact one-pass CPU backward of [`ops::silu`] for SiLU.
pub(crate) fn activate(act: Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Silu => ops::silu(xs),
        other => candle_core::Module::forward(&other, xs),
    }
}
