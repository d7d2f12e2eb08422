//! Textual Inversion (`pnd train textual-inversion`), as diffusers'
//! `examples/textual_inversion/textual_inversion.py`:
//!
//! - the placeholder token is added to the tokenizer and a new row of the text encoder's token
//!   embeddings, initialized from the `--init-token`'s row, is the only thing trained (the script
//!   optimizes the whole table and restores every other row after each step: the same update);
//! - each sample: an image of the folder (images × `repeats` per epoch, shuffled), PIL bicubic to
//!   `resolution²`, a random flip, a random small-ImageNet template with the token;
//! - latents from the VAE posterior (a sample, not the mean) × `scaling_factor`; ε ~ N(0, 1);
//!   t uniform in `0..num_train_timesteps`; the noisy latents by the model's schedule;
//! - loss: MSE of the UNet's prediction against ε (or v); AdamW (β = 0.9, 0.999, ε = 1e-8,
//!   weight decay 1e-2) at `lr × grad_accum × batch` with `--scale-lr` (the README's default).
//!
//! The result is `{token: [1, dim]}` in safetensors, as the script's `learned_embeds.safetensors`.

use crate::adamw::{AdamW, AdamWConfig};
use crate::data::{ti_augment, ti_pixels, OBJECT_TEMPLATES};
use crate::schedule::{mse, NoiseSchedule};
use crate::train_loop::{MicroBatch, Objective};
use crate::{check_resolution, Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use diffusion::pipeline::{LoadOptions, StableDiffusion};
use diffusion::text::ClipTextModel;
use image::RgbImage;
use std::collections::HashMap;
use std::path::Path;

/// What decides a Textual Inversion run (the script's arguments; defaults are its README's
/// single-GPU example).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TiSettings {
    pub token: String,
    pub init_token: String,
    pub steps: usize,
    pub lr: f64,
    pub scale_lr: bool,
    pub batch: usize,
    pub grad_accum: usize,
    pub resolution: u32,
    pub seed: u64,
    /// Times each image occurs per epoch (`--repeats`, 100).
    pub repeats: usize,
}

impl TiSettings {
    /// The README's example: 3000 steps, lr 5e-4 scaled, batch 1, 4 accumulation steps, 512².
    pub fn new(token: &str, init_token: &str) -> Self {
        Self {
            token: token.into(),
            init_token: init_token.into(),
            steps: 3000,
            lr: 5e-4,
            scale_lr: true,
            batch: 1,
            grad_accum: 4,
            resolution: 512,
            seed: 0,
            repeats: 100,
        }
    }

    /// The learning rate AdamW uses (`--scale_lr`: × accumulation × batch × processes).
    pub fn effective_lr(&self) -> f64 {
        if self.scale_lr {
            self.lr * self.grad_accum as f64 * self.batch as f64
        } else {
            self.lr
        }
    }
}

/// The inputs of a Textual Inversion micro-batch.
pub type TiInputs = crate::train_loop::StepInputs;

/// A Textual Inversion run on one subject.
pub struct TextualInversion {
    sd: StableDiffusion,
    /// The text encoder without the new row; each forward appends the trained row to it.
    base_text: ClipTextModel,
    row: Var,
    token_id: u32,
    images: Vec<RgbImage>,
    schedule: NoiseSchedule,
    settings: TiSettings,
}

impl TextualInversion {
    /// Loads the model, adds the token and reads the images (decoded and resized once); f32.
    pub fn new(model: &str, images: &Path, settings: TiSettings, device: &Device) -> Result<Self> {
        Self::with_precision(model, images, settings, device, DType::F32)
    }

    /// [`Self::new`] with the frozen UNet and VAE in `dtype` (the script's `--mixed_precision`:
    /// they are cast to the weight dtype, the text encoder and its new row stay f32, the loss is
    /// computed in f32).
    pub fn with_precision(
        model: &str,
        images: &Path,
        settings: TiSettings,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        check_resolution(settings.resolution)?;
        let files = crate::data::list_images(images)?;
        let opts = LoadOptions {
            dtype,
            device: device.clone(),
            ..LoadOptions::default()
        };
        let mut sd = crate::load_base(model, &opts)?;
        if dtype != DType::F32 {
            let src = weights::ModelSource::parse(model)
                .map_err(diffusion::pipeline::PipelineError::from)?;
            sd.text_encoder = diffusion::pipeline::load_text_encoder(&src, DType::F32, device)?;
        }
        let schedule = NoiseSchedule::new(&sd.scheduler)?;
        let init = sd.tokenizer.encode(&settings.init_token)?;
        // BOS, the token(s), EOS.
        let pieces = &init.tokens[1..init.len_unpadded() - 1];
        if pieces.len() != 1 {
            return Err(TrainError::InitToken {
                token: settings.init_token.clone(),
                count: pieces.len(),
                pieces: pieces.join(" "),
            });
        }
        let init_id = init.ids[1];
        if let Some(id) = sd.tokenizer.token_to_id(&settings.token) {
            return Err(TrainError::TokenExists {
                token: settings.token.clone(),
                id,
            });
        }
        let token_id = sd.tokenizer.add_token(&settings.token)?;
        let base_text = sd.text_encoder.clone();
        let table = base_text.token_embedding();
        let rows = table.dim(0)?;
        if token_id as usize != rows {
            return Err(diffusion::pipeline::PipelineError::from(
                diffusion::textual_inversion::TextualInversionError::RowMismatch {
                    path: model.into(),
                    token: settings.token.clone(),
                    id: token_id,
                    row: rows as u32,
                },
            )
            .into());
        }
        let row = Var::from_tensor(&table.narrow(0, init_id as usize, 1)?.squeeze(0)?)?;
        let size = settings.resolution;
        let images = crate::data::load_resized(&files, |img| crate::data::ti_resize(img, size))?;
        Ok(Self {
            sd,
            base_text,
            row,
            token_id,
            images,
            schedule,
            settings,
        })
    }

