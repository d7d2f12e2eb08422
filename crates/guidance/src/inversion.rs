//! Null-text inversion of the reference image and the appearance palette (SPEC §7), as
//! prompt-to-prompt's null-text notebook does it
//! (<https://github.com/google/prompt-to-prompt/blob/9c472e44aa1b607da59fea94820f7be9b26da511/null_text_w_ptp.ipynb>,
//! `NullInversion.ddim_loop` and `null_optimization`):
//! DDIM inversion with the conditional embedding, then per sampling step a fresh Adam on the
//! unconditional embedding against the MSE between the CFG DDIM step and the inverted latent.
//! The palette replays the inverted trajectory and keeps the conditional branch's features and
//! subject masks at the appearance steps; both are cached on disk.

use crate::capture::{attn2_site, SiteCapture};
use crate::config::InversionConfig;
use crate::error::{Error, Result};
use crate::guide::{Palette, ReferenceLayer};
use crate::maps::{mask_indices, min_max_normalize};
use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use diffusion::ddim::Ddim;
use diffusion::hooks::NoHook;
use diffusion::pipeline::{PromptEmbeddings, StableDiffusion};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The reference image center-cropped to the generation aspect ratio and resized to
/// `width × height` (Catmull-Rom), as the VAE sees it.
pub fn load_reference_image(path: &Path, height: usize, width: usize) -> Result<image::RgbImage> {
    let img = image::open(path)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .to_rgb8();
    let (w, h) = img.dimensions();
    // Largest centered crop with the target aspect ratio.
    let (tw, th) = (width as f64, height as f64);
    let scale = (w as f64 / tw).min(h as f64 / th);
    let (cw, ch) = (
        ((tw * scale).round() as u32).clamp(1, w),
        ((th * scale).round() as u32).clamp(1, h),
    );
    let (x0, y0) = ((w - cw) / 2, (h - ch) / 2);
    let crop = image::imageops::crop_imm(&img, x0, y0, cw, ch).to_image();
    Ok(image::imageops::resize(
        &crop,
        width as u32,
        height as u32,
        image::imageops::FilterType::CatmullRom,
    ))
}

/// Scaled VAE posterior mean of an image (no sampling).
///
/// # Shapes
/// Output `[1, 4, h/8, w/8]` in the model's dtype.
pub fn encode_image(sd: &StableDiffusion, img: &image::RgbImage) -> Result<Tensor> {
    let x = diffusion::vae::image_to_tensor(img, sd.device())?.to_dtype(sd.dtype())?;
    Ok(sd.vae.encode_latents(&x)?)
}

/// DDIM inversion with the conditional embedding: `[z_0, z_1, …, z_N]`, `z_N` the noisiest.
pub fn ddim_invert(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z0: &Tensor,
    cond: &Tensor,
) -> Result<Vec<Tensor>> {
    let ts = ddim.timesteps();
    let mut out = vec![z0.clone()];
    let mut z = z0.clone();
    for i in 0..ts.len() {
        let t = ts[ts.len() - 1 - i];
        let eps = sd.unet.forward(&z, t as f64, cond)?;
        z = ddim.inverse_step(&eps, t, &z)?;
        out.push(z.clone());
    }
    Ok(out)
}

/// Result of the null-text optimization.
pub struct NullText {
    /// One optimized unconditional embedding per sampling step, `[1, 77, dim]` each.
    pub embeddings: Vec<Tensor>,
    /// Adam updates taken per step.
    pub updates: Vec<usize>,
}

