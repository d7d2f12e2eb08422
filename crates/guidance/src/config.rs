//! Pick-and-Draw settings (SPEC §7). Every default is the paper's; every one can be overridden
//! from a TOML file whose unknown keys are errors with line and column.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;

/// Distance between the masked reference and generated feature sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// Unidirectional relaxed EMD: mean over generated vectors of the nearest reference vector's
    /// cosine distance (the paper's choice).
    Uremd,
    /// Exact optimal transport with uniform marginals (the paper's ablation).
    Emd,
}

/// Which loss terms guide the sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Components {
    None,
    Appearance,
    Layout,
    Both,
}

impl Components {
    pub fn appearance(self) -> bool {
        matches!(self, Components::Appearance | Components::Both)
    }
    pub fn layout(self) -> bool {
        matches!(self, Components::Layout | Components::Both)
    }
}

/// The 3×3 Gaussian of the layout loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    /// Attend-and-Excite's `GaussianSmoothing`: exp(−((x−μ)/(2σ))²), normalized.
    Aa,
    /// The textbook Gaussian exp(−x²/(2σ²)), normalized.
    Textbook,
}

/// What to do when a guidance gradient holds NaN or infinite values (SPEC §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Report it in the trace, leave the latent unchanged, go on.
    Skip,
    /// Stop the run with an error.
    Abort,
}

/// Which word of a personalized prompt gives the subject token (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubjectToken {
    /// The pseudo-word's last token when the identifier is one (a Textual Inversion token: the
    /// model holds a learned embedding), else the class noun's: SPEC §7's rule.
    Identifier,
    /// The class noun's last token whenever the prompt holds the class noun.
    Class,
}

/// A half-open range of sampling step indices `[start, end)`, written `[start, end]` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "[usize; 2]", into = "[usize; 2]")]
pub struct Window {
    pub start: usize,
    pub end: usize,
}

impl From<[usize; 2]> for Window {
    fn from([start, end]: [usize; 2]) -> Self {
        Window { start, end }
    }
}

impl From<Window> for [usize; 2] {
    fn from(w: Window) -> Self {
        [w.start, w.end]
    }
}

impl Window {
    pub fn contains(&self, step: usize) -> bool {
        (self.start..self.end).contains(&step)
    }
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// Null-text inversion constants (prompt-to-prompt's null-text notebook, SPEC §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InversionConfig {
    /// Adam iterations per sampling step at most.
    pub inner_steps: usize,
    /// Learning rate at step 0; step i uses `lr · (1 − i/100)`.
    pub lr: f64,
    /// Early stop when the loss before an update falls below `epsilon + i · epsilon_slope`.
    pub epsilon: f64,
    pub epsilon_slope: f64,
    /// Classifier-free guidance scale of the DDIM step being fitted.
    pub guidance_scale: f64,
    /// Precision of the optimized null embedding, its Adam state and the fitted loss: `f32`
    /// (default; the UNet still runs in the model's dtype) or `model` (all in the model's dtype,
    /// where f16 rounds small Adam steps away).
    pub null_text_precision: NullTextPrecision,
}

/// See [`InversionConfig::null_text_precision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NullTextPrecision {
    #[default]
    F32,
    Model,
}

impl Default for InversionConfig {
    fn default() -> Self {
        InversionConfig {
            inner_steps: 10,
            lr: 1e-2,
            epsilon: 1e-5,
            epsilon_slope: 2e-5,
            guidance_scale: 7.5,
            null_text_precision: NullTextPrecision::F32,
        }
    }
}

/// Every Pick-and-Draw setting with the paper's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuidanceConfig {
    /// Step size η of `z ← z − η ∇_z ℓ`.
    pub eta: f64,
    /// Weight α of the appearance loss.
    pub alpha: f64,
    /// Weight β of the layout loss.
    pub beta: f64,
    /// Sampling steps guided by the layout loss.
    pub layout_window: Window,
    /// Sampling steps guided by the appearance loss.
    pub appearance_window: Window,
    /// Latent updates per guided step.
    pub iterations: usize,
    /// Mask threshold τ on the min–max normalized subject map.
    pub tau: f64,
    /// Appearance layers by their resolution at 512×512: 16, 32 or 64.
    pub resolution: usize,
    /// Explicit appearance layers (transformer-block sites); overrides `resolution` when set.
    pub layers: Option<Vec<String>>,
    pub distance: Distance,
    pub components: Components,
    pub kernel: Kernel,
    /// σ of the 3×3 Gaussian.
    pub sigma: f64,
    pub nonfinite: NonFinite,
    pub subject_token: SubjectToken,
    pub inversion: InversionConfig,
}

