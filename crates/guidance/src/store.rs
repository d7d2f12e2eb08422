//! The files of inversions, palettes and layout templates: safetensors for the tensors (written
//! atomically: a crash never leaves a half-written file under the final name), JSON for the
//! inversion report.

use crate::error::{Error, Result};
use crate::guide::{Palette, ReferenceLayer, TemplateMaps};
use crate::inversion::Inversion;
use candle_core::{DType, Tensor};
use diffusion::pipeline::StableDiffusion;
use std::collections::HashMap;
use std::path::Path;

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
    save(path, &map)?;
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
    let jpath = path.with_extension("json");
    let text = std::fs::read_to_string(&jpath).map_err(|source| Error::Io {
        path: jpath.clone(),
        source,
    })?;
    let report = serde_json::from_str(&text).map_err(|e| Error::CorruptFile {
        path: jpath.clone(),
        reason: e.to_string(),
    })?;
    Ok(Inversion {
        z_t: tensor(&t, path, "latents")?.to_dtype(sd.dtype())?,
        null_embeddings: tensor(&t, path, "null_embeddings")?.to_dtype(sd.dtype())?,
        report,
    })
}

/// Writes a palette: per step and site, `{step}.{site}.features` and `{step}.{site}.mask`.
pub fn write_palette(path: &Path, p: &Palette) -> Result<()> {
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
    save(path, &map)
}

/// Reads the palette of `sites` at the steps of `window` written by [`write_palette`].
pub fn read_palette(
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
            let features =
                tensor(&t, path, &format!("{step}.{site}.features"))?.to_dtype(sd.dtype())?;
            let mask = tensor(&t, path, &format!("{step}.{site}.mask"))?;
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

/// Writes layout-template maps: per step and cross-attention site, `{step}.{site}`.
pub fn write_template(path: &Path, t: &TemplateMaps) -> Result<()> {
    let mut map = HashMap::new();
    for (step, maps) in &t.steps {
        for (site, m) in maps {
            map.insert(format!("{step}.{site}"), m.to_dtype(DType::F32)?);
        }
    }
    save(path, &map)
}

/// Reads the template maps written by [`write_template`] at the steps of `window`, site by site
/// in the order of `sites` (the model's cross-attention sites, the order they were captured in).
pub fn read_template(
    path: &Path,
    sites: &[String],
    window: std::ops::Range<usize>,
    sd: &StableDiffusion,
) -> Result<TemplateMaps> {
    let t = candle_core::safetensors::load(path, sd.device())?;
    let mut out = TemplateMaps::default();
    for step in window {
        let maps = sites
            .iter()
            .map(|site| {
                let m = tensor(&t, path, &format!("{step}.{site}"))?.to_dtype(sd.dtype())?;
                Ok((site.clone(), m))
            })
            .collect::<Result<Vec<_>>>()?;
        out.steps.insert(step, maps);
    }
    Ok(out)
}

/// The tensor `name` of a loaded file, or [`Error::MissingTensor`].
fn tensor(tensors: &HashMap<String, Tensor>, path: &Path, name: &str) -> Result<Tensor> {
    tensors
        .get(name)
        .cloned()
        .ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        })
}

fn save(path: &Path, map: &HashMap<String, Tensor>) -> Result<()> {
    write_atomic(path, |tmp| Ok(candle_core::safetensors::save(map, tmp)?))
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
