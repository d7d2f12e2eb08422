//! The `pnd` binary's library: every command is a function here that tests can call.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod demo;
pub mod experiment;
pub mod report;
pub mod sweep;
