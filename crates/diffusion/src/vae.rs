//! AutoencoderKL of Stable Diffusion (SPEC §6): encoder to the posterior mean (inversion, SPEC §7)
//! and decoder, configured from `vae/config.json`.
//!
//! Port of diffusers 0.42.1 `models/autoencoders/autoencoder_kl.py` (`AutoencoderKL.encode`,
//! `decode`), `models/autoencoders/vae.py` (`Encoder`, `Decoder`), `models/unets/unet_2d_blocks.py`
//! (`DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D`), `models/resnet.py`
//! (`ResnetBlock2D`), `models/downsampling.py` (`Downsample2D`: pad (0,1,0,1) then stride-2 conv),
//! `models/upsampling.py` (`Upsample2D`: nearest ×2 then conv) and the single-head mid-block
//! `Attention` (`AttnProcessor2_0`). Inference only (no gradients are taken through the VAE).
//!
//! Pixel conventions follow diffusers' `VaeImageProcessor`: encoder input = u8 / 127.5 − 1;
//! decoded image = round(clamp(x / 2 + 0.5, 0, 1) · 255) (numpy rounds half to even).

use crate::unet::nn::{Conv2d, GroupNorm};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};
use layers::Activation;
use serde::Deserialize;

fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_1() -> usize {
    1
}
fn d_32() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_scale() -> f64 {
    0.18215
}
fn d_silu() -> String {
    "silu".into()
}
fn d_boc() -> Vec<usize> {
    vec![64]
}

/// `vae/config.json` with diffusers' `AutoencoderKL` defaults for absent keys.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl AutoencoderKLConfig {
    fn validate(&self) -> Result<()> {
        if self.act_fn != "silu" {
            candle_core::bail!("vae config: unsupported act_fn '{}' (silu)", self.act_fn);
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                candle_core::bail!("vae config: unsupported down block '{t}' (DownEncoderBlock2D)");
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                candle_core::bail!("vae config: unsupported up block '{t}' (UpDecoderBlock2D)");
            }
        }
        if self.block_out_channels.is_empty() {
            candle_core::bail!("vae config: block_out_channels is empty");
        }
        if let Some(bad) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            candle_core::bail!(
                "vae config: block_out_channels {bad} is not divisible by norm_num_groups {}",
                self.norm_num_groups
            );
        }
        Ok(())
    }

    /// Spatial down-sampling factor between pixels and latents (8 for SD).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

const EPS: f64 = 1e-6;

// The UNet's layers: on the CPU they run our parallel kernels (`layers::host`).
fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(cin, cout, 3, 1, 1, vb)
}

fn conv1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(cin, cout, 1, 1, 0, vb)
}

fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(groups, channels, eps, vb)
}

