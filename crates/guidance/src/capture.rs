//! Capture hooks (SPEC §6–7): a [`Hook`] that asks the UNet only for the sites Pick-and-Draw
//! needs, and keeps head-averaged token maps and transformer-block outputs of one batch entry
//! (the conditional branch), still in the autograd graph.

use crate::maps::token_maps;
use candle_core::Tensor;
use diffusion::hooks::Hook;
use std::ops::ControlFlow;

/// The attention site (`…attn2`) of a transformer-block site.
pub fn attn2_site(block_site: &str) -> String {
    format!("{block_site}.attn2")
}

/// Keeps, for the batch entry `batch`, the head-averaged maps of `tokens` at the cross-attention
/// sites asked for and the block outputs at the block sites asked for.
#[derive(Debug, Default)]
pub struct SiteCapture {
    pub batch: usize,
    /// Token positions (into the 77 ids) whose maps are kept, in this order.
    pub tokens: Vec<usize>,
    pub attention_sites: Vec<String>,
    pub block_sites: Vec<String>,
    /// `(site, [tokens.len(), hw])` in forward order.
    pub maps: Vec<(String, Tensor)>,
    /// `(site, [hw, channels])` in forward order.
    pub blocks: Vec<(String, Tensor)>,
    /// End the forward pass ([`Hook::flow`] breaks; run it with
    /// [`diffusion::unet::UNet2DConditionModel::forward_until`]) as soon as every requested site
    /// is captured: a loss built from the captures needs nothing after them, so neither the rest
    /// of the forward nor its backward is computed.
    pub stop_when_complete: bool,
}

impl SiteCapture {
    pub fn new(
        batch: usize,
        tokens: Vec<usize>,
        attention_sites: Vec<String>,
        block_sites: Vec<String>,
    ) -> Self {
        SiteCapture {
            batch,
            tokens,
            attention_sites,
            block_sites,
            maps: Vec::new(),
            blocks: Vec::new(),
            stop_when_complete: false,
        }
    }

    /// Whether every requested site has been captured.
    pub fn is_complete(&self) -> bool {
        self.maps.len() >= self.attention_sites.len() && self.blocks.len() >= self.block_sites.len()
    }

    pub fn map(&self, site: &str) -> Option<&Tensor> {
        self.maps.iter().find(|(s, _)| s == site).map(|(_, t)| t)
    }

    pub fn block(&self, site: &str) -> Option<&Tensor> {
        self.blocks.iter().find(|(s, _)| s == site).map(|(_, t)| t)
    }
}

impl Hook for SiteCapture {
    fn wants_attention(&self, site: &str) -> bool {
        self.attention_sites.iter().any(|s| s == site)
    }

    fn attention(&mut self, site: &str, probs: &Tensor) -> candle_core::Result<()> {
        let maps = token_maps(probs, self.batch, &self.tokens)
            .map_err(|e| candle_core::Error::Msg(format!("{site}: {e}")))?;
        self.maps.push((site.to_string(), maps));
        Ok(())
    }

    fn wants_block_output(&self, site: &str) -> bool {
        self.block_sites.iter().any(|s| s == site)
    }

    fn block_output(&mut self, site: &str, hidden: &Tensor) -> candle_core::Result<()> {
        self.blocks.push((
            site.to_string(),
            hidden.narrow(0, self.batch, 1)?.squeeze(0)?,
        ));
        Ok(())
    }

    fn flow(&self) -> ControlFlow<()> {
        if self.stop_when_complete && self.is_complete() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// One [`SiteCapture`] per batch entry of a batched forward pass (a guided batch: entry `i` of
/// the pass is image `i`): each sees every tensor and keeps its own entry's slice; the pass ends
/// when every capture would end it.
#[derive(Debug, Default)]
pub struct BatchCapture {
    pub entries: Vec<SiteCapture>,
}

impl BatchCapture {
    pub fn new(entries: Vec<SiteCapture>) -> Self {
        Self { entries }
    }
}

impl Hook for BatchCapture {
    fn wants_attention(&self, site: &str) -> bool {
        self.entries.iter().any(|c| c.wants_attention(site))
    }

    fn attention(&mut self, site: &str, probs: &Tensor) -> candle_core::Result<()> {
        for c in self.entries.iter_mut().filter(|c| c.wants_attention(site)) {
            c.attention(site, probs)?;
        }
        Ok(())
    }

    fn wants_block_output(&self, site: &str) -> bool {
        self.entries.iter().any(|c| c.wants_block_output(site))
    }

    fn block_output(&mut self, site: &str, hidden: &Tensor) -> candle_core::Result<()> {
        for c in self
            .entries
            .iter_mut()
            .filter(|c| c.wants_block_output(site))
        {
            c.block_output(site, hidden)?;
        }
        Ok(())
    }

    fn flow(&self) -> ControlFlow<()> {
        if self.entries.iter().all(|c| c.flow().is_break()) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}
