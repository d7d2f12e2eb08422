//! One module per `pnd` subcommand.

pub mod dataset;
pub mod generate;
pub mod invert;
pub mod report;
