//! DreamBooth (`pnd train dreambooth`), as diffusers' `examples/dreambooth/train_dreambooth.py`:
//!
//! - the UNet (and with `train_text_encoder` the text encoder) is trained in full, f32 master
//!   weights; the VAE is frozen;
//! - each sample: an instance image, torchvision `Resize(resolution, BILINEAR)` then
//!   `RandomCrop(resolution)`, `ToTensor`, `Normalize(0.5, 0.5)`, with the instance prompt; with
//!   prior preservation also a class image (the dataset's `index % num_class_images`) with the
//!   class prompt, stacked after the instances of the micro-batch;
//! - the dataset length is the number of instance images, or `max(class, instance)` with prior
//!   preservation; shuffled every epoch;
//! - latents from the VAE posterior (a sample) × `scaling_factor`, ε ~ N(0, 1), t uniform per
//!   entry, MSE against ε (or v); with prior preservation `loss = mse(instance half) +
//!   prior_loss_weight · mse(class half)`;
//! - gradients clipped to norm 1 (`--max_grad_norm`), AdamW (β = 0.9, 0.999, ε = 1e-8, weight
//!   decay 1e-2) at lr 5e-6, constant.
//!
//! Class images are made once by the base model with our own sampler (50 DDIM steps, guidance
//! 7.5, seeds 0, 1, ...) and cached in a folder per class prompt and model
//! ([`ensure_class_images`]).

use crate::adamw::{AdamW, AdamWConfig};
use crate::data::{dreambooth_pixels, dreambooth_resize, random_crop};
use crate::schedule::{mse, NoiseSchedule};
use crate::train_loop::{MicroBatch, Objective};
use crate::{check_resolution, Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use diffusion::ddim::DdimConfig;
use diffusion::pipeline::{SampleRequest, StableDiffusion};
use diffusion::text::{ClipTextConfig, ClipTextModel};
use diffusion::tokenizer::ClipTokenizer;
use diffusion::trainable;
use diffusion::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffusion::vae::AutoencoderKL;
use image::RgbImage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What decides a DreamBooth run (the script's arguments; defaults are its README's example with
/// prior preservation: 800 steps at lr 5e-6, batch 1, 200 class images).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DbSettings {
    pub instance_prompt: String,
    pub class_prompt: Option<String>,
    pub prior_preservation: bool,
    pub class_images: usize,
    pub prior_loss_weight: f64,
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub grad_accum: usize,
    pub train_text_encoder: bool,
    pub resolution: u32,
    pub seed: u64,
    pub max_grad_norm: f64,
}

impl DbSettings {
    pub fn new(instance_prompt: &str) -> Self {
        Self {
            instance_prompt: instance_prompt.into(),
            class_prompt: None,
            prior_preservation: false,
            class_images: 200,
            prior_loss_weight: 1.0,
            steps: 800,
            lr: 5e-6,
            batch: 1,
            grad_accum: 1,
            train_text_encoder: false,
            resolution: 512,
            seed: 0,
            max_grad_norm: 1.0,
        }
    }
}

/// The inputs of a DreamBooth micro-batch (instances first, then classes).
pub type DbInputs = crate::train_loop::StepInputs;

/// A DreamBooth run on one subject.
pub struct DreamBooth {
    vae: AutoencoderKL,
    /// The frozen text encoder (in the compute dtype), when the text encoder is not trained.
    text_encoder: ClipTextModel,
    tokenizer: ClipTokenizer,
    unet_vars: VarMap,
    unet_config: PathBuf,
    unet_cfg: UNet2DConditionConfig,
    /// The UNet over the f32 master weights themselves (f32 compute).
    unet: UNet2DConditionModel,
    text: Option<TrainableText>,
    instances: Vec<RgbImage>,
    classes: Vec<RgbImage>,
    schedule: NoiseSchedule,
    settings: DbSettings,
    device: Device,
    dtype: DType,
}

struct TrainableText {
    vars: VarMap,
    config_path: PathBuf,
    config: ClipTextConfig,
    model: ClipTextModel,
}

fn tensor_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Tensor(Box::new(candle_core::Error::Msg(e.to_string())))
}

