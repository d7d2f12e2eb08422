//! How a published metric protocol turns embeddings into DINO, CLIP-I and CLIP-T (and further)
//! scores: the `[metrics.scoring]` table of a protocol profile (`configs/protocol/*.toml`).
//!
//! Every field is required (a profile is a complete, pinned description of one published variant) and
//! unknown keys are errors; a protocol without the table gets [`Scoring::dreambooth`]. What varies
//! between the published variants:
//! - the preprocessing of each model ([`PreprocessSpec`]: resize, crop, statistics, and the two rounding
//!   rules where torchvision and transformers' image processors part: the crop offset, the rescale),
//! - the pairing of generated with real images ([`Pairing`]: every real image of the subject, or the one
//!   reference image the generation was conditioned on),
//! - the formula applied to each cosine similarity ([`Formula`]: a scale and where it is clipped at 0),
//! - prompts longer than the text model's context ([`Truncation`]),
//! - further image scores with their own model ([`ExtraScore`], DreamBench++'s DINOv2).

use crate::preprocess::Preprocess;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where the crop window of a center crop starts when the margin is odd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CropOffset {
    /// torchvision `center_crop`: `int(round((h − crop) / 2))`, Python's round-half-even.
    Round,
    /// transformers `image_transforms.center_crop`: `(h − crop) // 2`.
    Floor,
}

/// How 8-bit values become floats before normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rescale {
    /// torchvision `ToTensor`: `v / 255` in f32.
    DivideF32,
    /// transformers `rescale`: `v · (1/255)` in f64, then cast to f32.
    MultiplyF64,
}

/// Preprocessing of one metric model: decode to RGB → resize the shortest side (PIL bicubic) →
/// center crop → rescale → `(x − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    pub resize: u32,
    pub crop: u32,
    /// As written in the source (f64 here, so that a run's recorded plan reads back equal; the
    /// model input uses them as f32, as torchvision and transformers do).
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub crop_offset: CropOffset,
    pub rescale: Rescale,
}

/// ImageNet statistics (torchvision, DINO).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// OpenAI CLIP statistics.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl PreprocessSpec {
    /// The DreamBooth protocol's DINO preprocessing ([`Preprocess::DINO`]).
    pub const DINO: PreprocessSpec = PreprocessSpec {
        resize: 256,
        crop: 224,
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
        crop_offset: CropOffset::Round,
        rescale: Rescale::DivideF32,
    };
    /// The DreamBooth protocol's CLIP preprocessing ([`Preprocess::CLIP`]).
    pub const CLIP: PreprocessSpec = PreprocessSpec {
        resize: 224,
        crop: 224,
        mean: CLIP_MEAN,
        std: CLIP_STD,
        crop_offset: CropOffset::Round,
        rescale: Rescale::DivideF32,
    };

    pub fn recipe(&self) -> Preprocess {
        Preprocess {
            resize: self.resize,
            crop: self.crop,
            mean: self.mean.map(|v| v as f32),
            std: self.std.map(|v| v as f32),
            crop_offset: self.crop_offset,
            rescale: self.rescale,
        }
    }
}

/// Which real images a generated image is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pairing {
    /// Every real image of the subject; the image's score is the mean over them (DreamBooth, Custom
    /// Diffusion's `feats @ ref.T` mean).
    AllReal,
    /// One real image: the reference the generation was conditioned on (DreamBench++'s
    /// `src_image/<key>` ↔ `tgt_image/<key>`). The caller passes that one image, or one per generated
    /// image in the same order.
    OneToOne,
}

/// Where a score is clipped at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clamp {
    None,
    /// `max(scale · cos, 0)` for every pair before any mean (Custom Diffusion's CLIPScore).
    PerPair,
    /// `max(mean, 0)` of the aggregate only (torchmetrics' `CLIPScore.compute`).
    Mean,
}

/// `scale · cos`, clipped as [`Clamp`] says.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Formula {
    pub scale: f64,
    pub clamp: Clamp,
}

impl Formula {
    pub const COSINE: Formula = Formula {
        scale: 1.0,
        clamp: Clamp::None,
    };

    /// The value of one pair.
    pub fn pair(&self, cos: f64) -> f64 {
        let v = self.scale * cos;
        if self.clamp == Clamp::PerPair {
            v.max(0.0)
        } else {
            v
        }
    }

    /// The reported aggregate of per-image values' mean.
    pub fn aggregate(&self, mean: f64) -> f64 {
        if self.clamp == Clamp::Mean {
            mean.max(0.0)
        } else {
            mean
        }
    }
}