impl Default for GuidanceConfig {
    fn default() -> Self {
        GuidanceConfig {
            eta: 10.0,
            alpha: 10.0,
            beta: 100.0,
            layout_window: Window { start: 0, end: 10 },
            appearance_window: Window { start: 10, end: 20 },
            iterations: 3,
            tau: 0.1,
            resolution: 32,
            layers: None,
            distance: Distance::Uremd,
            components: Components::Both,
            kernel: Kernel::Aa,
            sigma: 0.5,
            nonfinite: NonFinite::Skip,
            subject_token: SubjectToken::Identifier,
            inversion: InversionConfig::default(),
        }
    }
}

impl GuidanceConfig {
    /// Parses a TOML document; `origin` names it in errors (a path or `<inline>`).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let config: GuidanceConfig = toml::from_str(text).map_err(|e| Error::Config {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<()> {
        fn bad(name: &'static str, value: impl ToString, reason: &'static str) -> Error {
            Error::InvalidSetting {
                name,
                value: value.to_string(),
                reason,
            }
        }
        for (name, v) in [
            ("eta", self.eta),
            ("alpha", self.alpha),
            ("beta", self.beta),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(bad(name, v, "must be finite and non-negative"));
            }
        }
        if !(0.0..=1.0).contains(&self.tau) {
            return Err(bad("tau", self.tau, "must lie in [0, 1]"));
        }
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return Err(bad("sigma", self.sigma, "must be positive"));
        }
        if self.layers.is_none() {
            self.appearance_block()?;
        }
        for (name, w) in [
            ("layout_window", self.layout_window),
            ("appearance_window", self.appearance_window),
        ] {
            if w.start > w.end {
                return Err(bad(
                    name,
                    format!("[{}, {}]", w.start, w.end),
                    "start after end",
                ));
            }
        }
        let inv = &self.inversion;
        if !(inv.lr.is_finite() && inv.lr > 0.0) {
            return Err(bad("inversion.lr", inv.lr, "must be positive"));
        }
        Ok(())
    }

    /// Whether any step of a `steps`-step schedule is guided by the appearance loss (else the
    /// inversion and palette are not needed).
    pub fn appearance_within(&self, steps: usize) -> bool {
        (0..steps).any(|i| self.appearance_at(i))
    }

    /// Warnings for a `steps`-step schedule whose guidance windows lie partly or wholly outside
    /// it (`pnd generate --steps 10` with the paper's appearance window [10, 20), say): one line
    /// each, saying what is skipped. Empty when every enabled window fits.
    pub fn schedule_warnings(&self, steps: usize) -> Vec<String> {
        let mut out = vec![];
        for (name, enabled, w) in [
            ("layout", self.components.layout(), self.layout_window),
            (
                "appearance",
                self.components.appearance(),
                self.appearance_window,
            ),
        ] {
            if !enabled || w.start == w.end || w.end <= steps {
                continue;
            }
            let what = if w.start >= steps {
                match name {
                    "appearance" => {
                        "no step is guided by it, and the inversion and palette are skipped"
                    }
                    _ => "no step is guided by it, and the layout template is skipped",
                }
            } else {
                "only the steps inside the schedule are guided"
            };
            out.push(format!(
                "the {name} window [{}, {}) lies outside the {steps}-step schedule (steps 0..{steps}): {what}",
                w.start, w.end
            ));
        }
        out
    }

    /// Whether any step of a `steps`-step schedule is guided by the layout loss (else no
    /// template is needed).
    pub fn layout_within(&self, steps: usize) -> bool {
        (0..steps).any(|i| self.layout_at(i))
    }

    /// Whether step `step` is guided by the appearance loss.
    pub fn appearance_at(&self, step: usize) -> bool {
        self.components.appearance() && self.appearance_window.contains(step) && self.iterations > 0
    }

    /// Whether step `step` is guided by the layout loss.
    pub fn layout_at(&self, step: usize) -> bool {
        self.components.layout() && self.layout_window.contains(step) && self.iterations > 0
    }

    /// The up block of the appearance layers chosen by `resolution`, or the
    /// [`Error::InvalidSetting`] of an unsupported resolution.
    pub fn appearance_block(&self) -> Result<usize> {
        appearance_up_block(self.resolution).ok_or_else(|| Error::InvalidSetting {
            name: "resolution",
            value: self.resolution.to_string(),
            reason: "must be 16, 32 or 64",
        })
    }

    /// The appearance layers' transformer-block sites for a UNet whose up blocks hold
    /// `attentions_per_up_block` Transformer2D models each (3 for SD 1.x).
    pub fn appearance_sites(&self, attentions_per_up_block: usize) -> Result<Vec<String>> {
        if let Some(layers) = &self.layers {
            return Ok(layers.clone());
        }
        let block = self.appearance_block()?;
        Ok((0..attentions_per_up_block)
            .map(|a| format!("up_blocks.{block}.attentions.{a}.transformer_blocks.0"))
            .collect())
    }
}