impl DreamBooth {
    /// Loads the model with a trainable UNet (and text encoder), and reads the images
    /// (`class_dir` is required with prior preservation); f32.
    pub fn new(
        model: &str,
        images: &Path,
        class_dir: Option<&Path>,
        settings: DbSettings,
        device: &Device,
    ) -> Result<Self> {
        Self::with_precision(model, images, class_dir, settings, device, DType::F32)
    }

    /// [`Self::new`] computing in `dtype`: the trained weights stay f32 (the optimizer's master
    /// copy) and are cast to `dtype` for every forward, the VAE and a frozen text encoder are
    /// held in `dtype`, the loss is computed in f32.
    pub fn with_precision(
        model: &str,
        images: &Path,
        class_dir: Option<&Path>,
        settings: DbSettings,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        use diffusion::pipeline::PipelineError;
        check_resolution(settings.resolution)?;
        let files = crate::data::list_images(images)?;
        let src = weights::ModelSource::parse(model).map_err(PipelineError::from)?;
        let sched_file = crate::scheduler_file(&src, model)?;
        let scheduler: DdimConfig = weights::read_json(&sched_file).map_err(PipelineError::from)?;
        let schedule = NoiseSchedule::new(&scheduler)?;
        let vae = diffusion::pipeline::load_vae(&src, dtype, device)?;
        let text_encoder = diffusion::pipeline::load_text_encoder(&src, dtype, device)?;
        let tokenizer = ClipTokenizer::from_source(&src, "tokenizer")?;
        let component = |dir: &str, stems: &[&str]| -> Result<(PathBuf, VarMap)> {
            let cfg = src
                .file(&[&format!("{dir}/config.json")])
                .map_err(PipelineError::from)?;
            let files = src.weight_files(dir, stems).map_err(PipelineError::from)?;
            let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
            let vars =
                trainable::load_vars(&refs, DType::F32, device).map_err(PipelineError::from)?;
            Ok((cfg, vars))
        };
        let (unet_config, unet_vars) = component("unet", &["diffusion_pytorch_model"])?;
        let unet_cfg: UNet2DConditionConfig =
            weights::read_json(&unet_config).map_err(PipelineError::from)?;
        let unet = UNet2DConditionModel::new(&unet_cfg, trainable::var_builder(&unet_vars)?)?;
        let text = if settings.train_text_encoder {
            let (config_path, vars) = component("text_encoder", &["model", "pytorch_model"])?;
            let config: ClipTextConfig =
                weights::read_json(&config_path).map_err(PipelineError::from)?;
            let model = ClipTextModel::new(&config, trainable::var_builder(&vars)?)?;
            Some(TrainableText {
                vars,
                config_path,
                config,
                model,
            })
        } else {
            None
        };
        let size = settings.resolution;
        let instances = crate::data::load_resized(&files, |i| dreambooth_resize(i, size))?;
        let classes = if settings.prior_preservation {
            let dir = class_dir.ok_or_else(|| TrainError::Images {
                dir: PathBuf::from("<class images>"),
                reason: "prior preservation needs class images".into(),
            })?;
            let mut files = crate::data::list_images(dir)?;
            // The script uses min(class images in the folder, --num_class_images).
            files.truncate(settings.class_images);
            crate::data::load_resized(&files, |i| dreambooth_resize(i, size))?
        } else {
            Vec::new()
        };
        Ok(Self {
            vae,
            text_encoder,
            tokenizer,
            unet_vars,
            unet_config,
            unet_cfg,
            unet,
            text,
            instances,
            classes,
            schedule,
            settings,
            device: device.clone(),
            dtype,
        })
    }

    pub fn settings(&self) -> &DbSettings {
        &self.settings
    }

    /// Samples per epoch: instances, or `max(classes, instances)` with prior preservation.
    pub fn dataset_len(&self) -> usize {
        if self.settings.prior_preservation {
            self.instances.len().max(self.classes.len())
        } else {
            self.instances.len()
        }
    }

