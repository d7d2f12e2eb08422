//! The report's front page (`report.md`): what made the run (build, model revisions, dataset
//! checksum, protocol), how many jobs finished or failed, then the table.

use crate::sweep::{Failure, Plan};
use std::fmt::Write;

/// The header of a run's report: provenance, then the job counts and failures.
pub fn header(plan: &Plan, finished: usize, failures: &[Failure]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Report of experiment '{}'\n", plan.experiment);
    // The experiment's own description, as a banner (the demo's says its numbers mean nothing).
    if let Some(d) = plan.config["description"]
        .as_str()
        .filter(|d| !d.trim().is_empty())
    {
        let _ = writeln!(s, "> **About this run:** {}\n", d.trim().replace('\n', " "));
    }
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
            let rows = protocol_rows(&p.protocol);
            if !rows.is_empty() {
                let _ = writeln!(s, "\n| Protocol setting | Value |\n|---|---|");
                for (k, v) in rows {
                    let _ = writeln!(s, "| {k} | {} |", v.replace('|', "\\|"));
                }
                s.push('\n');
            }
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

/// The protocol settings of a plan (generation, metrics, guidance, seeds, prompts: nested JSON) as
/// a short table: one row per section (`generation`, `guidance`, `metrics`, each scored quantity
/// `metrics.scoring.dino` …, `seeds`, `prompts`), its settings `key value` joined with `; `
/// (nested keys dotted). Strings bare, runs of consecutive integers as ranges (`0–24 (25)`),
/// other lists as compact JSON; empty strings as `''`.
pub fn protocol_rows(protocol: &serde_json::Value) -> Vec<(String, String)> {
    fn leaves(path: &mut Vec<String>, v: &serde_json::Value, out: &mut Vec<(Vec<String>, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    path.push(k.clone());
                    leaves(path, v, out);
                    path.pop();
                }
            }
            serde_json::Value::Null => {}
            _ => out.push((path.clone(), value_text(v))),
        }
    }
    let mut all = vec![];
    leaves(&mut vec![], protocol, &mut all);
    let mut rows: Vec<(String, Vec<String>)> = vec![];
    for (path, value) in all {
        // How many leading keys name the row.
        let split = match path.as_slice() {
            [_] => 1,
            [m, s, _, _, ..] if m == "metrics" && s == "scoring" => 3,
            [m, s, ..] if m == "metrics" && s == "scoring" => 2,
            _ => 1,
        };
        let group = path[..split].join(".");
        let item = match &path[split..] {
            [] => value,
            rest => format!("{} {value}", rest.join(".")),
        };
        match rows.iter_mut().find(|(g, _)| *g == group) {
            Some((_, items)) => items.push(item),
            None => rows.push((group, vec![item])),
        }
    }
    rows.into_iter()
        .map(|(g, items)| (format!("`{g}`"), items.join("; ")))
        .collect()
}

fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) if s.is_empty() => "''".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => {
            let ints: Option<Vec<i64>> = a.iter().map(|x| x.as_i64()).collect();
            match ints {
                Some(n) if n.len() > 2 && n.windows(2).all(|w| w[1] == w[0] + 1) => {
                    format!("{}–{} ({})", n[0], n[n.len() - 1], n.len())
                }
                _ => serde_json::to_string(a).unwrap_or_default(),
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_a_short_table_of_sections() {
        let p = serde_json::json!({
            "generation": {"steps": 50, "cfg_scale": 7.5, "negative_prompt": ""},
            "metrics": {"dino": "facebook/dino-vits16", "scoring": {"profile": "dreambooth",
                "dino": {"scale": 1.0, "preprocess": {"crop": 224}}}},
            "guidance": null,
            "seeds": [0, 1, 2, 3],
            "prompts": [0, 3, 7],
        });
        let rows = protocol_rows(&p);
        let get = |k: &str| {
            rows.iter()
                .find(|(key, _)| key == &format!("`{k}`"))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get("generation").as_deref(),
            Some("cfg_scale 7.5; negative_prompt ''; steps 50")
        );
        assert_eq!(get("metrics").as_deref(), Some("dino facebook/dino-vits16"));
        assert_eq!(
            get("metrics.scoring").as_deref(),
            Some("profile dreambooth")
        );
        assert_eq!(
            get("metrics.scoring.dino").as_deref(),
            Some("preprocess.crop 224; scale 1.0")
        );
        assert_eq!(get("seeds").as_deref(), Some("0–3 (4)"));
        assert_eq!(get("prompts").as_deref(), Some("[0,3,7]"));
        assert_eq!(get("guidance"), None);
        assert_eq!(rows.len(), 6);
    }
}
