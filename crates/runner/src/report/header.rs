//! The report's front page (`report.md`): what made the run (build, model revisions, dataset
//! checksum, protocol), how many jobs finished or failed, then the table.

use crate::sweep::{Failure, Plan};
use std::fmt::Write;

/// The header of a run's report: provenance, then the job counts and failures.
pub fn header(plan: &Plan, finished: usize, failures: &[Failure]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Report of experiment '{}'\n", plan.experiment);
    match &plan.provenance {
        None => {
            let _ = writeln!(
                s,
                "Provenance: not recorded (the run was started by a pnd that did not record it).\n"
            );
        }
        Some(p) => {
            let _ = writeln!(s, "- Build: {}", p.build_line());
            let _ = writeln!(s, "- Models:");
            for m in &p.models {
                let binding = m.binding.as_ref().map(|b| format!(" ({b})"));
                let _ = writeln!(
                    s,
                    "  - {}: `{}` {}{}",
                    m.role,
                    m.model,
                    m.revision,
                    binding.unwrap_or_default()
                );
            }
            let d = &p.dataset;
            let _ = writeln!(
                s,
                "- Dataset: `{}`, {} images, sha256 {}",
                d.path, d.images, d.sha256
            );
            let _ = writeln!(s, "- Protocol: `{}`", p.protocol);
        }
    }
    let total = plan.jobs.len();
    let _ = writeln!(
        s,
        "- Jobs: {finished} of {total} finished, {} failed",
        failures.len()
    );
    if !failures.is_empty() {
        let _ = writeln!(
            s,
            "\n## Failed jobs (rerun with `pnd sweep --resume` to retry)\n"
        );
        let _ = writeln!(s, "| job | error |\n|---|---|");
        for f in failures {
            let error = f.error.replace('|', "\\|").replace('\n', " ");
            let _ = writeln!(s, "| {} | {error} |", f.id);
        }
    }
    s
}
