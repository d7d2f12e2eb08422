//! The `pnd` binary's library: every command is a function here that tests can call.

pub mod cli;
pub mod commands;
pub mod experiment;
pub mod report;
pub mod sweep;
