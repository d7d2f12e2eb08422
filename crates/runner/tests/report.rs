//! `pnd report` on a hand-made run folder: table values and deltas, CSV/LaTeX, figures and grids.

use dreambench::Job;
use runner::report::rows::{ImageRow, OracleRow, Timing};
use runner::report::write_report;
use runner::sweep::{Plan, RunStore};
use std::path::Path;

/// Four methods, two subjects, two prompts, one seed; scores are simple functions of the indices,
/// so every aggregate is known in closed form.
fn make_run(dir: &Path) -> Vec<ImageRow> {
    let methods = [
        ("sd", "stable-diffusion", false),
        ("sd+pnd", "stable-diffusion", true),
        ("db", "dreambooth", false),
        ("db+pnd", "dreambooth", true),
    ];
    let config = serde_json::json!({
        "name": "report-test",
        "methods": methods.iter().map(|(n, b, g)| serde_json::json!({"name": n, "baseline": b, "pick_and_draw": g})).collect::<Vec<_>>(),
    });
    let subjects = ["dog", "vase"];
    let mut jobs = Vec::new();
    for (m, _, _) in &methods {
        for s in &subjects {
            for p in [0usize, 3] {
                jobs.push(Job {
                    method: m.to_string(),
                    subject: s.to_string(),
                    prompt_index: p,
                    seed: 0,
                });
            }
        }
    }
    let plan = Plan {
        experiment: "report-test".into(),
        config,
        jobs: jobs.clone(),
        provenance: None,
    };
    let store = RunStore::create(dir, &plan).unwrap();
    let mut rows = Vec::new();
    for job in &jobs {
        let (mi, (_, baseline, guided)) = methods
            .iter()
            .enumerate()
            .find(|(_, m)| m.0 == job.method)
            .unwrap();
        let si = subjects.iter().position(|s| *s == job.subject).unwrap();
        let id = job.id();
        let image = format!("files/{id}/image.png");
        let shade = (40 * mi + 60 * si) as u8;
        std::fs::create_dir_all(store.files_dir(&id)).unwrap();
        image::RgbImage::from_pixel(32, 32, image::Rgb([shade, 100, 200 - shade]))
            .save(dir.join(&image))
            .unwrap();
        let row = ImageRow {
            id: id.0.clone(),
            method: job.method.clone(),
            baseline: baseline.to_string(),
            guided: *guided,
            subject: job.subject.clone(),
            prompt_index: job.prompt_index,
            seed: 0,
            prompt: format!("prompt {}", job.prompt_index),
            clip_t_prompt: format!("prompt {}", job.prompt_index),
            image,
            reference: testdata::dreambench()
                .join(&job.subject)
                .join("00.jpg")
                .display()
                .to_string(),
            dino: 0.5 + 0.1 * mi as f64 + 0.01 * si as f64,
            clip_i: 0.7 + 0.02 * mi as f64,
            clip_t: 0.30 - 0.01 * mi as f64 + 0.001 * job.prompt_index as f64,
            extra: Default::default(),
            device: "cpu".into(),
            dtype: "f32".into(),
            // DreamBooth + Pick-and-Draw on the dog copies the input (0.95 > the dog's 0.9).
            dino_max: Some(if job.method == "db+pnd" && si == 0 {
                0.95
            } else {
                0.5
            }),
            // Phases: guided methods invert, make a palette and a template; every image samples,
            // decodes and is scored.
            timing: Timing {
                seconds: 1.0,
                inversion_s: guided.then_some(4.0),
                palette_s: guided.then_some(1.0),
                template_s: guided.then_some(2.0),
                sampling_s: Some(if *guided { 8.0 } else { 3.0 + si as f64 }),
                decode_s: Some(0.5),
                scoring_s: Some(0.25),
            },
        };
        store.write_timing(&id, &row.timing).unwrap();
        store.write_row(&id, &row).unwrap();
        rows.push(row);
    }
    let oracle = OracleRow {
        dino: 0.774,
        clip_i: 0.885,
        per_subject: vec![("dog".into(), 0.8, 0.9)],
        dino_max_pair: [("dog".to_string(), 0.9), ("vase".to_string(), 0.97)].into(),
        extra: Default::default(),
    };
    std::fs::write(
        dir.join("oracle.json"),
        serde_json::to_string(&oracle).unwrap(),
    )
    .unwrap();
    rows
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn table_has_means_and_deltas_against_the_unguided_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    make_run(tmp.path());
    let report = write_report(tmp.path(), None).unwrap();
    let md = &report.table_markdown;
    // sd: dino mean = 0.5 + 0.005 = 0.505; sd+pnd: 0.605 (+0.100); db: 0.705; db+pnd 0.805 (+0.100).
    assert!(
        md.contains("| Real Images (Oracle) | 0.774 | 0.885 | – | – |"),
        "{md}"
    );
    assert!(
        md.contains("| Stable Diffusion | 0.505 | 0.700 | 0.301 | 4 |"),
        "{md}"
    );
    assert!(md.contains("| Stable Diffusion + Pick-and-Draw | 0.605 (+0.100) | 0.720 (+0.020) | 0.291 (-0.010) | 4 |"), "{md}");
    assert!(
        md.contains("| DreamBooth + Pick-and-Draw | 0.805 (+0.100) |"),
        "{md}"
    );
    // Possible copies: the two dog images of db+pnd; none elsewhere.
    assert!(
        md.contains("| Stable Diffusion | 0.505 | 0.700 | 0.301 | 4 | 0 |"),
        "{md}"
    );
    assert!(md.contains("(-0.010) | 4 | 2 |"), "{md}");
    // Paired on the 4 matched jobs: DINO and CLIP-I move by a constant (the interval collapses
    // on it; of the 16 sign flips only all-plus and all-minus reach it: p = 2/16), CLIP-T by
    // -0.010 each.
    assert!(
        md.contains("| Stable Diffusion + Pick-and-Draw | Stable Diffusion | 4 | +0.100 [+0.100, +0.100], p 0.125 | +0.020 [+0.020, +0.020], p 0.125 | -0.010 [-0.010, -0.010], p 0.125 |"),
        "{md}"
    );
    assert!(
        md.contains(
            "| DreamBooth + Pick-and-Draw | DreamBooth | 4 | +0.100 [+0.100, +0.100], p 0.125 |"
        ),
        "{md}"
    );
    let tex = std::fs::read_to_string(report.dir.join("table.tex")).unwrap();
    assert!(
        tex.contains("Stable Diffusion + Pick-and-Draw & 0.605 ({\\scriptsize $+0.100$})"),
        "{tex}"
    );
    let csv = std::fs::read_to_string(report.dir.join("table.csv")).unwrap();
    assert!(
        csv.contains(
            "DreamBooth + Pick-and-Draw,4,0.805000,0.760000,0.271500,0.100000,0.020000,-0.010000,4,2,4,0.100000,0.100000,0.100000,0.125000,"
        ),
        "{csv}"
    );
    // Where the time went: seconds per image by phase, from the rows.
    let front = std::fs::read_to_string(report.dir.join("report.md")).unwrap();
    assert!(front.contains("## Where the time went"), "{front}");
    assert!(
        front.contains(
            "| Stable Diffusion | cpu | f32 | 4 | 1.00 | – | – | – | 3.50 | 0.50 | 0.25 |"
        ),
        "{front}"
    );
    assert!(
        front.contains(
            "| DreamBooth + Pick-and-Draw | cpu | f32 | 4 | 1.00 | 4.00 | 1.00 | 2.00 | 8.00 | 0.50 | 0.25 |"
        ),
        "{front}"
    );
    // The oracle gate: these hand-made rows name no metric models, so it does not apply.
    assert!(
        report.header.contains("- Oracle gate: not applied"),
        "{}",
        report.header
    );
    let per_subject = std::fs::read_to_string(report.dir.join("per_subject.csv")).unwrap();
    assert!(
        per_subject.contains("sd+pnd,vase,0.610000,0.720000,0.291500"),
        "{per_subject}"
    );
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn figures_and_grids_are_written_and_decodable() {
    let tmp = tempfile::tempdir().unwrap();
    make_run(tmp.path());
    let report = write_report(tmp.path(), None).unwrap();
    // To look at the figures: PND_KEEP_REPORT=/some/dir cargo test -p runner --test report
    if let Ok(keep) = std::env::var("PND_KEEP_REPORT") {
        let keep = Path::new(&keep);
        for f in report.files.iter() {
            let to = keep.join(f.strip_prefix(&report.dir).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(f, to).unwrap();
        }
    }
    for name in [
        "pareto_dino",
        "pareto_clip_i",
        "subjects_dino",
        "subjects_clip_i",
        "subjects_clip_t",
    ] {
        let png = image::open(report.dir.join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        // Something was drawn: not a blank canvas.
        let distinct: std::collections::BTreeSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 10, "{name}: {} colors", distinct.len());
        let svg = std::fs::read_to_string(report.dir.join(format!("{name}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{name}");
    }
    let grid = image::open(report.dir.join("grids/dog__sd+pnd.png")).unwrap();
    // Three 192-pixel columns with 4-pixel gaps; a 24-pixel title line, then per row a 20-pixel
    // prompt line, the cells and a gap.
    assert_eq!(
        (grid.width(), grid.height()),
        (3 * 192 + 16, 24 + 2 * (20 + 192 + 4) + 4)
    );
    // The column titles and the row labels are drawn (dark text on the white strips).
    let grid = grid.to_rgb8();
    let dark_in = |rows: std::ops::Range<u32>| {
        rows.flat_map(|y| (0..grid.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| grid.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count()
    };
    assert!(dark_in(0..24) > 30, "no column titles");
    assert!(dark_in(24..44) > 30, "no label on the first row");
    assert!(dark_in(240..260) > 30, "no label on the second row");
    assert!(report.dir.join("grids/vase__db+pnd.png").is_file());
    assert!(report.dir.join("results.parquet").is_file());
    // The same run reports byte-identical files twice.
    let again = tempfile::tempdir().unwrap();
    write_report(tmp.path(), Some(again.path())).unwrap();
    for f in [
        "table.md",
        "table.tex",
        "table.csv",
        "stats.csv",
        "per_subject.csv",
        "pareto_dino.svg",
    ] {
        assert_eq!(
            std::fs::read(report.dir.join(f)).unwrap(),
            std::fs::read(again.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

/// The values of every `src="..."` and `href="..."` in `html`, percent-decoded.
fn linked_paths(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (at, _) in html.match_indices(attr) {
            let rest = &html[at + attr.len()..];
            let value = &rest[..rest.find('"').expect("a closing quote")];
            let bytes = value.as_bytes();
            let mut decoded = Vec::new();
            let mut k = 0;
            while k < bytes.len() {
                if bytes[k] == b'%' {
                    decoded.push(u8::from_str_radix(&value[k + 1..k + 3], 16).unwrap());
                    k += 3;
                } else {
                    decoded.push(bytes[k]);
                    k += 1;
                }
            }
            out.push(String::from_utf8(decoded).unwrap());
        }
    }
    out
}

/// `index.html`: one page with the table rows, the figures and the grids; every file it links
/// lies beside it (relative links, nothing external, no scripts).
#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn index_html_shows_the_table_and_links_only_files_beside_it() {
    let tmp = tempfile::tempdir().unwrap();
    make_run(tmp.path());
    let report = write_report(tmp.path(), None).unwrap();
    let index = report.dir.join("index.html");
    assert!(report.files.contains(&index));
    let html = std::fs::read_to_string(&index).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.ends_with("</html>\n"));
    for row in [
        "<tr><td>Real Images (Oracle)</td><td class=\"r\">0.774</td><td class=\"r\">0.885</td><td class=\"r\">–</td><td class=\"r\">–</td><td class=\"r\">–</td></tr>",
        "<tr><td>Stable Diffusion</td><td class=\"r\">0.505</td><td class=\"r\">0.700</td><td class=\"r\">0.301</td><td class=\"r\">4</td><td class=\"r\">0</td></tr>",
        "<tr><td>Stable Diffusion + Pick-and-Draw</td><td class=\"r\">0.605 (+0.100)</td><td class=\"r\">0.720 (+0.020)</td><td class=\"r\">0.291 (-0.010)</td><td class=\"r\">4</td><td class=\"r\">0</td></tr>",
        "<tr><td>DreamBooth + Pick-and-Draw</td><td>DreamBooth</td><td class=\"r\">4</td><td class=\"r\">+0.100 [+0.100, +0.100], p 0.125</td>",
        "<tr><td>DreamBooth + Pick-and-Draw</td><td>cpu</td><td>f32</td><td class=\"r\">4</td><td class=\"r\">1.00</td><td class=\"r\">4.00</td>",
        "<h1>Report of experiment &#39;report-test&#39;</h1>",
        "<li>Oracle gate: not applied",
        "<h3>DreamBooth + Pick-and-Draw</h3>",
    ] {
        assert!(html.contains(row), "no {row} in\n{html}");
    }
    assert!(!html.contains("<script"), "{html}");
    let links = linked_paths(&html);
    for f in [
        "pareto_dino.png",
        "pareto_clip_i.svg",
        "subjects_clip_t.png",
        "grids/dog__sd+pnd.png",
        "grids/vase__db+pnd.png",
        "table.csv",
        "results.parquet",
        // The run's own files, copied beside the page.
        "plan.json",
        "oracle.json",
    ] {
        assert!(links.iter().any(|l| l == f), "{f} not linked: {links:?}");
    }
    for l in &links {
        assert!(
            !l.contains("//") && !l.starts_with('/') && !l.contains(".."),
            "not a relative link beside the page: {l}"
        );
        assert!(report.dir.join(l).is_file(), "{l} is linked but missing");
    }
    // Every figure and grid written is on the page.
    for f in report
        .files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
    {
        let rel = f.strip_prefix(&report.dir).unwrap().to_str().unwrap();
        assert!(links.iter().any(|l| l == rel), "{rel} not on the page");
    }
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn stats_have_bootstrap_intervals_around_the_means() {
    let tmp = tempfile::tempdir().unwrap();
    make_run(tmp.path());
    let report = write_report(tmp.path(), None).unwrap();
    let stats = std::fs::read_to_string(report.dir.join("stats.csv")).unwrap();
    assert_eq!(stats.lines().count(), 1 + 4 * 3, "{stats}");
    for line in stats.lines().skip(1) {
        let f: Vec<f64> = line
            .split(',')
            .skip(3)
            .map(|x| x.parse().unwrap())
            .collect();
        let (mean, lo, hi) = (f[0], f[2], f[3]);
        assert!(
            lo <= mean + 1e-12 && mean <= hi + 1e-12 && hi - lo < 0.1,
            "{line}"
        );
    }
}

#[test]
fn a_folder_that_is_not_a_run_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = write_report(tmp.path(), None).unwrap_err().to_string();
    assert!(
        err.contains("not a run folder") && err.contains("plan.json"),
        "{err}"
    );
}

/// A plan.json whose config lost its methods is an error naming the file, not an empty report.
#[test]
fn a_plan_without_methods_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    make_run(tmp.path());
    let path = tmp.path().join("plan.json");
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    plan["config"]["methods"][1]
        .as_object_mut()
        .unwrap()
        .remove("baseline");
    std::fs::write(&path, serde_json::to_string(&plan).unwrap()).unwrap();
    let err = format!("{:#}", write_report(tmp.path(), None).unwrap_err());
    assert!(
        err.contains("plan.json") && err.contains("methods") && err.contains("baseline"),
        "{err}"
    );
}

/// The oracle gate in a report: a plan scored with the published models whose oracle is off
/// warns at the top of the report, and `--strict` makes it an error that writes nothing.
#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn an_oracle_off_the_paper_warns_and_fails_under_strict() {
    let tmp = tempfile::tempdir().unwrap();
    make_run(tmp.path());
    let path = tmp.path().join("plan.json");
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    plan["config"]["metrics"] = serde_json::json!({
        "dino": "facebook/dino-vits16",
        "clip": "openai/clip-vit-base-patch32",
    });
    std::fs::write(&path, serde_json::to_string(&plan).unwrap()).unwrap();
    let all: Vec<(String, f64, f64)> = dreambench::SUBJECTS
        .iter()
        .map(|s| (s.name.to_string(), 0.75, 0.88))
        .collect();
    let write_oracle = |dino: f64| {
        let o = OracleRow {
            dino,
            clip_i: 0.885,
            per_subject: all.clone(),
            dino_max_pair: Default::default(),
            extra: Default::default(),
        };
        std::fs::write(
            tmp.path().join("oracle.json"),
            serde_json::to_string(&o).unwrap(),
        )
        .unwrap();
    };
    write_oracle(0.75);
    let report = write_report(tmp.path(), None).unwrap();
    let lines: Vec<&str> = report.header.lines().collect();
    assert!(
        lines[0].starts_with("# Report of experiment"),
        "{}",
        report.header
    );
    assert!(
        lines[2].starts_with("> **Warning (oracle gate):**")
            && lines[2].contains("DINO 0.7500 (paper 0.774, -0.0240)"),
        "{}",
        report.header
    );
    let html = std::fs::read_to_string(report.dir.join("index.html")).unwrap();
    assert!(
        html.contains("<blockquote><strong>Warning (oracle gate):</strong>")
            && html.contains("DINO 0.7500 (paper 0.774, -0.0240)"),
        "{html}"
    );
    let strict = runner::report::ReportOptions { strict: true };
    let out = tmp.path().join("strict");
    let err = format!(
        "{:#}",
        runner::report::write_report_with(&[tmp.path().to_path_buf()], Some(&out), &strict)
            .unwrap_err()
    );
    assert!(
        err.contains("oracle gate (--strict)") && err.contains("DINO 0.7500"),
        "{err}"
    );
    assert!(!out.exists());
    // Within 0.01: passed, no warning, and --strict writes the report.
    write_oracle(0.78);
    let report =
        runner::report::write_report_with(&[tmp.path().to_path_buf()], Some(&out), &strict)
            .unwrap();
    assert!(
        !report.header.contains("Warning") && report.header.contains("- Oracle gate: passed"),
        "{}",
        report.header
    );
}

/// Rewrites `run`'s plan.json through `f`.
fn edit_plan(run: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = run.join("plan.json");
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut plan);
    std::fs::write(&path, serde_json::to_string(&plan).unwrap()).unwrap();
}

/// A provenance with only the dataset checksum mattering.
fn provenance(sha256: &str) -> serde_json::Value {
    serde_json::json!({
        "version": "0", "commit": "c", "features": [], "models": [],
        "dataset": {"path": "dreambench", "images": 10, "sha256": sha256},
        "protocol": {},
    })
}

#[test]
fn runs_on_other_subjects_or_another_dataset_copy_do_not_share_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    make_run(&a);
    make_run(&b);
    let out = tmp.path().join("out");
    let both = [a.clone(), b.clone()];
    let report = || {
        runner::report::write_report_with(&both, Some(&out), &Default::default())
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    // Another copy of the dataset (the checksums of what each run scored differ).
    edit_plan(&a, |p| p["provenance"] = provenance("aaaa"));
    edit_plan(&b, |p| p["provenance"] = provenance("bbbb"));
    let e = report().unwrap_err();
    assert!(
        e.contains("different copies of the dataset (sha256 aaaa vs bbbb)"),
        "{e}"
    );
    // Same copy, other subjects: b scored the dog only.
    edit_plan(&b, |p| {
        p["provenance"] = provenance("aaaa");
        let jobs: Vec<serde_json::Value> = p["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["subject"] == "dog")
            .cloned()
            .collect();
        p["jobs"] = jobs.into();
    });
    let e = report().unwrap_err();
    assert!(
        e.contains("cover different subjects (dog, vase (2 subjects) vs dog (1 subject))"),
        "{e}"
    );
    assert!(!out.exists(), "a refused report writes nothing");
}
