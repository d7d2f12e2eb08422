//! The oracle gate: a run under the DreamBooth protocol with the published metric models must
//! reproduce the paper's real-image oracle (Table 1: DINO 0.774, CLIP-I 0.885) within 0.01, or
//! something in the pipeline (weights, preprocessing, decoding, pairing) differs from the paper's,
//! and every score of the run with it. The report says so at the top; `--strict` makes it an error.

use super::rows::OracleRow;

/// The published DINO model (DreamBooth protocol).
pub const PUBLISHED_DINO: &str = "facebook/dino-vits16";
/// The published CLIP model (DreamBooth protocol).
pub const PUBLISHED_CLIP: &str = "openai/clip-vit-base-patch32";
/// The paper's oracle: DINO, CLIP-I (DreamBooth, Table 1).
pub const PAPER_ORACLE: (f64, f64) = (0.774, 0.885);
/// How far the oracle may be from the paper's.
pub const TOLERANCE: f64 = 0.01;
/// The paper's oracle is over all of DreamBench's subjects.
pub const SUBJECTS: usize = 30;

/// What the gate decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// The oracle is within the tolerance of the paper's.
    Pass,
    /// The gate does not apply (other models, a subset of subjects, no oracle): why.
    NotApplicable(String),
    /// The oracle is off: the message for the report's top.
    Fail(String),
}

/// The protocol profile the paper's oracle belongs to.
pub const GATED_PROFILE: &str = "dreambooth";

/// The gate for a run scored under the protocol profile `profile` with `dino` and `clip` whose
/// oracle is `oracle`. Only the DreamBooth profile is gated: the paper's figures are its oracle.
pub fn oracle_gate(profile: &str, dino: &str, clip: &str, oracle: Option<&OracleRow>) -> Gate {
    if profile != GATED_PROFILE {
        return Gate::NotApplicable(format!(
            "the run scores under the '{profile}' protocol; the paper's oracle is the '{GATED_PROFILE}' protocol's"
        ));
    }
    if dino != PUBLISHED_DINO || clip != PUBLISHED_CLIP {
        return Gate::NotApplicable(format!(
            "the metric models ('{dino}', '{clip}') are not the published {PUBLISHED_DINO} and {PUBLISHED_CLIP}"
        ));
    }
    let Some(o) = oracle else {
        return Gate::NotApplicable("the run has no oracle.json".into());
    };
    if o.per_subject.len() != SUBJECTS {
        return Gate::NotApplicable(format!(
            "the oracle covers {} of DreamBench's {SUBJECTS} subjects; the paper's covers all",
            o.per_subject.len()
        ));
    }
    let (d, c) = PAPER_ORACLE;
    let off: Vec<String> = [("DINO", o.dino, d), ("CLIP-I", o.clip_i, c)]
        .into_iter()
        .filter(|(_, got, want)| (got - want).abs() > TOLERANCE || !got.is_finite())
        .map(|(name, got, want)| format!("{name} {got:.4} (paper {want:.3}, {:+.4})", got - want))
        .collect();
    if off.is_empty() {
        Gate::Pass
    } else {
        Gate::Fail(format!(
            "the real-image oracle under the published models is more than {TOLERANCE} from the paper's: {}. The weights, the preprocessing, the image decoding or the dataset differ from the paper's, and every score of this run with them.",
            off.join(", ")
        ))
    }
}