/// Optimizes the unconditional embedding step by step (SPEC §7 constants in `icfg`).
pub fn null_text_optimize(
    sd: &StableDiffusion,
    ddim: &Ddim,
    trajectory: &[Tensor],
    cond: &Tensor,
    uncond0: &Tensor,
    icfg: &InversionConfig,
) -> Result<NullText> {
    let ts = ddim.timesteps();
    let n = ts.len();
    let mut uncond = uncond0.detach();
    let mut z = trajectory[n].clone();
    let mut embeddings = Vec::with_capacity(n);
    let mut updates = Vec::with_capacity(n);
    for (i, &t) in ts.iter().enumerate() {
        let var = Var::from_tensor(&uncond)?;
        let params = ParamsAdamW {
            lr: icfg.lr * (1.0 - i as f64 / 100.0),
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut opt = AdamW::new(vec![var.clone()], params)?;
        let target = &trajectory[n - 1 - i];
        let eps_cond = sd.unet.forward(&z, t as f64, cond)?;
        let threshold = icfg.epsilon + i as f64 * icfg.epsilon_slope;
        let mut k = 0;
        while k < icfg.inner_steps {
            let eps_uncond = sd.unet.forward(&z, t as f64, var.as_tensor())?;
            let eps = (&eps_uncond + ((&eps_cond - &eps_uncond)? * icfg.guidance_scale)?)?;
            let prev = ddim.step(&eps, t, &z)?.prev_sample;
            let loss = (prev - target)?.sqr()?.mean_all()?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            opt.backward_step(&loss)?;
            k += 1;
            if value < threshold {
                break;
            }
        }
        uncond = var.as_tensor().detach();
        updates.push(k);
        let emb = PromptEmbeddings {
            uncond: uncond.clone(),
            cond: cond.clone(),
        };
        z = sd
            .cfg_step(ddim, &z, i, &emb, icfg.guidance_scale, &mut NoHook)?
            .latents;
        embeddings.push(uncond.clone());
    }
    Ok(NullText {
        embeddings,
        updates,
    })
}

/// CFG sampling from `z_T` with per-step unconditional embeddings; returns every latent after
/// each step (`[z_{N−1}, …, z_0]`). `hook_at(i)` may give a hook for step `i`; sampling stops
/// after `stop` steps.
#[allow(clippy::too_many_arguments)]
pub fn replay(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z_t: &Tensor,
    nulls: &[Tensor],
    cond: &Tensor,
    cfg_scale: f64,
    stop: usize,
    hook_at: &mut dyn FnMut(usize) -> Option<SiteCapture>,
    captured: &mut dyn FnMut(usize, SiteCapture) -> Result<()>,
) -> Result<Vec<Tensor>> {
    let mut z = z_t.clone();
    let mut out = Vec::new();
    for (i, null) in nulls.iter().enumerate().take(stop) {
        let emb = PromptEmbeddings {
            uncond: null.clone(),
            cond: cond.clone(),
        };
        match hook_at(i) {
            Some(mut cap) => {
                z = sd.cfg_step(ddim, &z, i, &emb, cfg_scale, &mut cap)?.latents;
                captured(i, cap)?;
            }
            None => {
                z = sd
                    .cfg_step(ddim, &z, i, &emb, cfg_scale, &mut NoHook)?
                    .latents
            }
        }
        out.push(z.clone());
    }
    Ok(out)
}

/// Reconstruction quality of an inversion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InversionReport {
    pub steps: usize,
    /// Mean over steps of the MSE between the replayed latent and the inverted one, with the
    /// optimized null embeddings.
    pub trajectory_mse: f64,
    /// The same with the empty prompt's embedding at every step (plain DDIM inversion).
    pub trajectory_mse_ddim: f64,
    /// MSE of the final replayed latent against the encoded image.
    pub final_mse: f64,
    pub final_mse_ddim: f64,
    /// PSNR (dB) of the decoded reconstruction against the input image.
    pub psnr: f64,
    pub psnr_ddim: f64,
    /// Adam updates per step.
    pub updates: Vec<usize>,
}

/// A null-text inversion.
pub struct Inversion {
    /// The inverted noise latent `z_T`, `[1, 4, h, w]`.
    pub z_t: Tensor,
    /// `[steps, 77, dim]`.
    pub null_embeddings: Tensor,
    pub report: InversionReport,
}

fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?
        .to_dtype(DType::F64)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?)
}

fn psnr(sd: &StableDiffusion, z: &Tensor, img: &image::RgbImage) -> Result<f64> {
    let rec = sd.decode_images(z)?.remove(0);
    let se: f64 = rec
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let m = se / img.as_raw().len() as f64;
    Ok(if m == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / m).log10()
    })
}

/// Null-text inversion of `img` under `prompt` with `steps` DDIM steps.
pub fn invert(
    sd: &StableDiffusion,
    img: &image::RgbImage,
    prompt: &str,
    steps: usize,
    icfg: &InversionConfig,
) -> Result<Inversion> {
    let cond = sd.encode_prompt(prompt)?;
    let empty = sd.encode_prompt("")?;
    invert_embeddings(sd, img, &cond, &empty, steps, icfg)
}

