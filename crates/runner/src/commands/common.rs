//! What several commands share: loading a Stable Diffusion model, reading a guidance file, writing
//! an image, and reporting Pick-and-Draw's timings.

use crate::runtime::Runtime;
use crate::sweep::parse_toml;
use anyhow::Context;
use diffusion::pipeline::{LoadOptions, StableDiffusion};
use guidance::config::GuidanceConfig;
use guidance::pipeline::PickAndDraw;
use std::path::{Path, PathBuf};

/// The Textual Inversion flags of `pnd generate` and `pnd invert`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EmbeddingArgs {
    /// Textual Inversion embedding (`learned_embeds.safetensors` or `.bin`): one vector.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// The token the prompt uses for the embedding's vector, as diffusers'
    /// `load_textual_inversion(path, token=…)` (default: the file's own key).
    #[arg(long, requires = "embeddings")]
    pub embedding_token: Option<String>,
}

impl EmbeddingArgs {
    /// How `model` with these embeddings is named in the palette cache's keys (`pnd generate
    /// --pick-and-draw` and `pnd maps --reference` share entries through it).
    pub fn model_key(&self, model: &str) -> String {
        match (&self.embeddings, &self.embedding_token) {
            (Some(e), Some(token)) => format!("{model}+{}@{token}", e.display()),
            (Some(e), None) => format!("{model}+{}", e.display()),
            (None, _) => model.to_string(),
        }
    }
}

/// A Stable Diffusion model with its base and Textual Inversion embeddings, on `runtime`'s device
/// and in its precision; says on stderr which token a Textual Inversion vector is bound to.
pub fn load_model(
    model: &str,
    base: Option<String>,
    ti: &EmbeddingArgs,
    runtime: &Runtime,
) -> anyhow::Result<StableDiffusion> {
    let opts = LoadOptions {
        base,
        embeddings: ti.embeddings.clone(),
        embedding_token: ti.embedding_token.clone(),
        dtype: runtime.dtype,
        device: runtime.device.clone(),
    };
    let sd =
        StableDiffusion::load(model, &opts).with_context(|| format!("loading model '{model}'"))?;
    if let Some(t) = &sd.provenance.learned_token {
        eprintln!(
            "textual inversion: the vector of '{}' (file key '{}') is bound to token '{}'",
            t.file.display(),
            t.file_key,
            t.token
        );
    }
    Ok(sd)
}

/// A guidance file in the shipped block form (`configs/guidance/*.toml`: a `[guidance]` table).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GuidanceBlock {
    guidance: GuidanceConfig,
}

/// The guidance settings of `--guidance-config FILE` (the paper's defaults without one). The file
/// holds the settings either at the top level or in a `[guidance]` table, as the experiment
/// blocks under `configs/guidance/` do; errors point at the file's line and column.
pub fn load_guidance_config(path: Option<&Path>) -> anyhow::Result<GuidanceConfig> {
    let Some(path) = path else {
        return Ok(GuidanceConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading guidance settings '{}'", path.display()))?;
    let file = path.display();
    let table: toml::Table = parse_toml(&text, &file)?;
    let cfg = if table.contains_key("guidance") {
        parse_toml::<GuidanceBlock>(&text, &file)?.guidance
    } else {
        parse_toml::<GuidanceConfig>(&text, &file)?
    };
    cfg.validate()
        .with_context(|| format!("guidance settings '{file}'"))?;
    Ok(cfg)
}

/// The image formats `pnd generate --out` writes, by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    /// Quality 95 (PIL's default is 75; 95 keeps the JPEG close to the PNG for scoring).
    Jpeg,
}

/// JPEG quality of [`ImageFormat::Jpeg`].
pub const JPEG_QUALITY: u8 = 95;

impl ImageFormat {
    /// The format of `path`'s extension (`.png`, `.jpg`, `.jpeg`, any case); any other is an
    /// error naming the file, before any work is done.
    pub fn of(path: &Path) -> anyhow::Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(Self::Png),
            Some("jpg" | "jpeg") => Ok(Self::Jpeg),
            _ => anyhow::bail!(
                "output '{}': the file name must end in .png, .jpg or .jpeg (the format it is written in)",
                path.display()
            ),
        }
    }

    /// The extension written for this format.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
        }
    }
}