    /// Named trainable parameters: `unet.<name>` (and `text.<name>`), sorted.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let mut add = |prefix: &str, vm: &VarMap| {
            let data = vm.data().lock().expect("VarMap lock");
            let mut named: Vec<(String, Var)> = data
                .iter()
                .map(|(k, v)| (format!("{prefix}.{k}"), v.clone()))
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            out.extend(named);
        };
        add("unet", &self.unet_vars);
        if let Some(t) = &self.text {
            add("text", &t.vars);
        }
        out
    }

    /// The optimizer over [`Self::params`].
    pub fn optimizer(&self) -> Result<AdamW> {
        Ok(AdamW::new(
            self.params(),
            AdamWConfig::scripts(self.settings.lr),
        )?)
    }

    /// `[c, h, w]` of one entry's latents.
    fn latent_shape(&self) -> [usize; 3] {
        let f = self.vae.config().downsample_factor();
        let r = self.settings.resolution as usize / f;
        [self.unet_cfg.in_channels, r, r]
    }

    fn ids(&self, prompt: &str) -> Result<Tensor> {
        let enc = self.tokenizer.encode(prompt)?;
        Ok(Tensor::new(enc.ids.as_slice(), &self.device)?)
    }

    /// Every random draw of a micro-batch.
    pub fn inputs(&self, mb: &MicroBatch) -> Result<DbInputs> {
        let device = &self.device;
        let (seed, size) = (self.settings.seed, self.settings.resolution);
        let mut pixels = Vec::new();
        let mut ids = Vec::new();
        let mut prompts = Vec::new();
        let crop = |img: &RgbImage, pos: u64, salt: u64| -> Result<Tensor> {
            let at = random_crop(seed, pos, salt, img.dimensions(), size);
            Ok(dreambooth_pixels(img, size, at, device)?)
        };
        for (&i, &pos) in mb.indices.iter().zip(&mb.positions) {
            pixels.push(crop(&self.instances[i % self.instances.len()], pos, 0)?);
            ids.push(self.ids(&self.settings.instance_prompt)?);
            prompts.push(self.settings.instance_prompt.clone());
        }
        if self.settings.prior_preservation {
            let prompt = self.settings.class_prompt.clone().unwrap_or_default();
            for (&i, &pos) in mb.indices.iter().zip(&mb.positions) {
                pixels.push(crop(&self.classes[i % self.classes.len()], pos, 1)?);
                ids.push(self.ids(&prompt)?);
                prompts.push(prompt.clone());
            }
        }
        Ok(DbInputs::draw(
            &pixels,
            &ids,
            prompts,
            (seed, mb.micro),
            self.latent_shape(),
            self.schedule.num_train_timesteps(),
        )?)
    }

    /// A `VarBuilder` over `vars` cast to the compute dtype (the casts keep the graph, so the
    /// gradients reach the f32 master weights).
    fn cast(&self, vars: &VarMap) -> Result<VarBuilder<'static>> {
        let data = vars.data().lock().expect("VarMap lock");
        let mut map = HashMap::new();
        for (k, v) in data.iter() {
            map.insert(k.clone(), v.as_tensor().to_dtype(self.dtype)?);
        }
        Ok(VarBuilder::from_tensors(map, self.dtype, &self.device))
    }

    /// The training loss of fixed inputs, in the graph of the trainable weights.
    pub fn loss_of(&self, x: &DbInputs) -> Result<Tensor> {
        let dtype = self.dtype;
        let (latents, noise, noisy) = crate::schedule::noisy_latents(
            &self.vae,
            &self.schedule,
            &x.pixels,
            &x.posterior_noise,
            &x.noise,
            &x.timesteps,
            dtype,
        )?;
        let ehs = match &self.text {
            Some(t) if dtype == DType::F32 => t.model.forward(&x.ids)?,
            Some(t) => ClipTextModel::new(&t.config, self.cast(&t.vars)?)?.forward(&x.ids)?,
            None => self.text_encoder.forward(&x.ids)?.detach(),
        };
        let ts: Vec<f64> = x.timesteps.iter().map(|&t| t as f64).collect();
        let pred = if dtype == DType::F32 {
            self.unet.forward_timesteps(&noisy, &ts, &ehs)?
        } else {
            UNet2DConditionModel::new(&self.unet_cfg, self.cast(&self.unet_vars)?)?
                .forward_timesteps(&noisy, &ts, &ehs)?
        };
        let target = self.schedule.target(&latents, &noise, &x.timesteps)?;
        if !self.settings.prior_preservation {
            return Ok(mse(&pred, &target)?);
        }
        let half = pred.dim(0)? / 2;
        let instance = mse(&pred.narrow(0, 0, half)?, &target.narrow(0, 0, half)?)?;
        let prior = mse(&pred.narrow(0, half, half)?, &target.narrow(0, half, half)?)?;
        Ok((instance + (prior * self.settings.prior_loss_weight)?)?)
    }

    /// Writes the trained weights as a diffusers folder: `unet/` (and `text_encoder/`) with
    /// their configs, plus the base's `model_index.json`; the rest comes from the base model
    /// (`pnd generate --base`, or diffusers' per-component `from_pretrained`).
    pub fn save(&self, model: &str, out: &Path) -> Result<()> {
        let werr = |path: &Path, e: &dyn std::fmt::Display| TrainError::Write {
            path: path.into(),
            reason: e.to_string(),
        };
        let unet_dir = out.join("unet");
        std::fs::create_dir_all(&unet_dir).map_err(|e| werr(&unet_dir, &e))?;
        trainable::save_vars(
            &self.unet_vars,
            |_| true,
            &unet_dir.join("diffusion_pytorch_model.safetensors"),
        )?;
        std::fs::copy(&self.unet_config, unet_dir.join("config.json"))
            .map_err(|e| werr(&unet_dir, &e))?;
        if let Some(t) = &self.text {
            let dir = out.join("text_encoder");
            std::fs::create_dir_all(&dir).map_err(|e| werr(&dir, &e))?;
            trainable::save_vars(&t.vars, |_| true, &dir.join("model.safetensors"))?;
            std::fs::copy(&t.config_path, dir.join("config.json")).map_err(|e| werr(&dir, &e))?;
        }
        let src =
            weights::ModelSource::parse(model).map_err(diffusion::pipeline::PipelineError::from)?;
        if let Ok(index) = src.file(&["model_index.json"]) {
            std::fs::copy(&index, out.join("model_index.json")).map_err(|e| werr(out, &e))?;
        }
        Ok(())
    }
}

