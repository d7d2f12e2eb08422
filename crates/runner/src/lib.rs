//! The `pnd` binary's library: every command is a function here that tests can call.

pub mod cli;
pub mod commands;
pub mod demo;
pub mod experiment;
pub mod figures;
pub mod jobs;
pub mod lists;
pub mod progress;
pub mod provenance;
pub mod report;
pub mod requests;
pub mod runtime;
pub mod sweep;
pub mod train_plan;

/// An error and its causes on one line, each cause once: `{:#}` joins the chain, and a library
/// error that also writes its cause into its own message (thiserror's `{source}`) would print
/// the cause twice.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_cause_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading 'x.json': {source}")]
        struct Twice {
            source: std::io::Error,
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(Twice { source: io }).context("loading the run");
        assert_eq!(format!("{err:#}").matches("no such file").count(), 2);
        assert_eq!(
            super::error_chain(&err),
            "loading the run: reading 'x.json': no such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_chain(&plain), "outer: inner");
    }
}
