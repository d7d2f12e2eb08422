//! UNet2DConditionModel for the Stable Diffusion 1.x/2.x block layout, with capture hooks and exact
//! gradients (SPEC §6).
//!
//! A port of diffusers 0.42.1 `models/unets/unet_2d_condition.py` (`UNet2DConditionModel.__init__`
//! and `forward`) restricted to what SD checkpoints use: `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D`, positional timestep embedding.
//! Config fields that select anything else are rejected with [`UNetError::Unsupported`].
//!
//! Legacy `attention_head_dim`: as in diffusers, when `num_attention_heads` is absent the value of
//! `attention_head_dim` is the number of heads of each level (SD 1.x: 8 heads everywhere; SD 2.x:
//! `[5, 10, 20, 20]`), and the head dim is `channels / heads`.
//!
//! Kernels: [`ComputePath`] (default `Auto`: the differentiable path for the whole pass when the
//! sample or the encoder hidden states are in an autograd graph, and for every kernel fed by a
//! trainable weight (`Var`, [`crate::trainable`]) when they are not; the fused kernels otherwise).

mod attention;
mod blocks;
pub(crate) mod ip;
pub(crate) mod nn;
mod resnet;

use crate::hooks::{Hook, NoHook};
pub use crate::ops::ComputePath;
use blocks::{
    AttnLevel, BlockConfig, DownBlock, DownBlockConfig, MidBlock, UpBlock, UpBlockConfig,
};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
pub use ip::{BlockScales, IpAdapterLayers, IpAdapterScale, LevelScales, OneOrList};
use nn::{activate, parse_activation, proceed, Activation, Conv2d, Ctx, GroupNorm, Linear};
use serde::Deserialize;
use std::ops::ControlFlow;
use std::path::PathBuf;

/// Errors of building or loading a UNet; each names the offending field, tensor or file.
#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    #[error(
        "UNet config: {field} = {value} is not supported (Stable Diffusion 1.x/2.x layout only)"
    )]
    Unsupported { field: String, value: String },
    #[error("UNet config: {0}")]
    Invalid(String),
    #[error("UNet weights '{path}' do not match the config '{config}' (expected: the shape the config implies; got: the shape in the file): {source}")]
    Weights {
        path: String,
        config: PathBuf,
        source: Box<candle_core::Error>,
    },
    #[error(transparent)]
    Files(Box<weights::WeightsError>),
}

impl From<weights::WeightsError> for UNetError {
    fn from(e: weights::WeightsError) -> Self {
        UNetError::Files(Box::new(e))
    }
}

/// A value diffusers allows as a scalar or as one entry per down block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The per-level values for `n` levels; a list must have exactly `n` entries.
    pub fn expand(&self, n: usize, field: &str) -> std::result::Result<Vec<T>, UNetError> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(UNetError::Invalid(format!(
                "{field} has {} entries for {n} down blocks",
                v.len()
            ))),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_four() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_three() -> usize {
    3
}
fn d_one_f() -> f64 {
    1.0
}
fn d_down() -> Vec<String> {
    let mut v = vec!["CrossAttnDownBlock2D".to_string(); 3];
    v.push("DownBlock2D".into());
    v
}
fn d_up() -> Vec<String> {
    let mut v = vec!["UpBlock2D".to_string()];
    v.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    v
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_false_each() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_tlayers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

/// The fields of a diffusers `unet/config.json` (defaults as in `UNet2DConditionModel.__init__`).
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_each")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub dropout: f64,
}

