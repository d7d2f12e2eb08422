//! The result rows a sweep writes: one per generated image.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One generated image and its scores (SPEC §8). Flat, so it is one CSV line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRow {
    /// Stable job id, `method__subject__pNN__sS`.
    pub id: String,
    /// The experiment's method name (a table row).
    pub method: String,
    /// `stable-diffusion`, `textual-inversion`, `dreambooth`, `blip-diffusion`, `ip-adapter`.
    pub baseline: String,
    /// With Pick-and-Draw guidance.
    pub guided: bool,
    pub subject: String,
    pub prompt_index: usize,
    pub seed: u64,
    /// The prompt the image was generated from.
    pub prompt: String,
    /// The prompt CLIP-T scores against (class noun, no identifier).
    pub clip_t_prompt: String,
    /// The generated image, relative to the run folder.
    pub image: String,
    /// The subject's reference image (for grids), as given to the run.
    pub reference: String,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// The profile's extra scores by name (DreamBench++'s `dinov2`), on the profile's scale;
    /// empty under a profile without any and in rows of older runs. `results.csv` has one column
    /// per name (see [`crate::sweep::RunStore::write_results_csv`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    /// The device that generated the image (`cpu`, `cuda:0`); empty in rows of older runs.
    #[serde(default)]
    pub device: String,
    /// The generation precision (`f32`, `f16`, `bf16`); empty in rows of older runs.
    #[serde(default)]
    pub dtype: String,
    /// The largest DINO similarity of the image to one real image of its subject: above the
    /// subject's largest real-vs-real similarity ([`OracleRow::dino_max_pair`]) the image is
    /// counted as a possible copy of the input. Absent in rows of older runs.
    #[serde(default)]
    pub dino_max: Option<f64>,
    /// Where this image's time went: measured, not computed, so not part of the row file nor of
    /// `results.csv` (a resumed run gives the same bytes); the sweep writes it to
    /// `timings/<id>.json` and `timings.csv`, and the report reads it from there
    /// ([`crate::sweep::RunStore::read_timing`]). Rows of older runs still carry these fields;
    /// they load, and their timings are read from them.
    #[serde(skip)]
    pub timing: Timing,
}

/// Seconds of one image: the whole generation (guidance included) and each phase (its share of
/// a batch's): null-text inversion, reference palette, layout template, sampling (guidance passes
/// included), VAE decoding, scoring. A phase is absent where it did not run (unguided methods
/// have no inversion; another program's images only scoring) and in rows of older runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub seconds: f64,
    #[serde(default)]
    pub inversion_s: Option<f64>,
    #[serde(default)]
    pub palette_s: Option<f64>,
    #[serde(default)]
    pub template_s: Option<f64>,
    #[serde(default)]
    pub sampling_s: Option<f64>,
    #[serde(default)]
    pub decode_s: Option<f64>,
    #[serde(default)]
    pub scoring_s: Option<f64>,
}

impl crate::sweep::SweepRow for ImageRow {
    type Timing = Timing;
    fn timing(&self) -> Option<Timing> {
        Some(self.timing.clone())
    }
}

/// Seconds of a generation, whole and by phase (see [`Timing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    pub seconds: f64,
    pub inversion_s: Option<f64>,
    pub palette_s: Option<f64>,
    pub template_s: Option<f64>,
    pub sampling_s: Option<f64>,
    pub decode_s: Option<f64>,
}

impl Phases {
    /// Each image's share of a batch of `n`.
    pub fn share(self, n: usize) -> Self {
        let d = |v: Option<f64>| v.map(|s| s / n.max(1) as f64);
        Self {
            seconds: self.seconds / n.max(1) as f64,
            inversion_s: d(self.inversion_s),
            palette_s: d(self.palette_s),
            template_s: d(self.template_s),
            sampling_s: d(self.sampling_s),
            decode_s: d(self.decode_s),
        }
    }

    /// Writes these phases into a row's timing.
    pub fn apply(&self, row: &mut ImageRow) {
        let t = &mut row.timing;
        t.seconds = self.seconds;
        t.inversion_s = self.inversion_s;
        t.palette_s = self.palette_s;
        t.template_s = self.template_s;
        t.sampling_s = self.sampling_s;
        t.decode_s = self.decode_s;
    }
}

/// The "Real Images (Oracle)" row, written by the sweep's oracle step as `oracle.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OracleRow {
    pub dino: f64,
    pub clip_i: f64,
    /// Per subject: (subject, dino, clip_i).
    pub per_subject: Vec<(String, f64, f64)>,
    /// Per subject: the largest DINO similarity between two distinct real images (the copy
    /// flag's threshold). Empty in oracles of older runs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dino_max_pair: BTreeMap<String, f64>,
    /// The profile's extra scores of the real images (see [`ImageRow::extra`]). Empty in oracles
    /// of older runs and under a profile without any.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_oracles_of_older_runs_load_and_rows_without_extras_are_written_as_before() {
        let old = r#"{"id":"m__dog__p00__s0","method":"m","baseline":"stable-diffusion","guided":false,
            "subject":"dog","prompt_index":0,"seed":0,"prompt":"a sks dog","clip_t_prompt":"a dog",
            "image":"files/x/image.png","reference":"dog/00.jpg","dino":0.5,"clip_i":0.7,"clip_t":0.3,
            "seconds":1.0}"#;
        let row: ImageRow = serde_json::from_str(old).unwrap();
        assert!(row.extra.is_empty());
        assert_eq!((row.dino, row.dino_max), (0.5, None));
        assert!(!serde_json::to_string(&row).unwrap().contains("extra"));
        let mut with = row.clone();
        with.extra.insert("dinov2".into(), 81.5);
        let text = serde_json::to_string(&with).unwrap();
        assert!(
            text.contains(r#""clip_t":0.3,"extra":{"dinov2":81.5},"device""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<ImageRow>(&text).unwrap(), with);
        // The older row's wall time is not part of the row, but still its timing.
        assert!(!text.contains("seconds"), "{text}");
        let timing: Timing = serde_json::from_str(old).unwrap();
        assert_eq!((timing.seconds, timing.scoring_s), (1.0, None));
        let oracle: OracleRow =
            serde_json::from_str(r#"{"dino":0.77,"clip_i":0.88,"per_subject":[["dog",0.8,0.9]]}"#)
                .unwrap();
        assert!(oracle.extra.is_empty() && oracle.dino_max_pair.is_empty());
        assert!(!serde_json::to_string(&oracle).unwrap().contains("extra"));
    }
}