/// `ResnetBlock2D` without time embedding.
#[derive(Debug, Clone)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(groups, cin, EPS, vb.pp("norm1"))?,
            conv1: conv3(cin, cout, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, EPS, vb.pp("norm2"))?,
            conv2: conv3(cout, cout, vb.pp("conv2"))?,
            conv_shortcut: if cin != cout {
                Some(conv1(cin, cout, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .forward(&self.norm1.forward_act(xs, Activation::Silu)?)?;
        let h = self
            .conv2
            .forward(&self.norm2.forward_act(&h, Activation::Silu)?)?;
        match &self.conv_shortcut {
            Some(c) => c.forward(xs)? + h,
            None => xs + h,
        }
    }
}

/// The mid block's single-head spatial self-attention with residual.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

/// A linear layer stored either as `[out, in]` or as a legacy 1×1 conv `[out, in, 1, 1]`.
fn linear_or_conv(c: usize, vb: VarBuilder) -> Result<Linear> {
    if vb.contains_tensor("weight") {
        if let Ok(w) = vb.get((c, c, 1, 1), "weight") {
            return Ok(Linear::new(w.reshape((c, c))?, Some(vb.get(c, "bias")?)));
        }
    }
    linear(c, c, vb)
}

impl VaeAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        // Checkpoints converted before diffusers 0.14 name these query/key/value/proj_attn.
        let (q, k, v, o) =
            if vb.contains_tensor("to_q.weight") || !vb.contains_tensor("query.weight") {
                ("to_q", "to_k", "to_v", "to_out.0")
            } else {
                ("query", "key", "value", "proj_attn")
            };
        Ok(Self {
            group_norm: group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            to_q: linear_or_conv(c, vb.pp(q))?,
            to_k: linear_or_conv(c, vb.pp(k))?,
            to_v: linear_or_conv(c, vb.pp(v))?,
            to_out: linear_or_conv(c, vb.pp(o))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let hs = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&hs)?;
        let k = self.to_k.forward(&hs)?;
        let v = self.to_v.forward(&hs)?;
        let scores = (q.matmul(&k.t()?)? * (c as f64).powf(-0.5))?;
        // The fused kernel has no f64 version; the composed softmax is used for f64.
        let probs = if scores.dtype() == DType::F64 {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let out = self.to_out.forward(&probs.matmul(&v)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl MidBlock {
    fn new(c: usize, groups: usize, add_attention: bool, vb: VarBuilder) -> Result<Self> {
        let r = vb.pp("resnets");
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(c, c, groups, r.pp("0"))?,
                ResnetBlock2D::new(c, c, groups, r.pp("1"))?,
            ],
            attention: if add_attention {
                Some(VaeAttention::new(c, groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs)?;
        }
        self.resnets[1].forward(&xs)
    }
}

#[derive(Debug, Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// `n` resnets under `vb`'s `resnets.{j}`: the first from `cin` channels to `cout`, the others
/// `cout` to `cout`.
fn resnet_stack(
    cin: usize,
    cout: usize,
    n: usize,
    groups: usize,
    vb: &VarBuilder,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|j| {
            let cin = if j == 0 { cin } else { cout };
            ResnetBlock2D::new(cin, cout, groups, vb.pp(format!("resnets.{j}")))
        })
        .collect()
}

impl Encoder {
    fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = conv3(cfg.in_channels, boc[0], vb.pp("conv_in"))?;
        let mut down_blocks = Vec::new();
        let mut cout = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let cin = cout;
            cout = c;
            let b = vb.pp(format!("down_blocks.{i}"));
            let resnets = resnet_stack(cin, cout, cfg.layers_per_block, g, &b)?;
            let downsample = if i + 1 < boc.len() {
                Some(Conv2d::new(
                    cout,
                    cout,
                    3,
                    2,
                    0,
                    b.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            down_blocks.push(EncoderBlock {
                resnets,
                downsample,
            });
        }
        let last = *boc.last().expect("validated non-empty");
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(last, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(g, last, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3(last, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                xs = r.forward(&xs)?;
            }
            if let Some(d) = &block.downsample {
                // Downsample2D with padding 0: pad right and bottom by one, then stride-2 conv.
                xs = d.forward(&xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                    D::Minus2,
                    0,
                    1,
                )?)?;
            }
        }
        let xs = self.mid_block.forward(&xs)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward_act(&xs, Activation::Silu)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let conv_in = conv3(cfg.latent_channels, rev[0], vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(rev[0], g, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::new();
        let mut cout = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let cin = cout;
            cout = c;
            let b = vb.pp(format!("up_blocks.{i}"));
            let resnets = resnet_stack(cin, cout, cfg.layers_per_block + 1, g, &b)?;
            let upsample = if i + 1 < rev.len() {
                Some(conv3(cout, cout, b.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsample });
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(g, cout, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3(cout, cfg.out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                xs = r.forward(&xs)?;
            }
            if let Some(u) = &block.upsample {
                let (_, _, h, w) = xs.dims4()?;
                xs = u.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_act(&xs, Activation::Silu)?)
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: AutoencoderKLConfig,
}

impl AutoencoderKL {
    pub fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(conv1(2 * l, 2 * l, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv1(l, l, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.cfg
    }

    /// The mean of the posterior (`encode(x).latent_dist.mean`), unscaled.
    ///
    /// # Shapes
    /// `image`: `[b, in_channels, H, W]` in [-1, 1]; output `[b, latent_channels, H/8, W/8]`.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        Ok(self.encode_moments(image)?.0)
    }

    /// The posterior's mean and its log-variance clamped to [-30, 20], unscaled, as diffusers'
    /// `DiagonalGaussianDistribution` holds them.
    ///
    /// # Shapes
    /// `image`: `[b, in_channels, H, W]` in [-1, 1]; each output `[b, latent_channels, H/8, W/8]`.
    pub fn encode_moments(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&moments)?,
            None => moments,
        };
        let c = self.cfg.latent_channels;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok((moments.narrow(1, 0, c)?, logvar))
    }

    /// A sample of the posterior, `mean + exp(logvar / 2) * noise` (diffusers'
    /// `latent_dist.sample()` with `noise` as its `randn`), unscaled.
    ///
    /// # Shapes
    /// `image`: `[b, in_channels, H, W]`; `noise`, output: `[b, latent_channels, H/8, W/8]`.
    pub fn encode_sample(&self, image: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (mean, logvar) = self.encode_moments(image)?;
        let std = (logvar * 0.5)?.exp()?;
        mean + std.mul(&noise.to_dtype(std.dtype())?)?
    }

    /// Decodes unscaled latents (`decode(z).sample`).
    ///
    /// # Shapes
    /// `z`: `[b, latent_channels, h, w]`; output `[b, out_channels, 8h, 8w]` in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Scaled latents of an image, as SD's diffusion space holds them:
    /// `(mean − shift_factor) · scaling_factor` (SPEC §7 reference encoding).
    ///
    /// # Shapes
    /// `image`: `[b, 3, H, W]` in [-1, 1]; output `[b, 4, H/8, W/8]`.
    pub fn encode_latents(&self, image: &Tensor) -> Result<Tensor> {
        let mean = self.encode_mean(image)?;
        let mean = match self.cfg.shift_factor {
            Some(s) => (mean - s)?,
            None => mean,
        };
        mean * self.cfg.scaling_factor
    }

    /// Decodes scaled diffusion latents: `decode(z / scaling_factor + shift_factor)`.
    ///
    /// # Shapes
    /// `latents`: `[b, 4, h, w]`; output `[b, 3, 8h, 8w]`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.cfg.scaling_factor)?;
        let z = match self.cfg.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        };
        self.decode(&z)
    }
}

/// An RGB image as the VAE's input: u8 / 127.5 − 1.
///
/// # Shapes
/// Output `[1, 3, height, width]` (f32).
pub fn image_to_tensor(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data = img.as_raw().clone();
    Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(DType::F32)?
        .affine(1.0 / 127.5, -1.0)
}

/// A decoded image tensor as 8-bit RGB images, as diffusers' `postprocess(output_type="pil")`:
/// round(clamp(x · 0.5 + 0.5, 0, 1) · 255), rounding half to even like numpy.
///
/// # Shapes
/// `x`: `[b, 3, H, W]`; one image per batch entry.
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        candle_core::bail!("expected 3 image channels, got {c}");
    }
    let x = x
        .to_dtype(DType::F32)?
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let all: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| {
            let bytes: Vec<u8> = all[i * per..(i + 1) * per]
                .iter()
                .map(|v| v.round_ties_even() as u8)
                .collect();
            image::RgbImage::from_raw(w as u32, h as u32, bytes).expect("sized buffer")
        })
        .collect())
}