/// Null-text inversion of `img` with given embeddings: [`crate::inversion::invert`] with the
/// conditional embedding `cond` and the starting unconditional embedding `empty` in place of the
/// text prompt's and the empty prompt's (for conditionings a string cannot express, such as
/// BLIP's query-bearing context embeddings).
///
/// # Shapes
/// `cond`, `empty`: `[1, seq, dim]`.
pub fn invert_embeddings(
    sd: &StableDiffusion,
    img: &image::RgbImage,
    cond: &Tensor,
    empty: &Tensor,
    steps: usize,
    icfg: &InversionConfig,
) -> Result<Inversion> {
    let ddim = sd.ddim(steps)?;
    let n = ddim.timesteps().len();
    let z0 = encode_image(sd, img)?;
    let traj = ddim_invert(sd, &ddim, &z0, cond)?;
    let nt = null_text_optimize(sd, &ddim, &traj, cond, empty, icfg)?;
    let z_t = traj[n].clone();
    let quality = |nulls: &[Tensor]| -> Result<(f64, f64, f64)> {
        let lat = replay(
            sd,
            &ddim,
            &z_t,
            nulls,
            cond,
            icfg.guidance_scale,
            n,
            &mut |_| None,
            &mut |_, _| Ok(()),
        )?;
        let mut sum = 0.0;
        for (i, z) in lat.iter().enumerate() {
            sum += mse(z, &traj[n - 1 - i])?;
        }
        let last = lat.last().expect("steps > 0");
        Ok((sum / n as f64, mse(last, &z0)?, psnr(sd, last, img)?))
    };
    let (trajectory_mse, final_mse, p) = quality(&nt.embeddings)?;
    let (trajectory_mse_ddim, final_mse_ddim, p_ddim) = quality(&vec![empty.clone(); n])?;
    Ok(Inversion {
        z_t,
        null_embeddings: Tensor::cat(&nt.embeddings, 0)?,
        report: InversionReport {
            steps,
            trajectory_mse,
            trajectory_mse_ddim,
            final_mse,
            final_mse_ddim,
            psnr: p,
            psnr_ddim: p_ddim,
            updates: nt.updates,
        },
    })
}

/// Writes an inversion: tensors `latents` (`z_T`, usable as `--init-latents`) and
/// `null_embeddings`, plus the report as `FILE.json` beside it.
pub fn write_inversion(path: &Path, inv: &Inversion) -> Result<()> {
    let map = HashMap::from([
        ("latents".to_string(), inv.z_t.to_dtype(DType::F32)?),
        (
            "null_embeddings".to_string(),
            inv.null_embeddings.to_dtype(DType::F32)?,
        ),
    ]);
    write_atomic(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))?;
    let json = serde_json::to_string_pretty(&inv.report).expect("report serializes");
    let jpath = path.with_extension("json");
    write_atomic(&jpath, |tmp| {
        std::fs::write(tmp, json.as_bytes()).map_err(|source| Error::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })
}

/// Reads `z_T`, the null embeddings and the report written by [`write_inversion`].
pub fn read_inversion(path: &Path, sd: &StableDiffusion) -> Result<Inversion> {
    let t = candle_core::safetensors::load(path, sd.device())?;
    let get = |k: &str| {
        t.get(k).cloned().ok_or_else(|| Error::Invalid {
            what: "inversion file",
            reason: format!("'{}' has no tensor '{k}'", path.display()),
        })
    };
    let jpath = path.with_extension("json");
    let text = std::fs::read_to_string(&jpath).map_err(|source| Error::Io {
        path: jpath.clone(),
        source,
    })?;
    let report = serde_json::from_str(&text).map_err(|e| Error::Invalid {
        what: "inversion report",
        reason: format!("'{}': {e}", jpath.display()),
    })?;
    Ok(Inversion {
        z_t: get("latents")?.to_dtype(sd.dtype())?,
        null_embeddings: get("null_embeddings")?.to_dtype(sd.dtype())?,
        report,
    })
}

fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| Error::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Replays an inversion and keeps the palette: at each step of `steps_needed`, the conditional
/// branch's block outputs at `sites` and the subject masks from their `attn2` maps.
#[allow(clippy::too_many_arguments)]
pub fn palette_from_inversion(
    sd: &StableDiffusion,
    inv: &Inversion,
    prompt: &str,
    subject_token: usize,
    sites: &[String],
    tau: f64,
    cfg_scale: f64,
    steps_needed: std::ops::Range<usize>,
) -> Result<Palette> {
    let n = inv.report.steps;
    let ddim = sd.ddim(n)?;
    let cond = sd.encode_prompt(prompt)?;
    let nulls: Vec<Tensor> = (0..n)
        .map(|i| inv.null_embeddings.narrow(0, i, 1))
        .collect::<candle_core::Result<_>>()?;
    let batch = if cfg_scale > 1.0 { 1 } else { 0 };
    let attn: Vec<String> = sites.iter().map(|s| attn2_site(s)).collect();
    let mut palette = Palette::default();
    replay(
        sd,
        &ddim,
        &inv.z_t,
        &nulls,
        &cond,
        cfg_scale,
        steps_needed.end.min(n),
        &mut |i| {
            steps_needed
                .contains(&i)
                .then(|| SiteCapture::new(batch, vec![subject_token], attn.clone(), sites.to_vec()))
        },
        &mut |i, cap| {
            let mut layers = Vec::new();
            for site in sites {
                let missing = || Error::Invalid {
                    what: "reference palette",
                    reason: format!("the UNet has no site '{site}'"),
                };
                let map = cap.map(&attn2_site(site)).ok_or_else(missing)?;
                let norm = min_max_normalize(map)?.squeeze(0)?;
                layers.push(ReferenceLayer {
                    site: site.clone(),
                    features: cap.block(site).ok_or_else(missing)?.detach(),
                    mask: mask_indices(&norm, tau)?,
                });
            }
            palette.steps.insert(i, layers);
            Ok(())
        },
    )?;
    Ok(palette)
}

/// What identifies a cached inversion and palette.
#[derive(Debug, Clone, Serialize)]
pub struct CacheKey {
    /// The model argument (folder or hub id) and any Textual Inversion file.
    pub model: String,
    /// SHA-256 of the reference image file.
    pub image_sha256: String,
    pub prompt: String,
    pub steps: usize,
    pub height: usize,
    pub width: usize,
    pub scheduler: String,
    pub inversion: String,
    pub dtype: String,
}

impl CacheKey {
    fn digest(&self, extra: &str) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_string(self).expect("key serializes"));
        h.update(extra.as_bytes());
        h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// SHA-256 of a file's bytes, hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// An on-disk cache of inversions and palettes under one folder.
pub struct PaletteCache {
    pub dir: PathBuf,
}

/// Where a cached value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
}

impl PaletteCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PaletteCache { dir: dir.into() }
    }

    pub fn inversion_path(&self, key: &CacheKey) -> PathBuf {
        self.dir
            .join(format!("inversion-{}.safetensors", key.digest("")))
    }

    pub fn palette_path(
        &self,
        key: &CacheKey,
        sites: &[String],
        tau: f64,
        window: std::ops::Range<usize>,
    ) -> PathBuf {
        let extra = format!("{sites:?}|{tau}|{window:?}");
        self.dir
            .join(format!("palette-{}.safetensors", key.digest(&extra)))
    }

    /// The inversion of `key`, computed with `compute` and stored on a miss.
    pub fn inversion(
        &self,
        key: &CacheKey,
        sd: &StableDiffusion,
        compute: impl FnOnce() -> Result<Inversion>,
    ) -> Result<(Inversion, CacheStatus)> {
        let path = self.inversion_path(key);
        if path.is_file() && path.with_extension("json").is_file() {
            return Ok((read_inversion(&path, sd)?, CacheStatus::Hit));
        }
        let inv = compute()?;
        write_inversion(&path, &inv)?;
        Ok((inv, CacheStatus::Miss))
    }

    /// The palette of `key` for `sites`, computed with `compute` and stored on a miss.
    pub fn palette(
        &self,
        key: &CacheKey,
        sites: &[String],
        tau: f64,
        window: std::ops::Range<usize>,
        sd: &StableDiffusion,
        compute: impl FnOnce() -> Result<Palette>,
    ) -> Result<(Palette, CacheStatus)> {
        let path = self.palette_path(key, sites, tau, window.clone());
        if path.is_file() {
            return Ok((read_palette(&path, sites, window, sd)?, CacheStatus::Hit));
        }
        let p = compute()?;
        write_palette(&path, &p)?;
        Ok((p, CacheStatus::Miss))
    }
}