impl Objective for DreamBooth {
    fn loss(&mut self, mb: &MicroBatch) -> candle_core::Result<Tensor> {
        let x = self
            .inputs(mb)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        self.loss_of(&x)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Makes sure `dir` holds `n` class images of `prompt` by the base model: generates the missing
/// ones (`{index:04}.png`, seed = index, 50 DDIM steps, guidance 7.5, `size²`) and returns the
/// folder's images. `on_image(done, n)` sees each new image.
pub fn ensure_class_images(
    base: &StableDiffusion,
    prompt: &str,
    n: usize,
    size: u32,
    dir: &Path,
    on_image: &mut dyn FnMut(usize, usize),
) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Write {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    for i in 0..n {
        let path = dir.join(format!("{i:04}.png"));
        if path.is_file() {
            continue;
        }
        let req = SampleRequest {
            prompt: prompt.into(),
            height: size as usize,
            width: size as usize,
            seed: i as u64,
            ..SampleRequest::default()
        };
        let latents = base.sample(&req, &mut |_, _| {})?;
        let img = base.decode_images(&latents)?.remove(0);
        let tmp = dir.join(format!(".{i:04}.png.tmp"));
        img.save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(tensor_err)?;
        std::fs::rename(&tmp, &path).map_err(|e| TrainError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        on_image(i + 1, n);
    }
    Ok(n)
}
