//! The files of inversions, palettes and layout templates: safetensors for the tensors, JSON for
//! the inversion report. Each is written atomically (a crash never leaves a half-written file
//! under the final name) with a new file's permissions, and each safetensors file carries the
//! checksum of its content (the inversion's also covers its report's bytes): a read that fails,
//! does not match or finds a NaN or infinite value is an error naming the file, which
//! [`crate::cache`] treats as a miss ([`weights::files`]).

use crate::error::{Error, Result};
use crate::guide::{Palette, ReferenceLayer, TemplateMaps};
use crate::inversion::Inversion;
use candle_core::{DType, Tensor};
use diffusion::pipeline::StableDiffusion;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use weights::files::{load_checked, save_checked, sha256_hex, write_atomic, MissingChecksum};

/// The metadata key of the SHA-256 of an inversion's report file.
const REPORT_SHA256: &str = "report.sha256";

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
    // The report first: the tensor file, written last, holds its checksum, so a crash between the
    // two leaves an entry that fails verification instead of a mismatched pair.
    let json = serde_json::to_string_pretty(&inv.report).expect("report serializes");
    write_atomic(&path.with_extension("json"), json.as_bytes())?;
    let meta = BTreeMap::from([(REPORT_SHA256.to_string(), sha256_hex(json.as_bytes()))]);
    Ok(save_checked(&map, &meta, path)?)
}

/// Reads `z_T`, the null embeddings and the report written by [`write_inversion`].
pub fn read_inversion(path: &Path, sd: &StableDiffusion) -> Result<Inversion> {
    let file = load_checked(path, sd.device(), MissingChecksum::Reject)?;
    let jpath = path.with_extension("json");
    let bytes = std::fs::read(&jpath).map_err(|source| Error::Io {
        path: jpath.clone(),
        source,
    })?;
    let corrupt = |reason: String| Error::CorruptFile {
        path: jpath.clone(),
        reason,
    };
    let sha = sha256_hex(&bytes);
    if file.metadata.get(REPORT_SHA256) != Some(&sha) {
        return Err(corrupt(format!(
            "its SHA-256 {sha} is not the one '{}' records",
            path.display()
        )));
    }
    let report = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let t = file.tensors;
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
    let t = load_checked(path, sd.device(), MissingChecksum::Reject)?.tensors;
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
    let t = load_checked(path, sd.device(), MissingChecksum::Reject)?.tensors;
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
    Ok(save_checked(map, &BTreeMap::new(), path)?)
}