fn write_palette(path: &Path, p: &Palette) -> Result<()> {
    let mut map = HashMap::new();
    for (step, layers) in &p.steps {
        for l in layers {
            map.insert(
                format!("{step}.{}.features", l.site),
                l.features.to_dtype(DType::F32)?,
            );
            let mask = Tensor::new(l.mask.as_slice(), &candle_core::Device::Cpu)?;
            map.insert(format!("{step}.{}.mask", l.site), mask);
        }
    }
    write_atomic(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
}

fn read_palette(
    path: &Path,
    sites: &[String],
    window: std::ops::Range<usize>,
    sd: &StableDiffusion,
) -> Result<Palette> {
    let t = candle_core::safetensors::load(path, sd.device())?;
    let mut p = Palette::default();
    for step in window {
        let mut layers = Vec::new();
        for site in sites {
            let get = |k: String| {
                t.get(&k).cloned().ok_or_else(|| Error::Invalid {
                    what: "cached palette",
                    reason: format!("'{}' has no tensor '{k}'", path.display()),
                })
            };
            let features = get(format!("{step}.{site}.features"))?.to_dtype(sd.dtype())?;
            let mask = get(format!("{step}.{site}.mask"))?;
            // An empty mask is stored as a zero-length tensor.
            let mask: Vec<u32> = if mask.elem_count() == 0 {
                vec![]
            } else {
                mask.to_vec1()?
            };
            layers.push(ReferenceLayer {
                site: site.clone(),
                features,
                mask,
            });
        }
        p.steps.insert(step, layers);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// candle_nn's AdamW with weight_decay 0 is PyTorch's Adam (default betas and eps):
    /// three steps on f(θ) = Σ c·θ² checked against the textbook update.
    #[test]
    fn adamw_without_decay_is_adam() -> Result<()> {
        let dev = Device::Cpu;
        let c = [0.5f64, -2.0, 3.0];
        let mut theta = vec![1.0f64, 0.3, -0.7];
        let var = Var::new(theta.as_slice(), &dev)?;
        let lr = 1e-2;
        let mut opt = AdamW::new(
            vec![var.clone()],
            ParamsAdamW {
                lr,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        let ct = Tensor::new(&c, &dev)?;
        for step in 1..=3 {
            let loss = (var.as_tensor().sqr()? * &ct)?.sum_all()?;
            opt.backward_step(&loss)?;
            for k in 0..3 {
                let g = 2.0 * c[k] * theta[k];
                m[k] = b1 * m[k] + (1.0 - b1) * g;
                v[k] = b2 * v[k] + (1.0 - b2) * g * g;
                let mh = m[k] / (1.0 - b1.powi(step));
                let vh = v[k] / (1.0 - b2.powi(step));
                theta[k] -= lr * mh / (vh.sqrt() + eps);
            }
            let got: Vec<f64> = var.as_tensor().to_vec1()?;
            for k in 0..3 {
                assert!(
                    (got[k] - theta[k]).abs() < 1e-14,
                    "step {step}: {got:?} vs {theta:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn reference_image_is_center_cropped_and_resized() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.png");
        // 40×20: left quarter red, middle half green, right quarter blue.
        let img = image::RgbImage::from_fn(40, 20, |x, _| match x {
            0..10 => image::Rgb([255, 0, 0]),
            10..30 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        img.save(&path).unwrap();
        let out = load_reference_image(&path, 8, 8)?;
        assert_eq!(out.dimensions(), (8, 8));
        assert!(
            out.pixels().all(|p| p.0 == [0, 255, 0]),
            "the crop is the centre"
        );
        let err = load_reference_image(&dir.path().join("missing.png"), 8, 8).unwrap_err();
        assert!(err.to_string().contains("missing.png"), "{err}");
        Ok(())
    }
}
