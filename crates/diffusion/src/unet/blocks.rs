//! The UNet's down, mid and up blocks, ported from diffusers 0.42.1
//! `models/unets/unet_2d_blocks.py`: `CrossAttnDownBlock2D`, `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D` (their `__init__` and `forward`).

use super::attention::{Transformer2DModel, TransformerConfig};
use super::nn::{proceed, Activation, Ctx, Flow};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use std::ops::ControlFlow;

/// What every block shares (from the UNet config).
pub(crate) struct BlockConfig {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub skip_time_act: bool,
    pub output_scale_factor: f64,
    pub use_linear_projection: bool,
}

/// Per-level attention settings; `None` for a block without cross-attention.
pub(crate) struct AttnLevel {
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub only_cross_attention: bool,
}

impl BlockConfig {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            act: self.act,
            skip_time_act: self.skip_time_act,
            output_scale_factor: self.output_scale_factor,
        }
    }

    fn transformer(&self, channels: usize, attn: &AttnLevel) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads: attn.heads,
            layers: attn.layers,
            cross_attention_dim: attn.cross_attention_dim,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: attn.only_cross_attention,
        }
    }
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

pub(crate) struct DownBlockConfig<'a> {
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    pub add_downsample: bool,
    pub downsample_padding: usize,
    pub attn: Option<AttnLevel>,
    pub common: &'a BlockConfig,
}

impl DownBlock {
    pub fn new(cfg: &DownBlockConfig, site: &str, vb: VarBuilder) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..cfg.layers {
            let in_ch = if i == 0 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                &cfg.common.resnet(in_ch, cfg.out_channels),
                vb.pp(format!("resnets.{i}")),
            )?);
            if let Some(attn) = &cfg.attn {
                attentions.push(Transformer2DModel::new(
                    &cfg.common.transformer(cfg.out_channels, attn),
                    &format!("{site}.attentions.{i}"),
                    vb.pp(format!("attentions.{i}")),
                )?);
            }
        }
        let downsampler = if cfg.add_downsample {
            Some(Downsample2D::new(
                cfg.out_channels,
                cfg.downsample_padding,
                vb.pp("downsamplers.0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    pub fn transformers(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// Returns the output and the skip connections (one per resnet, plus the downsampled output).
    ///
    /// # Shapes
    /// - `xs`: `[b, in, h, w]`; output `[b, out, h/2, w/2]` (or `[b, out, h, w]` without downsampler).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: &mut Ctx,
    ) -> Flow<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = proceed!(attn.forward(&xs, context, ctx));
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(ControlFlow::Continue((xs, skips)))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) × layers.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(
        channels: usize,
        attn: &AttnLevel,
        common: &BlockConfig,
        site: &str,
        vb: VarBuilder,
    ) -> Result<Self> {
        // diffusers' UNetMidBlock2DCrossAttn has num_layers=1 by default (one transformer).
        let mut resnets = vec![ResnetBlock2D::new(
            &common.resnet(channels, channels),
            vb.pp("resnets.0"),
        )?];
        let attentions = vec![Transformer2DModel::new(
            &common.transformer(channels, attn),
            &format!("{site}.attentions.0"),
            vb.pp("attentions.0"),
        )?];
        resnets.push(ResnetBlock2D::new(
            &common.resnet(channels, channels),
            vb.pp("resnets.1"),
        )?);
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn transformers(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// # Shapes
    /// - `xs`: `[b, c, h, w]`; result: like `xs`.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: &mut Ctx,
    ) -> Flow<Tensor> {
        let mut xs = self.resnets[0].forward(xs, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = proceed!(attn.forward(&xs, context, ctx));
            xs = resnet.forward(&xs, temb)?;
        }
        Ok(ControlFlow::Continue(xs))
    }
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

pub(crate) struct UpBlockConfig<'a> {
    pub in_channels: usize,
    pub prev_output_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    pub add_upsample: bool,
    pub attn: Option<AttnLevel>,
    pub common: &'a BlockConfig,
}

impl UpBlock {
    pub fn new(cfg: &UpBlockConfig, site: &str, vb: VarBuilder) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..cfg.layers {
            let skip_ch = if i == cfg.layers - 1 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            let res_in = if i == 0 {
                cfg.prev_output_channels
            } else {
                cfg.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                &cfg.common.resnet(res_in + skip_ch, cfg.out_channels),
                vb.pp(format!("resnets.{i}")),
            )?);
            if let Some(attn) = &cfg.attn {
                attentions.push(Transformer2DModel::new(
                    &cfg.common.transformer(cfg.out_channels, attn),
                    &format!("{site}.attentions.{i}"),
                    vb.pp(format!("attentions.{i}")),
                )?);
            }
        }
        let upsampler = if cfg.add_upsample {
            Some(Upsample2D::new(cfg.out_channels, vb.pp("upsamplers.0"))?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn transformers(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip connections, consumed last-first as diffusers does.
    ///
    /// # Shapes
    /// - `xs`: `[b, prev, h, w]`; result: `[b, out, 2h, 2w]` (or `upsample_size`, or `[b, out, h, w]`
    ///   without upsampler).
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        ctx: &mut Ctx,
    ) -> Flow<Tensor> {
        let mut xs = xs.clone();
        let mut skips = skips.to_vec();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("up block ran out of skips".into()))?;
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = resnet.forward(&xs, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = proceed!(attn.forward(&xs, context, ctx));
            }
        }
        if let Some(up) = &self.upsampler {
            let differentiable = ctx.differentiable(&[&xs]);
            xs = up.forward(&xs, upsample_size, differentiable)?;
        }
        Ok(ControlFlow::Continue(xs))
    }
}
