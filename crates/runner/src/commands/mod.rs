//! One module per `pnd` subcommand, and what several of them share (`common`).

pub mod common;
pub mod dataset;
pub mod demo;
pub mod eval;
pub mod figures;
pub mod generate;
pub mod invert;
pub mod maps;
pub mod oracle;
pub mod report;
pub mod score;
pub mod sweep;
pub mod train;