impl UNet2DConditionConfig {
    /// Parses a diffusers `config.json` text.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// Rejects any field value that selects something this port does not implement.
    pub fn check(&self) -> std::result::Result<(), UNetError> {
        let unsupported = |field: &str, value: String| {
            Err(UNetError::Unsupported {
                field: field.into(),
                value,
            })
        };
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return unsupported("down_block_types", t.clone());
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return unsupported("up_block_types", t.clone());
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return unsupported("mid_block_type", format!("{:?}", self.mid_block_type));
        }
        let none_or = |v: &Option<String>, field: &str| match v {
            Some(s) => unsupported(field, s.clone()),
            None => Ok(()),
        };
        none_or(&self.class_embed_type, "class_embed_type")?;
        none_or(&self.addition_embed_type, "addition_embed_type")?;
        none_or(&self.encoder_hid_dim_type, "encoder_hid_dim_type")?;
        none_or(&self.cross_attention_norm, "cross_attention_norm")?;
        if let Some(n) = self.num_class_embeds {
            return unsupported("num_class_embeds", n.to_string());
        }
        if let Some(n) = self.encoder_hid_dim {
            return unsupported("encoder_hid_dim", n.to_string());
        }
        if let Some(n) = self.time_cond_proj_dim {
            return unsupported("time_cond_proj_dim", n.to_string());
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", "true".into());
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.clone(),
            );
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", self.time_embedding_type.clone());
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", self.attention_type.clone());
        }
        if self.norm_num_groups.is_none() {
            return unsupported("norm_num_groups", "null".into());
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(UNetError::Invalid(format!(
                "{} block_out_channels, {} down_block_types and {} up_block_types must agree",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            return Err(UNetError::Invalid(format!(
                "conv_in_kernel {} / conv_out_kernel {} must be odd",
                self.conv_in_kernel, self.conv_out_kernel
            )));
        }
        parse_activation(&self.act_fn, "act_fn")?;
        if let Some(a) = &self.time_embedding_act_fn {
            parse_activation(a, "time_embedding_act_fn")?;
        }
        if let Some(a) = &self.timestep_post_act {
            parse_activation(a, "timestep_post_act")?;
        }
        Ok(())
    }

    /// Attention heads per level: `num_attention_heads`, else diffusers' legacy `attention_head_dim`.
    pub fn heads(&self) -> std::result::Result<Vec<usize>, UNetError> {
        let n = self.down_block_types.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }

    /// The cross-attention layers (`attn2`) of the UNet this config builds, in the order an
    /// IP-Adapter file numbers them (`ip_adapter.1`, `.3`, …: diffusers' `attn_processors`, down
    /// blocks, up blocks, then the mid block), each with its width and the width of its context;
    /// read from the config alone, so an adapter can be checked without loading the UNet.
    pub fn ip_adapter_sites(&self) -> std::result::Result<Vec<IpSite>, UNetError> {
        self.check()?;
        let n = self.block_out_channels.len();
        let ch = &self.block_out_channels;
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let tlayers = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let mut out = Vec::new();
        let mut push = |block: String, level: usize, transformers: usize| {
            for j in 0..transformers {
                for k in 0..tlayers[level] {
                    out.push(IpSite {
                        site: format!("{block}.attentions.{j}.transformer_blocks.{k}.attn2"),
                        inner: ch[level],
                        context_dim: cross[level],
                    });
                }
            }
        };
        for (i, kind) in self.down_block_types.iter().enumerate() {
            if kind == "CrossAttnDownBlock2D" {
                push(format!("down_blocks.{i}"), i, layers[i]);
            }
        }
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let level = n - 1 - i;
            if kind == "CrossAttnUpBlock2D" {
                push(format!("up_blocks.{i}"), level, layers[level] + 1);
            }
        }
        push("mid_block".into(), n - 1, 1);
        Ok(out)
    }
}

/// The time embedding MLP, diffusers `TimestepEmbedding` (`linear_1`, act, `linear_2`).
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
    post_act: Option<Activation>,
}

/// The timestep of a forward pass: one for the whole batch (sampling) or one per entry (training).
#[derive(Debug, Clone, Copy)]
enum Timesteps<'a> {
    Shared(f64),
    PerSample(&'a [f64]),
}

