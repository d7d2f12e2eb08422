//! DreamBench (Ruiz et al., "DreamBooth", CVPR 2023, the `dataset/` folder of google/dreambooth):
//! the 30 subjects, their classes, the two 25-prompt lists, prompt rendering per method,
//! the reference-image rule, job enumeration with stable ids, and dataset fetch/verify.
//!
//! Everything here is data and pure functions: no model, no I/O beyond the dataset folder.

pub mod dataset;
pub mod jobs;
pub mod prompts;
pub mod subjects;

pub use dataset::{
    check, fetch, CheckReport, Dataset, DatasetError, FetchOptions, Problem, ReferenceRule,
};
pub use jobs::{enumerate_jobs, Job, JobId};
pub use prompts::{clip_t_prompt, PromptStyle, RenderError, LIVE_PROMPTS, OBJECT_PROMPTS};
pub use subjects::{subject, Kind, Subject, SUBJECTS};
