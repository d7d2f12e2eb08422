//! Job enumeration: method × subject × prompt index × seed, in a fixed order, each with a stable,
//! human-readable id such as `dreambooth__dog7__p03__s2`.

use crate::subjects::Subject;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A job's id: `{method}__{subject}__p{prompt:02}__s{seed}`. It depends on nothing but those four
/// values, so it is the same across runs, machines and shards, and safe as a file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One generated image: which method, which subject, which of its 25 prompts, which seed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Job {
    pub method: String,
    pub subject: String,
    pub prompt_index: usize,
    pub seed: u64,
}

impl Job {
    pub fn id(&self) -> JobId {
        JobId(format!(
            "{}__{}__p{:02}__s{}",
            self.method, self.subject, self.prompt_index, self.seed
        ))
    }
}

/// Whether a name can be part of a job id: lowercase ASCII letters, digits, `-`, `+`, `_`, with
/// no `__` (the id's separator).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains("__")
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'+' || b == b'_'
        })
}

/// All jobs in canonical order: methods in the given order, then subjects, prompts, seeds.
pub fn enumerate_jobs(
    methods: &[String],
    subjects: &[&Subject],
    prompt_indices: &[usize],
    seeds: &[u64],
) -> Vec<Job> {
    let mut jobs =
        Vec::with_capacity(methods.len() * subjects.len() * prompt_indices.len() * seeds.len());
    for method in methods {
        for subject in subjects {
            for &prompt_index in prompt_indices {
                for &seed in seeds {
                    jobs.push(Job {
                        method: method.clone(),
                        subject: subject.name.to_string(),
                        prompt_index,
                        seed,
                    });
                }
            }
        }
    }
    jobs
}