    pub fn settings(&self) -> &TiSettings {
        &self.settings
    }

    pub fn token_id(&self) -> u32 {
        self.token_id
    }

    /// Samples per epoch: images × repeats.
    pub fn dataset_len(&self) -> usize {
        self.images.len() * self.settings.repeats
    }

    /// The optimizer over the new row.
    pub fn optimizer(&self) -> Result<AdamW> {
        Ok(AdamW::new(
            vec![("token_embedding".into(), self.row.clone())],
            AdamWConfig::scripts(self.settings.effective_lr()),
        )?)
    }

    /// The trained vector, `[1, dim]`.
    pub fn learned(&self) -> Result<Tensor> {
        Ok(self.row.as_tensor().unsqueeze(0)?)
    }

    /// Writes `{token: [1, dim]}` (f32) to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        map.insert(
            self.settings.token.clone(),
            self.learned()?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        );
        weights::save_safetensors(&map, path).map_err(|e| TrainError::Write {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// `[c, h, w]` of one entry's latents.
    fn latent_shape(&self) -> [usize; 3] {
        let f = self.sd.vae.config().downsample_factor();
        let r = self.settings.resolution as usize / f;
        [self.sd.unet.config().in_channels, r, r]
    }

    /// Every random draw of a micro-batch.
    pub fn inputs(&self, mb: &MicroBatch) -> Result<TiInputs> {
        let device = self.sd.device();
        let seed = self.settings.seed;
        let mut pixels = Vec::new();
        let mut ids = Vec::new();
        let mut prompts = Vec::new();
        for (&index, &pos) in mb.indices.iter().zip(&mb.positions) {
            let (template, flip) = ti_augment(seed, pos);
            let img = &self.images[index % self.images.len()];
            pixels.push(ti_pixels(img, flip, device)?);
            let prompt = OBJECT_TEMPLATES[template].replace("{}", &self.settings.token);
            let enc = self.sd.tokenizer.encode(&prompt)?;
            ids.push(Tensor::new(enc.ids.as_slice(), device)?);
            prompts.push(prompt);
        }
        Ok(TiInputs::draw(
            &pixels,
            &ids,
            prompts,
            (seed, mb.micro),
            self.latent_shape(),
            self.schedule.num_train_timesteps(),
        )?)
    }

    /// The training loss of fixed inputs, in the graph of the new row.
    pub fn loss_of(&self, x: &TiInputs) -> Result<Tensor> {
        let (latents, noise, noisy) = crate::schedule::noisy_latents(
            &self.sd.vae,
            &self.schedule,
            &x.pixels,
            &x.posterior_noise,
            &x.noise,
            &x.timesteps,
            self.sd.dtype(),
        )?;
        let dtype = self.sd.dtype();
        let ehs = self
            .base_text
            .forward_with_new_token(&x.ids, self.token_id, self.row.as_tensor())?
            .to_dtype(dtype)?;
        let ts: Vec<f64> = x.timesteps.iter().map(|&t| t as f64).collect();
        let pred = self.sd.unet.forward_timesteps(&noisy, &ts, &ehs)?;
        let target = self.schedule.target(&latents, &noise, &x.timesteps)?;
        Ok(mse(&pred, &target)?)
    }

    /// The gradient of [`Self::loss_of`] with respect to the new row.
    pub fn row_grad(&self, loss: &Tensor) -> Result<Tensor> {
        let grads = loss.backward()?;
        grads.get(self.row.as_tensor()).cloned().ok_or_else(|| {
            candle_core::Error::Msg("no gradient reached the token row".into()).into()
        })
    }

    pub fn row(&self) -> &Var {
        &self.row
    }
}

impl Objective for TextualInversion {
    fn loss(&mut self, mb: &MicroBatch) -> candle_core::Result<Tensor> {
        let x = self
            .inputs(mb)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        self.loss_of(&x)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