/// Checks before any model runs that `path` can be written: a probe file is created and removed
/// in its folder, or in the nearest folder above it that exists (the folders a run creates are
/// created later, so a refused run leaves nothing behind). The error names the folder.
pub fn check_writable(path: &Path) -> anyhow::Result<()> {
    let mut dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    while !dir.exists() {
        match dir.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(up) => dir = up.to_path_buf(),
            None => dir = PathBuf::from("."),
        }
    }
    anyhow::ensure!(
        dir.is_dir(),
        "cannot write '{}': '{}' is not a folder",
        path.display(),
        dir.display()
    );
    let probe = dir.join(format!(".pnd-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "cannot write '{}': the folder '{}' is not writable",
            path.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes an image in the format of its extension ([`ImageFormat::of`]) through a temporary file
/// and a rename, so a crash never leaves half an image.
pub fn save_image(img: &image::RgbImage, out: &Path) -> anyhow::Result<()> {
    let format = ImageFormat::of(out)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating '{}'", dir.display()))?;
    }
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    let tmp = out.with_file_name(name);
    let written = match format {
        ImageFormat::Png => img
            .save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(anyhow::Error::from),
        ImageFormat::Jpeg => std::fs::File::create(&tmp)
            .map_err(anyhow::Error::from)
            .and_then(|f| {
                let mut w = std::io::BufWriter::new(f);
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, JPEG_QUALITY)
                    .encode_image(img)
                    .map_err(anyhow::Error::from)
            }),
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing '{}'", out.display())));
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing '{}'", out.display()))?;
    Ok(())
}

/// The cache entries a Pick-and-Draw generation of `seeds` (one image each) found unusable, the
/// updates it skipped, and one line with the time of each part.
pub fn print_outcome(out: &PickAndDraw, seeds: &[u64]) {
    for w in &out.timings.cache_warnings {
        eprintln!("warning: {w}");
    }
    for skipped in &out.skipped_updates {
        match seeds.get(skipped.image).filter(|_| seeds.len() > 1) {
            Some(seed) => eprintln!("warning: seed {seed}: {skipped}"),
            None => eprintln!("warning: {skipped}"),
        }
    }
    let t = &out.timings;
    eprintln!(
        "pick-and-draw: inversion {:.1}s, palette {:.1}s (cache {}), template {:.1}s, guided sampling {:.1}s",
        t.inversion_s,
        t.palette_s,
        if t.cache_hit { "hit" } else { "miss" },
        t.template_s,
        t.sampling_s
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs/guidance")
            .join(name)
    }

    #[test]
    fn the_shipped_guidance_block_and_the_top_level_form_both_load() {
        // configs/guidance/paper.toml: a `[guidance]` table holding the paper's defaults.
        let block = load_guidance_config(Some(&shipped("paper.toml"))).unwrap();
        assert_eq!(block, GuidanceConfig::default());
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("top.toml");
        std::fs::write(&top, "eta = 5.0\nlayout_window = [0, 4]\n").unwrap();
        let cfg = load_guidance_config(Some(&top)).unwrap();
        assert_eq!((cfg.eta, cfg.layout_window.end), (5.0, 4));
        let nested = tmp.path().join("nested.toml");
        std::fs::write(&nested, "[guidance]\neta = 5.0\nlayout_window = [0, 4]\n").unwrap();
        assert_eq!(load_guidance_config(Some(&nested)).unwrap(), cfg);
        assert_eq!(
            load_guidance_config(None).unwrap(),
            GuidanceConfig::default()
        );
    }

    #[test]
    fn guidance_file_errors_point_at_line_and_column() {
        let tmp = tempfile::tempdir().unwrap();
        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, "[guidance]\neta = 5.0\netta = 1.0\n").unwrap();
        let err = format!("{:#}", load_guidance_config(Some(&bad)).unwrap_err());
        assert!(
            err.contains("bad.toml:3:1:") && err.contains("etta"),
            "{err}"
        );
        std::fs::write(
            &bad,
            "eta = 5.0\n[models]\nbase = \"x\"\n[guidance]\neta = 1.0\n",
        )
        .unwrap();
        let err = format!("{:#}", load_guidance_config(Some(&bad)).unwrap_err());
        // Both forms at once: the top-level key is refused where it stands.
        assert!(
            err.contains("bad.toml:1:1:") && err.contains("expected `guidance`"),
            "{err}"
        );
        std::fs::write(&bad, "tau = 2.0\n").unwrap();
        let err = format!("{:#}", load_guidance_config(Some(&bad)).unwrap_err());
        assert!(err.contains("tau") && err.contains("bad.toml"), "{err}");
    }
}
