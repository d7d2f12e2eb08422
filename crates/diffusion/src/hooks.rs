//! Capture hooks for the UNet (SPEC §6, "Hooks").
//!
//! A [`Hook`] is asked, site by site, whether it wants a tensor; only then is the tensor handed to
//! it, so nothing is captured (or kept alive) that no hook asked for. The tensors stay in the
//! autograd graph: a loss built from them can be differentiated with respect to the latent.
//! Sites are named as diffusers names the modules:
//! - cross-attention: `up_blocks.2.attentions.0.transformer_blocks.0.attn2`
//! - transformer-block output: `up_blocks.2.attentions.0.transformer_blocks.0`
//!
//! Step boundaries are not inferred here: a sampler that needs them calls its hook explicitly.
//!
//! A hook may end the forward pass early: after each tensor it receives, the UNet asks
//! [`Hook::flow`], and [`ControlFlow::Break`] stops the pass there
//! ([`crate::unet::UNet2DConditionModel::forward_until`] then returns `Break`).

use candle_core::Tensor;
use std::ops::ControlFlow;

/// Receives the tensors of the sites it asks for during a UNet forward pass.
pub trait Hook {
    /// Whether this hook wants the attention probabilities of a cross-attention site,
    /// e.g. `"up_blocks.2.attentions.0.transformer_blocks.0.attn2"`.
    fn wants_attention(&self, _site: &str) -> bool {
        false
    }

    /// The attention probabilities of a cross-attention site, still in the autograd graph.
    ///
    /// # Shapes
    /// - `probs`: `[batch, heads, hw, tokens]` (softmax over `tokens`).
    fn attention(&mut self, _site: &str, _probs: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }

    /// Whether this hook wants the output of a BasicTransformerBlock,
    /// e.g. `"up_blocks.2.attentions.0.transformer_blocks.0"`.
    fn wants_block_output(&self, _site: &str) -> bool {
        false
    }

    /// The output of a BasicTransformerBlock (after its feed-forward residual, before the
    /// Transformer2D `proj_out`), still in the autograd graph.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, hw, channels]`.
    fn block_output(&mut self, _site: &str, _hidden: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }

    /// Asked after each tensor handed to this hook: `Continue` (the default) goes on with the
    /// forward pass, `Break` ends it there, so nothing after that site is computed (nor, for a
    /// loss built from the captured tensors, differentiated).
    fn flow(&self) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// The hook that wants nothing; [`crate::unet::UNet2DConditionModel::forward`] uses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl Hook for NoHook {}

/// Which sites of one kind a [`Recorder`] keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Select {
    #[default]
    Nothing,
    All,
    Only(Vec<String>),
}

impl Select {
    pub fn contains(&self, site: &str) -> bool {
        match self {
            Select::Nothing => false,
            Select::All => true,
            Select::Only(sites) => sites.iter().any(|s| s == site),
        }
    }
}

/// A hook that keeps the tensors of the selected sites, by site name, in forward order.
#[derive(Debug, Default)]
pub struct Recorder {
    pub attention_sites: Select,
    pub block_sites: Select,
    pub attention: Vec<(String, Tensor)>,
    pub blocks: Vec<(String, Tensor)>,
}

impl Recorder {
    /// Keeps every cross-attention map and every block output.
    pub fn all() -> Self {
        Self {
            attention_sites: Select::All,
            block_sites: Select::All,
            ..Self::default()
        }
    }

    /// Keeps exactly the given sites (an empty list keeps nothing of that kind).
    pub fn sites(attention: &[String], blocks: &[String]) -> Self {
        Self {
            attention_sites: Select::Only(attention.to_vec()),
            block_sites: Select::Only(blocks.to_vec()),
            ..Self::default()
        }
    }

    /// The kept attention map of `site`, if any.
    pub fn attention_map(&self, site: &str) -> Option<&Tensor> {
        self.attention
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, t)| t)
    }

    /// The kept block output of `site`, if any.
    pub fn block_output(&self, site: &str) -> Option<&Tensor> {
        self.blocks.iter().find(|(s, _)| s == site).map(|(_, t)| t)
    }
}

impl Hook for Recorder {
    fn wants_attention(&self, site: &str) -> bool {
        self.attention_sites.contains(site)
    }

    fn attention(&mut self, site: &str, probs: &Tensor) -> candle_core::Result<()> {
        self.attention.push((site.to_string(), probs.clone()));
        Ok(())
    }

    fn wants_block_output(&self, site: &str) -> bool {
        self.block_sites.contains(site)
    }

    fn block_output(&mut self, site: &str, hidden: &Tensor) -> candle_core::Result<()> {
        self.blocks.push((site.to_string(), hidden.clone()));
        Ok(())
    }
}
