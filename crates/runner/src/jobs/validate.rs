//! Validation: everything the jobs of an experiment need, checked before the first job starts.

use super::models::{guidance_config, model_for, must_be_local};
use crate::experiment::Experiment;
use anyhow::{bail, Context};
use diffusion::textual_inversion::learned_embedding_key;
use dreambench::Dataset;
use std::path::Path;

/// Checks everything the jobs will need before any work starts: the dataset and its subjects,
/// every model location that must be local, every embedding file, every image a method of
/// baseline `images` reads, and the metric models.
pub fn validate(exp: &Experiment) -> anyhow::Result<()> {
    validate_with(exp, false)
}

/// [`validate`]; with `partial_images`, jobs of baseline `images` without an image are allowed
/// (`pnd eval` lists them and scores the rest).
pub fn validate_with(exp: &Experiment, partial_images: bool) -> anyhow::Result<()> {
    open_dataset(exp)?;
    let mut problems = Vec::new();
    for method in &exp.methods {
        if method.baseline == crate::experiment::Baseline::Images {
            if let Err(e) = super::images::ImageSources::open(method)
                .and_then(|sources| sources.check(method, &exp.jobs(), partial_images))
            {
                problems.push(format!(
                    "method '{}': {}",
                    method.name,
                    crate::error_chain(&e)
                ));
            }
            continue;
        }
        if method.pick_and_draw {
            if let Err(e) = guidance_config(exp, method) {
                problems.push(format!(
                    "method '{}': {}",
                    method.name,
                    crate::error_chain(&e)
                ));
            }
        }
        if method.baseline == crate::experiment::Baseline::IpAdapter {
            if let Err(e) = check_ip_adapter(exp, method) {
                problems.push(format!(
                    "method '{}': {}",
                    method.name,
                    crate::error_chain(&e)
                ));
            }
        }
        for subject in exp.subjects() {
            match model_for(exp, method, subject) {
                Err(e) => {
                    problems.push(crate::error_chain(&e));
                    break;
                }
                Ok(choice) => {
                    if must_be_local(&choice.model) && !Path::new(&choice.model).exists() {
                        problems.push(format!(
                            "method '{}', subject '{}': model path '{}' does not exist",
                            method.name, subject.name, choice.model
                        ));
                    }
                    if let Some(e) = &choice.embeddings {
                        if !e.is_file() {
                            problems.push(format!(
                                "method '{}', subject '{}': Textual Inversion embeddings '{}' do not exist",
                                method.name,
                                subject.name,
                                e.display()
                            ));
                        } else if let Err(err) = learned_embedding_key(e) {
                            // Several keys or vectors: which one the prompt means is unknowable.
                            problems.push(format!(
                                "method '{}', subject '{}': {err}",
                                method.name, subject.name
                            ));
                        }
                    }
                }
            }
        }
    }
    for (what, model) in [("DINO", &exp.metrics.dino), ("CLIP", &exp.metrics.clip)] {
        if must_be_local(model) && !Path::new(model).exists() {
            problems.push(format!(
                "[metrics] {what} model path '{model}' does not exist"
            ));
        }
    }
    problems.dedup();
    if !problems.is_empty() {
        bail!("the experiment cannot run:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// An IP-Adapter method's adapter and image encoder exist and fit the base model's UNet (read
/// from its `unet/config.json`; no weights are loaded).
fn check_ip_adapter(
    exp: &Experiment,
    method: &crate::experiment::MethodSpec,
) -> anyhow::Result<()> {
    let subjects = exp.subjects();
    let Some(subject) = subjects.first() else {
        return Ok(());
    };
    let choice = model_for(exp, method, subject)?;
    let Some(ip) = &choice.ip_adapter else {
        return Ok(());
    };
    let src = weights::ModelSource::parse(&choice.model)?;
    let config = src.file(&["unet/config.json"])?;
    let cfg: diffusion::unet::UNet2DConditionConfig = weights::read_json(&config)?;
    diffusion::ip_adapter::check(&ip.source(), &cfg).with_context(|| {
        format!(
            "IP-Adapter '{}' ({}) on the UNet of '{}'",
            ip.repo, ip.kind, choice.model
        )
    })?;
    Ok(())
}

/// The experiment's dataset: only the subjects it uses need to be there.
pub fn open_dataset(exp: &Experiment) -> anyhow::Result<Dataset> {
    let names: Vec<&str> = exp.subjects().iter().map(|s| s.name).collect();
    Dataset::open_subjects(&exp.metrics.data, &names).with_context(|| {
        format!(
            "opening the dataset of [metrics] data = '{}'",
            exp.metrics.data
        )
    })
}
