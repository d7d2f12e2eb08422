//! The profiles side by side (`pnd eval --protocol all`): one table with a protocol column, each
//! profile's lines as its own report has them (the oracle, then the methods), each on its own
//! scale (DreamBench++ multiplies by 100, Custom Diffusion's CLIP-T is 2.5 · max(cos, 0)); then
//! each profile's oracle gate. Written as `protocols.md`, `protocols.csv` and `index.html`, which
//! links each profile's own report.

use super::tables::{extra_columns, images_cell, TableRow};
use super::{html, ReportOutput};
use crate::sweep::write_file_atomic;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// One profile's run: its name, its run folder and its report.
pub struct ProfileRun {
    pub profile: String,
    pub run_dir: PathBuf,
    pub report: ReportOutput,
}

fn score(r: &TableRow, k: usize, digits: usize) -> String {
    if k == 2 && !r.has_clip_t {
        "–".into()
    } else {
        format!("{:.*}", digits, r.scores[k])
    }
}

/// Extra score `name` of a line (`None` where its profile has none).
fn extra(r: &TableRow, name: &str, digits: usize) -> Option<String> {
    r.extra
        .get(name)
        .filter(|v| !v.is_nan())
        .map(|v| format!("{v:.digits$}"))
}

/// The extra scores of any profile (DreamBench++'s `dinov2`): one column each after CLIP-T,
/// empty for the profiles without it.
fn extra_names(runs: &[ProfileRun]) -> Vec<String> {
    extra_columns(runs.iter().flat_map(|r| &r.report.table))
}

/// The oracle gate's line of a report's header (`- Oracle gate: ...`).
fn gate_line(header: &str) -> &str {
    header
        .lines()
        .find_map(|l| l.strip_prefix("- Oracle gate: "))
        .unwrap_or("not recorded")
}

/// The Markdown page: the table, then each profile's gate and report.
pub fn markdown(runs: &[ProfileRun]) -> String {
    let names = extra_names(runs);
    let head: String = names.iter().map(|n| format!(" {n} ↑ |")).collect();
    let rule = "---:|".repeat(names.len());
    let mut s = format!(
        "| Protocol | Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |{head} images |\n|---|---|---:|---:|---:|{rule}---:|\n",
    );
    for run in runs {
        for r in &run.report.table {
            let more: String = names
                .iter()
                .map(|n| format!(" {} |", extra(r, n, 3).unwrap_or_else(|| "–".into())))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |{more} {} |",
                run.profile,
                r.label,
                score(r, 0, 3),
                score(r, 1, 3),
                score(r, 2, 3),
                images_cell(r)
            );
        }
    }
    s.push_str(
        "\nEach profile scores on its own scale (see the README's table of metric protocols).\n\n",
    );
    for run in runs {
        let _ = writeln!(
            s,
            "- `{}`: oracle gate: {}",
            run.profile,
            gate_line(&run.report.header)
        );
    }
    s
}

/// Full precision, one line per profile and table line.
pub fn csv(runs: &[ProfileRun]) -> anyhow::Result<String> {
    let names = extra_names(runs);
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut header: Vec<&str> = vec!["protocol", "method", "images", "dino", "clip_i", "clip_t"];
    header.extend(names.iter().map(String::as_str));
    w.write_record(&header)?;
    for run in runs {
        for r in &run.report.table {
            let clip_t = if r.has_clip_t {
                score(r, 2, 6)
            } else {
                String::new()
            };
            let mut record = vec![
                run.profile.clone(),
                r.label.clone(),
                r.images.map(|n| n.to_string()).unwrap_or_default(),
                score(r, 0, 6),
                score(r, 1, 6),
                clip_t,
            ];
            record.extend(names.iter().map(|n| extra(r, n, 6).unwrap_or_default()));
            w.write_record(&record)?;
        }
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

/// Writes `protocols.md`, `protocols.csv` and `index.html` into `dir`; returns their paths.
pub fn write(dir: &Path, title: &str, runs: &[ProfileRun]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let md = markdown(runs);
    let mut page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{0}</title>\n<style>\n{1}\n</style>\n</head>\n<body>\n<h1>{0}</h1>\n",
        html::escape(title),
        html::STYLE
    );
    page.push_str(&html::markdown_to_html(&md));
    page.push_str("<h2>Each profile's report</h2>\n<ul>\n");
    for run in runs {
        let index = run.report.dir.join("index.html");
        // The profiles' run folders lie beside this report's folder.
        let rel = pathdiff(&index, dir);
        let _ = writeln!(
            page,
            "<li><a href=\"{}\">{}</a></li>",
            rel,
            html::escape(&run.profile)
        );
    }
    page.push_str("</ul>\n<h2>Files</h2>\n<ul>\n<li><a href=\"protocols.md\">protocols.md</a></li>\n<li><a href=\"protocols.csv\">protocols.csv</a></li>\n</ul>\n</body>\n</html>\n");
    let mut files = Vec::new();
    for (name, text) in [
        ("protocols.md", format!("# {title}\n\n{md}")),
        ("protocols.csv", csv(runs)?),
        ("index.html", page),
    ] {
        let p = dir.join(name);
        write_file_atomic(&p, text.as_bytes())?;
        files.push(p);
    }
    Ok(files)
}

/// `target` as a URL relative to the folder `from` (both absolute or both relative).
fn pathdiff(target: &Path, from: &Path) -> String {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    html::url_path(&rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_links_climb_out_of_the_report_folder() {
        assert_eq!(
            pathdiff(
                Path::new("/r/run/dreambooth/report/index.html"),
                Path::new("/r/run/report")
            ),
            "../dreambooth/report/index.html"
        );
        assert_eq!(
            pathdiff(Path::new("/r/a+b/x.html"), Path::new("/r")),
            "a%2Bb/x.html"
        );
    }
}
