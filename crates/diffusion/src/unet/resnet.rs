//! ResnetBlock2D, Downsample2D and Upsample2D as the SD 1.x UNet uses them, ported from diffusers
//! 0.42.1:
//! - `models/resnet.py`: `ResnetBlock2D.forward` (time_embedding_norm "default", no up/down)
//! - `models/downsampling.py`: `Downsample2D.forward` (conv 3×3 stride 2, `padding`; padding 0
//!   pads right/bottom by one first)
//! - `models/upsampling.py`: `Upsample2D.forward` (nearest ×2, or to `output_size`, then conv 3×3)

use super::nn::{activate, Activation, Conv2d, GroupNorm, Linear};
use crate::ops;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub(crate) struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub skip_time_act: bool,
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    skip_time_act: bool,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(cfg: &ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        let conv_shortcut = if i != o {
            Some(Conv2d::new(i, o, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(cfg.groups, i, cfg.eps, vb.pp("norm1"))?,
            conv1: Conv2d::new(i, o, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: Linear::new(cfg.temb_channels, o, true, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(cfg.groups, o, cfg.eps, vb.pp("norm2"))?,
            conv2: Conv2d::new(o, o, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            act: cfg.act,
            skip_time_act: cfg.skip_time_act,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// # Shapes
    /// - `xs`: `[b, in, h, w]`; `temb`: `[b, temb_channels]`; result: `[b, out, h, w]`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_act(xs, self.act)?;
        let h = self.conv1.forward(&h)?;
        let temb = if self.skip_time_act {
            temb.clone()
        } else {
            activate(self.act, temb)?
        };
        let temb = self
            .time_emb_proj
            .forward(&temb)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        // temb does not depend on the latent: a constant for the backward.
        let h = ops::add_constant(&h, &temb)?;
        let h = self.norm2.forward_act(&h, self.act)?;
        let h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D(use_conv=True, name="op")`.
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    /// # Shapes
    /// - `xs`: `[b, c, h, w]`; result: `[b, c, ceil(h/2), ceil(w/2)]` (padding 1).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers `Upsample2D(use_conv=True)`.
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Nearest ×2 (or to `size`), then conv.
    ///
    /// # Shapes
    /// - `xs`: `[b, c, h, w]`; result: `[b, c, 2h, 2w]`, or `[b, c, size.0, size.1]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        size: Option<(usize, usize)>,
        differentiable: bool,
    ) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let up = if differentiable {
            ops::upsample_nearest_to(xs, oh, ow)?
        } else if (oh, ow) == (2 * h, 2 * w) {
            xs.upsample_nearest2d(oh, ow)?
        } else {
            // candle's kernel rounds differently from torch for non-integer ratios.
            ops::upsample_nearest_to(xs, oh, ow)?
        };
        self.conv.forward(&up)
    }
}
