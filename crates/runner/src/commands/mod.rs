//! One module per `pnd` subcommand.

pub mod dataset;
pub mod demo;
pub mod generate;
pub mod generate_blip;
pub mod invert;
pub mod oracle;
pub mod report;
pub mod score;
pub mod sweep;