/// The SD UNet with capture hooks.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    time_embed_act: Option<Activation>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    path: ComputePath,
    dtype: DType,
    /// An attached IP-Adapter's image branches ([`Self::set_ip_adapter`]).
    ip_adapter: Option<IpAdapterLayers>,
}

/// A cross-attention layer an IP-Adapter adds an image branch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSite {
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    pub site: String,
    /// The layer's width (`to_k_ip`'s output).
    pub inner: usize,
    /// The width of the tokens it attends to (`to_k_ip`'s input).
    pub context_dim: usize,
}

fn build_err(e: UNetError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl UNet2DConditionModel {
    /// Builds the model; `vb` paths are the checkpoint's keys (`down_blocks.0.resnets.0.conv1`).
    pub fn new(cfg: &UNet2DConditionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check().map_err(build_err)?;
        let n = cfg.block_out_channels.len();
        let ch = &cfg.block_out_channels;
        let heads = cfg.heads().map_err(build_err)?;
        let layers = cfg
            .layers_per_block
            .expand(n, "layers_per_block")
            .map_err(build_err)?;
        let cross = cfg
            .cross_attention_dim
            .expand(n, "cross_attention_dim")
            .map_err(build_err)?;
        let tlayers = cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")
            .map_err(build_err)?;
        let only_cross = cfg
            .only_cross_attention
            .expand(n, "only_cross_attention")
            .map_err(build_err)?;
        let act = parse_activation(&cfg.act_fn, "act_fn").map_err(build_err)?;
        let groups = cfg.norm_num_groups.unwrap_or(32);

        let conv_in = Conv2d::new(
            cfg.in_channels,
            ch[0],
            cfg.conv_in_kernel,
            1,
            (cfg.conv_in_kernel - 1) / 2,
            vb.pp("conv_in"),
        )?;
        let temb_dim = cfg.time_embedding_dim.unwrap_or(ch[0] * 4);
        let time_embedding = TimestepEmbedding {
            linear_1: Linear::new(ch[0], temb_dim, true, vb.pp("time_embedding.linear_1"))?,
            linear_2: Linear::new(temb_dim, temb_dim, true, vb.pp("time_embedding.linear_2"))?,
            act,
            post_act: cfg
                .timestep_post_act
                .as_deref()
                .map(|a| parse_activation(a, "timestep_post_act"))
                .transpose()
                .map_err(build_err)?,
        };
        let time_embed_act = cfg
            .time_embedding_act_fn
            .as_deref()
            .map(|a| parse_activation(a, "time_embedding_act_fn"))
            .transpose()
            .map_err(build_err)?;

        // diffusers' get_down_block/get_up_block pass neither resnet_skip_time_act nor
        // resnet_out_scale_factor to these four block types: they keep the defaults.
        let common = BlockConfig {
            temb_channels: temb_dim,
            groups,
            eps: cfg.norm_eps,
            act,
            skip_time_act: false,
            output_scale_factor: 1.0,
            use_linear_projection: cfg.use_linear_projection,
        };
        let attn_level = |i: usize, has: bool, only: bool| {
            has.then(|| AttnLevel {
                heads: heads[i],
                layers: tlayers[i],
                cross_attention_dim: cross[i],
                only_cross_attention: only,
            })
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch[i];
            let site = format!("down_blocks.{i}");
            down_blocks.push(DownBlock::new(
                &DownBlockConfig {
                    in_channels: in_ch,
                    out_channels: out_ch,
                    layers: layers[i],
                    add_downsample: i != n - 1,
                    downsample_padding: cfg.downsample_padding,
                    attn: attn_level(i, kind == "CrossAttnDownBlock2D", only_cross[i]),
                    common: &common,
                },
                &site,
                vb.pp(&site),
            )?);
        }

        let mid_common = BlockConfig {
            output_scale_factor: cfg.mid_block_scale_factor,
            ..common
        };
        let mid_block = MidBlock::new(
            ch[n - 1],
            // UNetMidBlock2DCrossAttn is built without only_cross_attention.
            &attn_level(n - 1, true, false).expect("has attention"),
            &mid_common,
            "mid_block",
            vb.pp("mid_block"),
        )?;
        let common = BlockConfig {
            output_scale_factor: 1.0,
            ..mid_common
        };

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let level = n - 1 - i; // reversed per-level settings
            let site = format!("up_blocks.{i}");
            up_blocks.push(UpBlock::new(
                &UpBlockConfig {
                    in_channels: in_ch,
                    prev_output_channels: prev,
                    out_channels: out_ch,
                    layers: layers[level] + 1,
                    add_upsample: i != n - 1,
                    attn: attn_level(level, kind == "CrossAttnUpBlock2D", only_cross[level]),
                    common: &common,
                },
                &site,
                vb.pp(&site),
            )?);
        }

        let conv_norm_out = GroupNorm::new(groups, ch[0], cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = Conv2d::new(
            ch[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            (cfg.conv_out_kernel - 1) / 2,
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            time_embed_act,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: act,
            conv_out,
            path: ComputePath::Auto,
            dtype: vb.dtype(),
            ip_adapter: None,
        })
    }

    /// Reads `{subfolder}/config.json` and the weights (`diffusion_pytorch_model.safetensors`, or
    /// `.bin`) of a diffusers model. A config that does not match the weights fails with
    /// [`UNetError::Weights`], naming the tensor, both shapes and the file.
    pub fn load(
        source: &weights::ModelSource,
        subfolder: &str,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, UNetError> {
        let join = |f: &str| {
            if subfolder.is_empty() {
                f.to_string()
            } else {
                format!("{subfolder}/{f}")
            }
        };
        let config_path = source.file(&[&join("config.json")])?;
        let cfg: UNet2DConditionConfig = weights::read_json(&config_path)?;
        cfg.check()?;
        let files = source.weight_files(subfolder, &["diffusion_pytorch_model"])?;
        let vb = weights::var_builder(&files, dtype, device)?;
        Self::new(&cfg, vb).map_err(|source| UNetError::Weights {
            path: files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            config: config_path.clone(),
            source: Box::new(source),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.conv_in.device()
    }

    /// Selects the kernels of later forward calls (default [`ComputePath::Auto`]).
    pub fn set_compute_path(&mut self, path: ComputePath) {
        self.path = path;
    }

    pub fn compute_path(&self) -> ComputePath {
        self.path
    }

    /// Attaches an IP-Adapter's image branches (`None` detaches them). While attached, the
    /// encoder hidden states of every call end with the adapter's image tokens (see
    /// [`ip`](crate::unet::IpAdapterLayers)).
    pub fn set_ip_adapter(&mut self, layers: Option<IpAdapterLayers>) {
        self.ip_adapter = layers;
    }

    pub fn ip_adapter(&self) -> Option<&IpAdapterLayers> {
        self.ip_adapter.as_ref()
    }

    /// diffusers' `set_ip_adapter_scale`: one scale for every layer, or per block (blocks left
    /// out of the per-block form get 0). An error names a block that does not exist or a list of
    /// the wrong length; without an attached adapter it is an error too.
    pub fn set_ip_adapter_scale(&mut self, scale: &IpAdapterScale) -> Result<()> {
        let down: Vec<usize> = self
            .down_blocks
            .iter()
            .map(|b| b.transformers().len())
            .collect();
        let up: Vec<usize> = self
            .up_blocks
            .iter()
            .map(|b| b.transformers().len())
            .collect();
        let per_block = scale.expand(&down, &up).map_err(candle_core::Error::Msg)?;
        let Some(ip) = self.ip_adapter.as_mut() else {
            candle_core::bail!("set_ip_adapter_scale: no IP-Adapter is attached to the UNet");
        };
        for (site, layer) in ip.layers.iter_mut() {
            layer.scale = match (&per_block, scale) {
                (None, IpAdapterScale::All(s)) => *s,
                (Some(map), _) => map
                    .iter()
                    .find(|(prefix, _)| site.starts_with(&format!("{prefix}.")))
                    .map(|(_, s)| *s)
                    .unwrap_or(0.0),
                (None, IpAdapterScale::Blocks(_)) => unreachable!("expand gives a map for blocks"),
            };
        }
        Ok(())
    }

    /// The cross-attention layers (`attn2`) an IP-Adapter's file numbers `ip_adapter.1`,
    /// `ip_adapter.3`, …: diffusers' `attn_processors` order, down blocks, up blocks, then the
    /// mid block.
    ///
    /// The same list as [`UNet2DConditionConfig::ip_adapter_sites`], here read from the layers
    /// themselves (a test holds the two equal).
    pub fn ip_adapter_sites(&self) -> Result<Vec<IpSite>> {
        let transformers = self
            .down_blocks
            .iter()
            .flat_map(|b| b.transformers())
            .chain(self.up_blocks.iter().flat_map(|b| b.transformers()))
            .chain(self.mid_block.transformers());
        let mut out = Vec::new();
        for block in transformers.flat_map(|t| t.blocks()) {
            let attn2 = block.attn2();
            let (inner, context_dim) = attn2.key_dims()?;
            out.push(IpSite {
                site: attn2.site().unwrap_or_default().to_string(),
                inner,
                context_dim,
            });
        }
        Ok(out)
    }

    /// The noise prediction, with no hook.
    ///
    /// # Shapes
    /// - `sample`: `[b, in_channels, h, w]`; `encoder_hidden_states`: `[b, tokens, cross_dim]`;
    ///   result: `[b, out_channels, h, w]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(sample, timestep, encoder_hidden_states, &mut NoHook)
    }

    /// The noise prediction; `hook` receives the cross-attention maps and transformer-block outputs
    /// of the sites it asks for, in forward order (down blocks, mid block, up blocks). A hook that
    /// ends the pass early ([`Hook::flow`]) is an error here; use [`Self::forward_until`].
    ///
    /// # Shapes
    /// - `sample`: `[b, in_channels, h, w]`; `encoder_hidden_states`: `[b, tokens, cross_dim]`;
    ///   result: `[b, out_channels, h, w]`.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        hook: &mut dyn Hook,
    ) -> Result<Tensor> {
        match self.forward_until(sample, timestep, encoder_hidden_states, hook)? {
            ControlFlow::Continue(eps) => Ok(eps),
            ControlFlow::Break(()) => candle_core::bail!(
                "the hook ended the UNet forward pass early; call forward_until to allow that"
            ),
        }
    }

    /// [`Self::forward_with`] for a hook that may end the pass early: `Break` as soon as
    /// [`Hook::flow`] says so after a tensor it received (nothing after that site is computed),
    /// else `Continue` with the noise prediction.
    ///
    /// # Shapes
    /// As [`Self::forward_with`].
    pub fn forward_until(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        hook: &mut dyn Hook,
    ) -> Result<ControlFlow<(), Tensor>> {
        self.run(
            sample,
            Timesteps::Shared(timestep),
            encoder_hidden_states,
            hook,
        )
    }

    /// The noise prediction with one timestep per batch entry (training: diffusers'
    /// `unet(noisy, timesteps, encoder_hidden_states)` with a `[b]` timestep tensor).
    ///
    /// # Shapes
    /// - `sample`: `[b, in_channels, h, w]`; `timesteps`: `b` values;
    ///   `encoder_hidden_states`: `[b, tokens, cross_dim]`; result: `[b, out_channels, h, w]`.
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        if timesteps.len() != b {
            candle_core::bail!("{} timesteps for a UNet batch of {b}", timesteps.len());
        }
        match self.run(
            sample,
            Timesteps::PerSample(timesteps),
            encoder_hidden_states,
            &mut NoHook,
        )? {
            ControlFlow::Continue(eps) => Ok(eps),
            ControlFlow::Break(()) => candle_core::bail!("the UNet forward pass ended early"),
        }
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: Timesteps,
        encoder_hidden_states: &Tensor,
        hook: &mut dyn Hook,
    ) -> Result<ControlFlow<(), Tensor>> {
        let cfg = &self.config;
        let (b, c, h, w) = sample.dims4()?;
        if c != cfg.in_channels {
            candle_core::bail!(
                "UNet sample has {c} channels, the config says in_channels = {}",
                cfg.in_channels
            );
        }
        let (eb, _, _) = encoder_hidden_states.dims3()?;
        if eb != b {
            candle_core::bail!("UNet sample batch {b} != encoder_hidden_states batch {eb}");
        }
        let differentiable = self.path.differentiable(&[sample, encoder_hidden_states]);
        let mut ctx = Ctx {
            differentiable,
            auto: self.path == ComputePath::Auto,
            hook,
            ip: self.ip_adapter.as_ref(),
        };

        // forward_upsample_size: when h or w is not a multiple of 2^num_upsamplers, each up block
        // upsamples to the size of the matching skip connection instead of ×2.
        let factor = 1usize << (self.up_blocks.len() - 1);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let sample = if cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };

        let embed = |t: f64, n: usize| {
            crate::ops::timestep_embedding(
                t,
                n,
                self.conv_in_channels(),
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
                sample.dtype(),
                sample.device(),
            )
        };
        let t_emb = match timesteps {
            Timesteps::Shared(t) => embed(t, b)?,
            Timesteps::PerSample(ts) => Tensor::cat(
                &ts.iter()
                    .map(|&t| embed(t, 1))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?,
        };
        let te = &self.time_embedding;
        let mut emb = te.linear_1.forward(&t_emb)?;
        emb = te.linear_2.forward(&activate(te.act, &emb)?)?;
        if let Some(post) = te.post_act {
            emb = activate(post, &emb)?;
        }
        if let Some(act) = self.time_embed_act {
            emb = activate(act, &emb)?;
        }

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, res) = proceed!(block.forward(&xs, &emb, encoder_hidden_states, &mut ctx));
            xs = out;
            skips.extend(res);
        }
        xs = proceed!(self
            .mid_block
            .forward(&xs, &emb, encoder_hidden_states, &mut ctx));

        let n = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let k = block.num_resnets();
            let own = skips.split_off(skips.len() - k);
            let upsample_size = if i != n - 1 && forward_upsample_size {
                let (_, _, sh, sw) = skips[skips.len() - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            xs = proceed!(block.forward(
                &xs,
                &own,
                &emb,
                encoder_hidden_states,
                upsample_size,
                &mut ctx,
            ));
        }

        let xs = self.conv_norm_out.forward_act(&xs, self.conv_act)?;
        Ok(ControlFlow::Continue(self.conv_out.forward(&xs)?))
    }

    fn conv_in_channels(&self) -> usize {
        self.config.block_out_channels[0]
    }

    fn transformers(&self) -> impl Iterator<Item = &attention::Transformer2DModel> {
        self.down_blocks
            .iter()
            .flat_map(|b| b.transformers())
            .chain(self.mid_block.transformers())
            .chain(self.up_blocks.iter().flat_map(|b| b.transformers()))
    }

    /// Every cross-attention site name in forward order, e.g.
    /// `up_blocks.2.attentions.0.transformer_blocks.0.attn2`.
    pub fn cross_attention_sites(&self) -> Vec<String> {
        self.transformers()
            .flat_map(|t| t.blocks())
            .flat_map(|b| b.cross_attention_sites())
            .collect()
    }

    /// Every transformer-block site name in forward order, e.g.
    /// `up_blocks.2.attentions.0.transformer_blocks.0`.
    pub fn transformer_block_sites(&self) -> Vec<String> {
        self.transformers()
            .flat_map(|t| t.blocks())
            .map(|b| b.site().to_string())
            .collect()
    }
}
