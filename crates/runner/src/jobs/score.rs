//! Scoring: a job's image written atomically, scored against the subject's real images and its
//! class prompt, and made into its result row.

use super::JobSpec;
use crate::report::rows::{ImageRow, OracleRow, Phases, Timing};
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
    phases: &Phases,
    runtime: &RuntimeRecord,
) -> anyhow::Result<ImageRow> {
    let tmp = out.temp_path("image.png");
    let path = out.path("image.png");
    image
        .save(&tmp)
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(Into::into))
        .with_context(|| format!("writing '{}'", path.display()))?;
    let mut row = scored_row(dataset, scorer, spec, out, &path)?;
    phases.apply(&mut row);
    row.device = runtime.device.clone();
    row.dtype = runtime.dtype.clone();
    Ok(row)
}

/// The row of an image in the job's folder: its scores against the subject's real images and
/// class prompt, and the largest DINO similarity to one real image (the copy flag's measure).
/// Wall time, device and precision are left for the caller (zero and empty).
pub(super) fn scored_row(
    dataset: &Dataset,
    scorer: &Scorer,
    spec: &JobSpec,
    out: &JobOutput,
    path: &Path,
) -> anyhow::Result<ImageRow> {
    let (job, method) = (spec.job, &spec.method);
    let started = std::time::Instant::now();
    let real = dataset.images(spec.subject.name)?.to_vec();
    // The one-to-one pairing of a profile compares with the reference image (`[metrics] reference`).
    let scores = scorer.score_with_reference(
        &[path.to_path_buf()],
        &real,
        std::slice::from_ref(&spec.reference),
        &spec.clip_prompt,
    )?;
    let dino_max = dino_max(scorer, path, &real)?;
    // A non-finite score is this job's error, never a row (JSON would hold it as null, which no
    // reader takes back).
    let named = [
        ("dino", scores.dino),
        ("clip_i", scores.clip_i),
        ("clip_t", scores.clip_t),
        ("dino_max", dino_max),
    ];
    let extra = scores.extra.iter().map(|(k, v)| (k.as_str(), *v));
    if let Some((name, v)) = named.into_iter().chain(extra).find(|(_, v)| !v.is_finite()) {
        anyhow::bail!(
            "score {name} of image '{}' is {v}: not a finite number (a diverged generation or a metric model overflowing)",
            path.display()
        );
    }
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
            .unwrap_or(path)
            .display()
            .to_string(),
        reference: spec.reference.display().to_string(),
        dino: scores.dino,
        clip_i: scores.clip_i,
        clip_t: scores.clip_t,
        extra: scores.extra,
        device: String::new(),
        dtype: String::new(),
        dino_max: Some(dino_max),
        timing: Timing {
            scoring_s: Some(started.elapsed().as_secs_f64()),
            ..Default::default()
        },
    })
}

/// The largest DINO similarity of `image` to one of `real` (the scorer caches the embeddings, so
/// in a run this costs no second pass of the model).
pub fn dino_max(scorer: &Scorer, image: &Path, real: &[PathBuf]) -> anyhow::Result<f64> {
    let g = scorer.embed_images(&[image.to_path_buf()])?;
    let r = scorer.embed_images(real)?;
    Ok(r.dino
        .iter()
        .map(|e| metrics::scores::cosine(&g.dino[0], e))
        .fold(f64::NEG_INFINITY, f64::max))
}

/// The largest cosine similarity between two distinct embeddings of a set (`None` below two).
pub fn max_pair(embeddings: &[Vec<f32>]) -> Option<f64> {
    let mut best: Option<f64> = None;
    for (i, a) in embeddings.iter().enumerate() {
        for b in &embeddings[i + 1..] {
            let c = metrics::scores::cosine(a, b);
            best = Some(best.map_or(c, |m: f64| m.max(c)));
        }
    }
    best
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
    let mut dino_max_pair = std::collections::BTreeMap::new();
    for (name, paths) in &subjects {
        if let Some(m) = max_pair(&scorer.embed_images(paths)?.dino) {
            dino_max_pair.insert(name.clone(), m);
        }
    }
    Ok(OracleRow {
        dino: report.dino,
        clip_i: report.clip_i,
        per_subject: report
            .per_subject
            .iter()
            .map(|(k, v)| (k.clone(), v.dino, v.clip_i))
            .collect(),
        dino_max_pair,
        extra: report.extra,
    })
}