/// Prompts longer than the text model's context (77 tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    /// Keep the first 76 ids and the end token (transformers `truncation=True`, OpenAI
    /// `clip.tokenize(truncate=True)`).
    KeepEnd,
    /// The first 77 ids, end token lost (torchmetrics slices `input_ids[..., :77]`).
    Cut,
    /// An error (DreamBench++ tokenizes with `padding=True` and no truncation; the model rejects it).
    Error,
}

/// One image score: DINO or CLIP-I.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageScoring {
    pub preprocess: PreprocessSpec,
    pub pairing: Pairing,
    pub scale: f64,
    pub clamp: Clamp,
}

impl ImageScoring {
    pub fn formula(&self) -> Formula {
        Formula {
            scale: self.scale,
            clamp: self.clamp,
        }
    }
}

/// CLIP-T, with the CLIP model's text tower and the CLIP-I preprocessing of the image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextScoring {
    pub scale: f64,
    pub clamp: Clamp,
    pub truncation: Truncation,
}

impl TextScoring {
    pub fn formula(&self) -> Formula {
        Formula {
            scale: self.scale,
            clamp: self.clamp,
        }
    }
}

/// The architecture of an extra score's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// `ViTModel` (DINO v1): CLS of `last_hidden_state`.
    Vit,
    /// `Dinov2Model`: CLS of `last_hidden_state`.
    Dinov2,
    /// `CLIPModel`'s projected image embedding.
    Clip,
}

/// A further image score with its own model (a column beside DINO and CLIP-I).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraScore {
    /// Hub id or local folder.
    pub model: String,
    pub arch: Arch,
    pub preprocess: PreprocessSpec,
    pub pairing: Pairing,
    pub scale: f64,
    pub clamp: Clamp,
}

impl ExtraScore {
    pub fn image_scoring(&self) -> ImageScoring {
        ImageScoring {
            preprocess: self.preprocess,
            pairing: self.pairing,
            scale: self.scale,
            clamp: self.clamp,
        }
    }
}

/// The scoring half of a protocol profile (the models of DINO and CLIP are the profile's
/// `[metrics] dino` and `clip`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scoring {
    /// The profile's name (`dreambooth`, `custom-diffusion`, ...).
    pub profile: String,
    /// The computation it reproduces: repository, path and commit.
    pub source: String,
    pub dino: ImageScoring,
    pub clip_i: ImageScoring,
    pub clip_t: TextScoring,
    /// Further image scores by column name (lowercase letters, digits, `_`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, ExtraScore>,
}

impl Default for Scoring {
    fn default() -> Self {
        Self::dreambooth()
    }
}

/// Names an extra score cannot take: the columns the runner's result rows and tables already
/// have (`results.csv`, `table.csv`), which an extra score's column would repeat.
pub const RESERVED_NAMES: [&str; 31] = [
    "id",
    "method",
    "baseline",
    "guided",
    "subject",
    "prompt_index",
    "seed",
    "prompt",
    "clip_t_prompt",
    "image",
    "reference",
    "seconds",
    "device",
    "dtype",
    "dino_max",
    "dino_max_pair",
    "inversion_s",
    "palette_s",
    "template_s",
    "sampling_s",
    "decode_s",
    "scoring_s",
    "per_subject",
    "extra",
    "images",
    "pairs",
    "label",
    "protocol",
    "copies",
    "possible_copies",
    "vs",
];

impl Scoring {
    /// The DreamBooth protocol (SPEC §5): plain cosine, every real image, torchvision preprocessing.
    pub fn dreambooth() -> Self {
        Self {
            profile: "dreambooth".into(),
            source: "DreamBooth (Ruiz et al. 2023) §4.1; SPEC §5".into(),
            dino: ImageScoring {
                preprocess: PreprocessSpec::DINO,
                pairing: Pairing::AllReal,
                scale: 1.0,
                clamp: Clamp::None,
            },
            clip_i: ImageScoring {
                preprocess: PreprocessSpec::CLIP,
                pairing: Pairing::AllReal,
                scale: 1.0,
                clamp: Clamp::None,
            },
            clip_t: TextScoring {
                scale: 1.0,
                clamp: Clamp::None,
                truncation: Truncation::KeepEnd,
            },
            extra: BTreeMap::new(),
        }
    }

