//! Trainable weights for fine-tuning (issue 14): every tensor of a checkpoint as a [`Var`] in a
//! [`VarMap`], under its checkpoint name, and back to a safetensors file that diffusers and
//! transformers read with `from_pretrained`.
//!
//! The UNet and the text encoder are built from a `VarMap` by their usual constructors through
//! [`var_builder`]:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{DType, Device};
//! use diffusion::{trainable, unet::{UNet2DConditionConfig, UNet2DConditionModel}};
//! let dir = std::path::Path::new("model/unet");
//! let cfg: UNet2DConditionConfig = weights::read_json(&dir.join("config.json"))?;
//! let vars = trainable::load_vars(
//!     &[&dir.join("diffusion_pytorch_model.safetensors")],
//!     DType::F32,
//!     &Device::Cpu,
//! )?;
//! let unet = UNet2DConditionModel::new(&cfg, trainable::var_builder(&vars)?)?;
//! // ... optimize vars.all_vars() through unet.forward(..) ...
//! trainable::save_vars(&vars, |_| true, &dir.join("tuned.safetensors"))?;
//! # Ok(()) }
//! ```
//!
//! The model holds the `Var`s themselves (not copies): an optimizer step on `vars.all_vars()` is
//! seen by the next forward call. With trainable weights the UNet's default
//! [`crate::ops::ComputePath::Auto`] runs the differentiable kernels wherever a weight (or an
//! input) is in the graph, so no setting is needed for training.
//!
//! [`var_builder`] is used rather than candle's `VarBuilder::from_varmap`: the latter silently
//! creates a fresh (zero or random) variable for every name the checkpoint lacks, so a config
//! that does not match its weights would build a model with untrained layers instead of failing.
//!
//! Textual Inversion trains one row of the text encoder's token-embedding table and nothing else:
//! build the encoder from a plain `VarBuilder`, and swap in a table computed from a `Var` row with
//! [`crate::text::ClipTextModel::set_token_embedding`].

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Every tensor of the weight files (safetensors, or PyTorch `.bin`), converted to `dtype` on
/// `device`, as a `Var` under its checkpoint name (`down_blocks.0.resnets.0.conv1.weight`,
/// `encoder.layers.0.mlp.fc1.weight`, ...).
///
/// A file that does not exist or cannot be read fails with one error naming it; a name found in
/// two files (a broken shard index) also fails.
pub fn load_vars(
    files: &[&Path],
    dtype: DType,
    device: &Device,
) -> std::result::Result<VarMap, weights::WeightsError> {
    let vm = VarMap::new();
    let mut owner: HashMap<String, PathBuf> = HashMap::new();
    for &path in files {
        if let Err(source) = std::fs::metadata(path) {
            return Err(weights::WeightsError::Io {
                path: path.into(),
                source,
            });
        }
        let read = |source| weights::WeightsError::Read {
            path: path.into(),
            source,
        };
        let tensors = weights::load_tensors(&[path.to_path_buf()], device)?;
        let mut data = vm
            .data()
            .lock()
            .map_err(|_| read(candle_core::Error::Msg("VarMap lock poisoned".into())))?;
        for (name, t) in tensors {
            if let Some(first) = owner.get(&name) {
                return Err(weights::WeightsError::ShardIndex {
                    path: path.into(),
                    reason: format!("tensor '{name}' is also in '{}'", first.display()),
                });
            }
            let var = Var::from_tensor(&t.to_dtype(dtype).map_err(read)?).map_err(read)?;
            owner.insert(name.clone(), path.into());
            data.insert(name, var);
        }
    }
    Ok(vm)
}

/// A `VarBuilder` that hands out the `Var`s of `vm` themselves (so the model built from it trains
/// them), in their dtype and on their device. Unlike `VarBuilder::from_varmap`, a name that `vm`
/// lacks, or a shape, dtype or device other than the model asks for, is an error naming the
/// tensor; nothing is created.
///
/// `vm` must hold at least one variable, all of one dtype and on one device.
pub fn var_builder(vm: &VarMap) -> Result<VarBuilder<'static>> {
    let (dtype, device) = {
        let data = lock(vm)?;
        let mut it = data.values();
        let first = it
            .next()
            .ok_or_else(|| candle_core::Error::Msg("the VarMap holds no variables".into()))?;
        let (dtype, device) = (first.dtype(), first.device().clone());
        if let Some((name, v)) = data
            .iter()
            .find(|(_, v)| v.dtype() != dtype || !v.device().same_device(&device))
        {
            candle_core::bail!(
                "VarMap mixes dtypes or devices: '{name}' is {:?} on {:?}, others {dtype:?} on {device:?}",
                v.dtype(),
                v.device()
            );
        }
        (dtype, device)
    };
    Ok(VarBuilder::from_backend(
        Box::new(Strict(vm.clone())),
        dtype,
        device,
    ))
}

/// Writes the variables whose names pass `keep` to `path` as safetensors: sorted names,
/// contiguous data, each in its variable's dtype, under the checkpoint names (the ones
/// [`load_vars`] read), so diffusers' and transformers' `from_pretrained` read the file back in
/// place of the original weights. Fails when no name passes `keep`.
pub fn save_vars(vm: &VarMap, keep: impl Fn(&str) -> bool, path: &Path) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = lock(vm)?
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, v)| Ok((name.clone(), v.as_tensor().detach().contiguous()?)))
        .collect::<Result<_>>()?;
    if tensors.is_empty() {
        candle_core::bail!(
            "save_vars '{}': no variable name passes the filter",
            path.display()
        );
    }
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    weights::save_safetensors(&tensors, path)
}

fn lock(vm: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    vm.data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))
}

/// The backend of [`var_builder`]: look-ups only, never creation.
struct Strict(VarMap);

impl Strict {
    fn find(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = lock(&self.0)?;
        let var = data.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        if var.dtype() != dtype || !var.device().same_device(dev) {
            candle_core::bail!(
                "variable '{name}' is {:?} on {:?}, the model asks for {dtype:?} on {dev:?}",
                var.dtype(),
                var.device()
            );
        }
        Ok(var.as_tensor().clone())
    }
}

impl SimpleBackend for Strict {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.find(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.find(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        lock(&self.0).is_ok_and(|d| d.contains_key(name))
    }
}