/// The SD 1.x decoder level whose attention runs at `resolution`² for a 512×512 image.
pub fn appearance_up_block(resolution: usize) -> Option<usize> {
    match resolution {
        16 => Some(1),
        32 => Some(2),
        64 => Some(3),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers() {
        let c = GuidanceConfig::default();
        assert_eq!((c.eta, c.alpha, c.beta), (10.0, 10.0, 100.0));
        assert_eq!(c.layout_window.range(), 0..10);
        assert_eq!(c.appearance_window.range(), 10..20);
        assert_eq!(c.iterations, 3);
        assert_eq!(c.tau, 0.1);
        assert_eq!(c.distance, Distance::Uremd);
        assert_eq!(c.components, Components::Both);
        assert_eq!(c.kernel, Kernel::Aa);
        assert_eq!(c.subject_token, SubjectToken::Identifier);
        assert_eq!(
            c.appearance_sites(3).unwrap(),
            vec![
                "up_blocks.2.attentions.0.transformer_blocks.0",
                "up_blocks.2.attentions.1.transformer_blocks.0",
                "up_blocks.2.attentions.2.transformer_blocks.0",
            ]
        );
        assert_eq!(c.inversion.inner_steps, 10);
        assert!(c.layout_at(0) && c.layout_at(9) && !c.layout_at(10));
        assert!(!c.appearance_at(9) && c.appearance_at(10) && !c.appearance_at(20));
        // An empty document is the defaults.
        assert_eq!(GuidanceConfig::from_toml_str("", "<t>").unwrap(), c);
    }

    #[test]
    fn toml_overrides_and_round_trip() {
        let c = GuidanceConfig::from_toml_str(
            "eta = 5.0\nresolution = 16\ndistance = \"emd\"\ncomponents = \"layout\"\n\
             kernel = \"textbook\"\nlayout_window = [0, 5]\n[inversion]\ninner_steps = 3\n",
            "<t>",
        )
        .unwrap();
        assert_eq!(c.eta, 5.0);
        assert_eq!(c.distance, Distance::Emd);
        assert_eq!(c.components, Components::Layout);
        assert_eq!(c.kernel, Kernel::Textbook);
        assert_eq!(c.layout_window.range(), 0..5);
        assert_eq!(c.inversion.inner_steps, 3);
        assert_eq!(c.inversion.lr, 1e-2);
        assert!(c.appearance_sites(3).unwrap()[0].starts_with("up_blocks.1."));
        assert!(!c.appearance_at(12));
        let back = GuidanceConfig::from_toml_str(&toml::to_string(&c).unwrap(), "<t>").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = GuidanceConfig::from_toml_str("eta = 1.0\n\nbetta = 3.0\n", "g.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("g.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("column 1"), "{err}");
        assert!(err.contains("betta"), "{err}");
        let err = GuidanceConfig::from_toml_str("[inversion]\nlr = \"big\"\n", "g.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let err = GuidanceConfig::from_toml_str("resolution = 48\n", "<t>").unwrap_err();
        assert!(err.to_string().contains("resolution = 48"), "{err}");
        let err = GuidanceConfig::from_toml_str("tau = 1.5\n", "<t>").unwrap_err();
        assert!(err.to_string().contains("tau"), "{err}");
        let err = GuidanceConfig::from_toml_str("distance = \"l2\"\n", "<t>").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    /// A config built in code skips `from_toml_*`'s validation: its bad values are errors where
    /// they are used, not panics.
    #[test]
    fn unvalidated_bad_resolution_is_an_error() {
        let c = GuidanceConfig {
            resolution: 48,
            ..Default::default()
        };
        let err = c.appearance_sites(3).unwrap_err().to_string();
        assert!(err.contains("resolution = 48"), "{err}");
        let explicit = GuidanceConfig {
            layers: Some(vec!["up_blocks.1.attentions.0.transformer_blocks.0".into()]),
            ..c
        };
        assert_eq!(explicit.appearance_sites(3).unwrap().len(), 1);
        let c = GuidanceConfig::from_toml_str("subject_token = \"class\"\n", "<t>").unwrap();
        assert_eq!(c.subject_token, SubjectToken::Class);
        let err = GuidanceConfig::from_toml_str("subject_token = \"sks\"\n", "<t>").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = GuidanceConfig::from_toml_file(Path::new("/nonexistent/g.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/g.toml"), "{err}");
    }
}