/// The gate of a run folder's `oracle.json` (written by a sweep or `pnd eval` before its first
/// job), so a long run learns at its start that its scores will not be comparable: a failing
/// gate is said on stderr, or is an error with `strict`.
pub fn check_run(
    run_dir: &std::path::Path,
    profile: &str,
    dino: &str,
    clip: &str,
    strict: bool,
) -> anyhow::Result<Gate> {
    let path = run_dir.join("oracle.json");
    let oracle: Option<OracleRow> = if path.is_file() {
        Some(
            serde_json::from_str(&std::fs::read_to_string(&path)?)
                .map_err(|e| anyhow::anyhow!("parsing '{}': {e}", path.display()))?,
        )
    } else {
        None
    };
    let gate = oracle_gate(profile, dino, clip, oracle.as_ref());
    if let Gate::Fail(message) = &gate {
        if strict {
            anyhow::bail!("oracle gate (--strict): {message}");
        }
        eprintln!("warning: oracle gate: {message}");
    }
    Ok(gate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folder_is_checked_at_its_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let check = |strict| check_run(dir, GATED_PROFILE, PUBLISHED_DINO, PUBLISHED_CLIP, strict);
        assert!(matches!(check(true).unwrap(), Gate::NotApplicable(_)));
        let write = |o: &OracleRow| {
            std::fs::write(dir.join("oracle.json"), serde_json::to_string(o).unwrap()).unwrap()
        };
        write(&oracle(0.70, 0.885, 30));
        assert!(matches!(check(false).unwrap(), Gate::Fail(_)));
        let e = format!("{:#}", check(true).unwrap_err());
        assert!(
            e.contains("oracle gate (--strict)") && e.contains("DINO 0.7000"),
            "{e}"
        );
        write(&oracle(0.775, 0.884, 30));
        assert_eq!(check(true).unwrap(), Gate::Pass);
        std::fs::write(dir.join("oracle.json"), "{").unwrap();
        assert!(format!("{:#}", check(false).unwrap_err()).contains("oracle.json"));
    }

    fn oracle(dino: f64, clip_i: f64, subjects: usize) -> OracleRow {
        OracleRow {
            dino,
            clip_i,
            per_subject: (0..subjects)
                .map(|i| (format!("s{i}"), dino, clip_i))
                .collect(),
            dino_max_pair: Default::default(),
            extra: Default::default(),
        }
    }

    #[test]
    fn the_published_models_must_reproduce_the_paper_oracle() {
        let gate =
            |o: &OracleRow| oracle_gate(GATED_PROFILE, PUBLISHED_DINO, PUBLISHED_CLIP, Some(o));
        assert_eq!(gate(&oracle(0.774, 0.885, 30)), Gate::Pass);
        assert_eq!(gate(&oracle(0.7839, 0.8751, 30)), Gate::Pass);
        match gate(&oracle(0.763, 0.885, 30)) {
            Gate::Fail(m) => assert!(
                m.contains("DINO 0.7630 (paper 0.774, -0.0110)") && !m.contains("CLIP-I"),
                "{m}"
            ),
            g => panic!("{g:?}"),
        }
        match gate(&oracle(0.774, 0.8, 30)) {
            Gate::Fail(m) => assert!(
                m.contains("CLIP-I 0.8000 (paper 0.885, -0.0850)") && !m.contains("DINO 0."),
                "{m}"
            ),
            g => panic!("{g:?}"),
        }
        match gate(&oracle(f64::NAN, 0.885, 30)) {
            Gate::Fail(m) => assert!(m.contains("DINO NaN"), "{m}"),
            g => panic!("{g:?}"),
        }
    }

    #[test]
    fn other_models_subsets_and_missing_oracles_are_not_gated() {
        // A tiny-model run: other ids, whatever its oracle.
        let far = oracle(0.2, 0.3, 30);
        assert!(matches!(
            oracle_gate(GATED_PROFILE, "/tmp/demo/models/dino", "/tmp/demo/models/clip", Some(&far)),
            Gate::NotApplicable(m) if m.contains("not the published")
        ));
        assert!(matches!(
            oracle_gate(
                GATED_PROFILE,
                PUBLISHED_DINO,
                "openai/clip-vit-large-patch14",
                Some(&far)
            ),
            Gate::NotApplicable(_)
        ));
        assert!(matches!(
            oracle_gate(GATED_PROFILE, PUBLISHED_DINO, PUBLISHED_CLIP, Some(&oracle(0.2, 0.3, 3))),
            Gate::NotApplicable(m) if m.contains("3 of DreamBench's 30")
        ));
        assert!(matches!(
            oracle_gate(GATED_PROFILE, PUBLISHED_DINO, PUBLISHED_CLIP, None),
            Gate::NotApplicable(_)
        ));
        // Another profile with the published models (Custom Diffusion's): its oracle is not the
        // paper's, however far it is.
        assert!(matches!(
            oracle_gate("custom-diffusion", PUBLISHED_DINO, PUBLISHED_CLIP, Some(&far)),
            Gate::NotApplicable(m) if m.contains("'custom-diffusion' protocol")
        ));
    }
}
