//! Scoring: a job's image written atomically, scored against the subject's real images and its
//! class prompt, and made into its result row.

use super::JobSpec;
use crate::report::rows::{ImageRow, OracleRow};
use crate::runtime::RuntimeRecord;
use crate::sweep::JobOutput;
use anyhow::Context;
use dreambench::Dataset;
use metrics::Scorer;
use std::path::{Path, PathBuf};

/// Writes the image atomically, scores it and makes its row.
pub(super) fn image_row(
    dataset: &Dataset,
    scorer: &Scorer,
    spec: &JobSpec,
    out: &JobOutput,
    image: image::RgbImage,
    seconds: f64,
    runtime: &RuntimeRecord,
) -> anyhow::Result<ImageRow> {
    let (job, method) = (spec.job, &spec.method);
    let tmp = out.temp_path("image.png");
    image
        .save(&tmp)
        .with_context(|| format!("writing '{}'", tmp.display()))?;
    let path = out.path("image.png");
    std::fs::rename(&tmp, &path).with_context(|| format!("writing '{}'", path.display()))?;
    let real = dataset.images(spec.subject.name)?.to_vec();
    // The one-to-one pairing of a profile compares with the reference image (`[metrics] reference`).
    let scores = scorer.score_with_reference(
        std::slice::from_ref(&path),
        &real,
        std::slice::from_ref(&spec.reference),
        &spec.clip_prompt,
    )?;
    let run_dir = out
        .dir()
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    Ok(ImageRow {
        id: job.id().0,
        method: job.method.clone(),
        baseline: serde_json::to_value(method.baseline)?
            .as_str()
            .unwrap_or_default()
            .to_string(),
        guided: method.pick_and_draw,
        subject: job.subject.clone(),
        prompt_index: job.prompt_index,
        seed: job.seed,
        prompt: spec.prompt.clone(),
        clip_t_prompt: spec.clip_prompt.clone(),
        image: path
            .strip_prefix(run_dir)
            .unwrap_or(&path)
            .display()
            .to_string(),
        reference: spec.reference.display().to_string(),
        dino: scores.dino,
        clip_i: scores.clip_i,
        clip_t: scores.clip_t,
        seconds,
        device: runtime.device.clone(),
        dtype: runtime.dtype.clone(),
    })
}

/// The oracle row over the subjects (each real image against the others).
pub(super) fn oracle_row(
    dataset: &Dataset,
    scorer: &Scorer,
    subjects: &[&dreambench::Subject],
) -> anyhow::Result<OracleRow> {
    let subjects: Vec<(String, Vec<PathBuf>)> = subjects
        .iter()
        .map(|s| Ok((s.name.to_string(), dataset.images(s.name)?.to_vec())))
        .collect::<anyhow::Result<_>>()?;
    let report = scorer.oracle(&subjects)?;
    Ok(OracleRow {
        dino: report.dino,
        clip_i: report.clip_i,
        per_subject: report
            .per_subject
            .iter()
            .map(|(k, v)| (k.clone(), v.dino, v.clip_i))
            .collect(),
    })
}