    /// Checks what serde cannot: positive sizes, a crop no larger than the resize, finite positive
    /// scales, nonzero std, extra score names.
    pub fn validate(&self) -> Result<(), String> {
        let mut image: Vec<(String, ImageScoring)> =
            vec![("dino".into(), self.dino), ("clip_i".into(), self.clip_i)];
        for (name, e) in &self.extra {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(format!(
                    "extra score name '{name}': use lowercase letters, digits and '_'"
                ));
            }
            if matches!(name.as_str(), "dino" | "clip_i" | "clip_t") {
                return Err(format!("extra score name '{name}' is a built-in score"));
            }
            if RESERVED_NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "extra score name '{name}' is taken by a column of the result rows or tables; pick another"
                ));
            }
            image.push((name.clone(), e.image_scoring()));
        }
        for (name, s) in &image {
            let p = &s.preprocess;
            if p.crop == 0 || p.resize < p.crop {
                return Err(format!(
                    "{name}: preprocess crop {} must be positive and at most resize {}",
                    p.crop, p.resize
                ));
            }
            if p.std.iter().any(|&v| !(v.is_finite() && v != 0.0))
                || p.mean.iter().any(|v| !v.is_finite())
            {
                return Err(format!(
                    "{name}: preprocess mean/std must be finite, std nonzero"
                ));
            }
            if !(s.scale.is_finite() && s.scale > 0.0) {
                return Err(format!("{name}: scale {} must be positive", s.scale));
            }
        }
        if !(self.clip_t.scale.is_finite() && self.clip_t.scale > 0.0) {
            return Err(format!(
                "clip_t: scale {} must be positive",
                self.clip_t.scale
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_scales_and_clamps_where_the_profile_says() {
        let cd = Formula {
            scale: 2.5,
            clamp: Clamp::PerPair,
        };
        assert_eq!(cd.pair(0.3), 0.75);
        assert_eq!(cd.pair(-0.1), 0.0);
        let tm = Formula {
            scale: 100.0,
            clamp: Clamp::Mean,
        };
        assert_eq!(tm.pair(-0.1), -10.0);
        assert_eq!(tm.aggregate(-3.0), 0.0);
        assert_eq!(tm.aggregate(3.0), 3.0);
        assert_eq!(Formula::COSINE.pair(-0.5), -0.5);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let good = toml::to_string(&Scoring::dreambooth()).unwrap();
        let back: Scoring = toml::from_str(&good).unwrap();
        assert_eq!(back, Scoring::dreambooth());
        let bad = good.replace(
            "pairing = \"all-real\"",
            "pairing = \"all-real\"\nweight = 2",
        );
        let err = toml::from_str::<Scoring>(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `weight`"), "{err}");
        let bad = good.replacen("pairing = \"all-real\"", "pairing = \"pairwise\"", 1);
        let err = toml::from_str::<Scoring>(&bad).unwrap_err().to_string();
        assert!(err.contains("pairwise"), "{err}");
        // Every field is required: a profile is complete.
        let bad = good.replacen("truncation = \"keep-end\"\n", "", 1);
        let err = toml::from_str::<Scoring>(&bad).unwrap_err().to_string();
        assert!(err.contains("missing field `truncation`"), "{err}");
        let mut s = Scoring::dreambooth();
        s.dino.preprocess.crop = 300;
        assert!(s.validate().unwrap_err().contains("at most resize"));
        let mut s = Scoring::dreambooth();
        s.clip_t.scale = 0.0;
        assert!(s.validate().unwrap_err().contains("clip_t"));
        // An extra score may not take a column name of the result rows.
        let extra = "[extra.seed]\nmodel = \"m\"\narch = \"dinov2\"\npairing = \"one-to-one\"\nscale = 1.0\nclamp = \"none\"\npreprocess = { resize = 256, crop = 224, mean = [0.5, 0.5, 0.5], std = [0.5, 0.5, 0.5], crop_offset = \"floor\", rescale = \"multiply-f64\" }\n";
        let s: Scoring = toml::from_str(&format!("{good}\n{extra}")).unwrap();
        let err = s.validate().unwrap_err();
        assert!(err.contains("'seed' is taken"), "{err}");
        let s: Scoring = toml::from_str(&format!(
            "{good}\n{}",
            extra.replace("extra.seed", "extra.dinov2")
        ))
        .unwrap();
        assert!(s.validate().is_ok());
    }

    #[test]
    fn the_default_specs_are_the_torchvision_recipes_and_read_back_equal_through_json() {
        // The f32 model inputs are exactly the crate's constants (no double rounding).
        assert_eq!(PreprocessSpec::DINO.recipe(), Preprocess::DINO);
        assert_eq!(PreprocessSpec::CLIP.recipe(), Preprocess::CLIP);
        // A run folder compares its plan as JSON written then read back: the values must survive
        // the round trip exactly (an f32 widened to f64 prints 17 digits that need not).
        let v = serde_json::to_value(Scoring::dreambooth()).unwrap();
        let text = serde_json::to_string(&v).unwrap();
        assert!(text.contains("0.48145466"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }
}
