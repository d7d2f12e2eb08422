//! IP-Adapter's decoupled cross-attention in the UNet (Ye et al. 2023, "IP-Adapter: Text Compatible
//! Image Prompt Adapter for Text-to-Image Diffusion Models", §3.2): every cross-attention layer
//! `attn2` gains `to_k_ip` / `to_v_ip` and computes
//! `to_out(attn(q, text) + scale · attn(q, image tokens))`.
//!
//! Port of diffusers 0.42.1 `models/attention_processor.py` `IPAdapterAttnProcessor2_0.__call__`
//! (one adapter, no mask: the image branch reuses the text branch's query, heads and
//! `dim_head^-0.5`, is skipped when its scale is 0, and is added before `to_out`),
//! `loaders/unet.py` `_convert_ip_adapter_attn_to_diffusers` (the file's `ip_adapter.{id}.to_k_ip`
//! numbering: `id = 1, 3, 5, …` over the cross-attention layers in `attn_processors` order, which
//! is the modules' registration order: down blocks, up blocks, then the mid block) and
//! `loaders/unet_loader_utils.py` `_maybe_expand_lora_scales_for_one_adapter` (the per-block
//! scales of `set_ip_adapter_scale`).
//!
//! How the image tokens reach the layers: appended to the text tokens of the encoder hidden
//! states, `[b, text + image, dim]` (the original IP-Adapter code's layout), and split off again at
//! each `attn2` by the adapter's token count. Everything that handles the text embeddings
//! (classifier-free batching, guidance, the hooks) keeps working on that one tensor, and the
//! capture hooks see the probabilities of the text branch alone, `[b, heads, hw, text]`, exactly
//! as without the adapter. The image branch's probabilities are not handed to hooks.

use super::nn::Linear;
use candle_core::{Result, Tensor};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The image branch of one cross-attention layer.
#[derive(Debug, Clone)]
pub(crate) struct IpLayer {
    pub to_k_ip: Linear,
    pub to_v_ip: Linear,
    pub scale: f64,
}

/// The image branches of every cross-attention layer, keyed by `attn2` site.
#[derive(Debug, Clone)]
pub struct IpAdapterLayers {
    /// How many image tokens end the encoder hidden states.
    pub(crate) tokens: usize,
    pub(crate) layers: BTreeMap<String, IpLayer>,
}

impl IpAdapterLayers {
    pub(crate) fn new(tokens: usize, layers: BTreeMap<String, IpLayer>) -> Self {
        Self { tokens, layers }
    }

    /// The number of image tokens the encoder hidden states end with.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The scale of each layer, by site.
    pub fn scales(&self) -> BTreeMap<String, f64> {
        self.layers
            .iter()
            .map(|(k, l)| (k.clone(), l.scale))
            .collect()
    }

    pub(crate) fn layer(&self, site: &str) -> Option<&IpLayer> {
        self.layers.get(site)
    }

    /// Splits `[b, text + image, dim]` into the text and the image tokens.
    pub(crate) fn split(&self, context: &Tensor, site: &str) -> Result<(Tensor, Tensor)> {
        let m = context.dim(1)?;
        if m <= self.tokens {
            candle_core::bail!(
                "'{site}': the encoder hidden states have {m} tokens, but the IP-Adapter needs the \
                 text tokens followed by its {} image tokens",
                self.tokens
            );
        }
        let text = m - self.tokens;
        Ok((
            context.narrow(1, 0, text)?,
            context.narrow(1, text, self.tokens)?,
        ))
    }
}

/// `set_ip_adapter_scale`'s argument: one number for every layer, or scales per block as
/// diffusers takes them, e.g. `{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`
/// (InstantStyle); in that form a block or level left out gets 0.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IpAdapterScale {
    All(f64),
    Blocks(BlockScales),
}

impl Default for IpAdapterScale {
    fn default() -> Self {
        IpAdapterScale::All(1.0)
    }
}

/// The per-level form of [`IpAdapterScale`].
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct BlockScales {
    #[serde(default)]
    pub down: Option<LevelScales>,
    #[serde(default)]
    pub mid: Option<OneOrList>,
    #[serde(default)]
    pub up: Option<LevelScales>,
}

/// A level's scales: one number for all its blocks, or `{"block_i": scale or [scale per transformer]}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LevelScales {
    All(f64),
    Blocks(BTreeMap<String, OneOrList>),
}

/// One number, or one per transformer of a block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrList {
    One(f64),
    Each(Vec<f64>),
}

impl IpAdapterScale {
    /// Parses a number (`0.6`) or diffusers' per-block dict as JSON.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if let Ok(v) = text.trim().parse::<f64>() {
            return Ok(IpAdapterScale::All(v));
        }
        serde_json::from_str(text).map_err(|e| {
            format!(
                "IP-Adapter scale '{text}': {e} (expected a number or a JSON object such as \
                 {{\"up\": {{\"block_0\": [0.0, 1.0, 0.0]}}}})"
            )
        })
    }

    /// The scale of each transformer (`down_blocks.1.attentions.0`), given the transformer count
    /// of each down and up block (0 for blocks without attention) and whether there is a mid
    /// block transformer.
    pub(crate) fn expand(
        &self,
        down: &[usize],
        up: &[usize],
    ) -> std::result::Result<Option<BTreeMap<String, f64>>, String> {
        let blocks = match self {
            IpAdapterScale::All(_) => return Ok(None),
            IpAdapterScale::Blocks(b) => b,
        };
        let mut out = BTreeMap::new();
        let mid = match &blocks.mid {
            None => 0.0,
            Some(OneOrList::One(v)) => *v,
            Some(OneOrList::Each(v)) if v.len() == 1 => v[0],
            Some(OneOrList::Each(v)) => {
                return Err(format!("expected 1 scale for mid, got {}", v.len()))
            }
        };
        out.insert("mid_block.attentions.0".to_string(), mid);
        for (name, level, counts) in [("down", &blocks.down, down), ("up", &blocks.up, up)] {
            let with_attn: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
            let map: BTreeMap<String, OneOrList> = match level {
                None => BTreeMap::new(),
                Some(LevelScales::All(v)) => with_attn
                    .iter()
                    .map(|i| (format!("block_{i}"), OneOrList::One(*v)))
                    .collect(),
                Some(LevelScales::Blocks(m)) => m.clone(),
            };
            for key in map.keys() {
                let ok = key
                    .strip_prefix("block_")
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| with_attn.contains(&i));
                if !ok {
                    return Err(format!(
                        "{name}.{key}: no such block with attention (blocks with attention: {})",
                        with_attn
                            .iter()
                            .map(|i| format!("block_{i}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            for &i in &with_attn {
                let n = counts[i];
                let values = match map.get(&format!("block_{i}")) {
                    None => vec![0.0; n],
                    Some(OneOrList::One(v)) => vec![*v; n],
                    Some(OneOrList::Each(v)) if v.len() == 1 => vec![v[0]; n],
                    Some(OneOrList::Each(v)) if v.len() == n => v.clone(),
                    Some(OneOrList::Each(v)) => {
                        return Err(format!(
                            "expected {n} scales for {name}.block_{i}, got {}",
                            v.len()
                        ))
                    }
                };
                for (j, s) in values.into_iter().enumerate() {
                    out.insert(format!("{name}_blocks.{i}.attentions.{j}"), s);
                }
            }
        }
        Ok(Some(out))
    }
}
