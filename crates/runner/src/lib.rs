//! The `pnd` binary's library: every command is a function here that tests can call.

pub mod cli;
pub mod commands;
pub mod demo;
pub mod experiment;
pub mod jobs;
pub mod lists;
pub mod progress;
pub mod provenance;
pub mod report;
pub mod requests;
pub mod runtime;
pub mod sweep;
pub mod train_plan;
