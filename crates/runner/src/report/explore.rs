//! `explore.html`: every image of a run on one self-contained page (issue 27, item 4).
//!
//! The page is plain HTML with its CSS and script inline and the run's rows embedded as one JSON
//! blob; it loads nothing from the network and opens from disk. Images are not copied: each
//! thumbnail is the run's own `files/<job id>/...` file, linked by a path relative to the page,
//! so a run folder copied off a cluster with its report keeps working. The reference images of
//! the subjects (a handful, from the dataset, which a copied run may lack) are written beside the
//! page as small JPEG thumbnails.
//!
//! In the browser: filter by subject, prompt, seed and method, sort by any score or paired
//! difference, page through thumbnails (`loading="lazy"`, one page in the DOM at a time), or
//! show one (subject, prompt, seed) across every method beside the reference. The URL fragment
//! holds the filter and the view (`#view=compare&subject=dog&prompt=3&seed=0`), so a link opens
//! what it names.
//!
//! The paired difference of an image is the report's ([`super::paired`]): the image's score minus
//! the score of the same job cell (subject, prompt index, seed) under the method it is compared
//! with ([`super::tables::baseline_of`]: its `compare_to`, else for a guided method the first
//! unguided method of its baseline).

use super::aggregate::{extra_names, MethodSummary};
use super::html::{escape, url_path};
use super::rows::ImageRow;
use super::tables::{baseline_of, MethodInfo};
use crate::sweep::write_file_atomic;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The page's file name, beside `index.html`.
pub const PAGE: &str = "explore.html";
/// The folder (beside the page) of the reference thumbnails.
pub const REFS: &str = "explore";
/// Longest side of a reference thumbnail, in pixels.
const REF_SIDE: u32 = 320;

const SCRIPT: &str = include_str!("explore.js");
const STYLE: &str = include_str!("explore.css");

/// A method as the page lists it.
#[derive(Debug, Serialize)]
struct PageMethod {
    name: String,
    label: String,
    /// Index of the method its paired differences are against.
    vs: Option<usize>,
}

/// The embedded data. Each row is an array (24,000 objects with field names would double the
/// page): `[method, subject, prompt index, seed, image URL, prompt text, CLIP-T prompt text,
/// reference (index into refs, -1 for none), job id, [scores], paired row]`, indices into
/// `methods`, `subjects` and `texts`, scores in the order of `scores` (null where missing). The
/// paired row is the index of the row it is compared with (-1 for none): the page subtracts its
/// scores, the same IEEE subtraction as [`super::paired`], exactly.
#[derive(Debug, Serialize)]
struct PageData {
    title: String,
    scores: Vec<String>,
    labels: Vec<String>,
    methods: Vec<PageMethod>,
    subjects: Vec<String>,
    texts: Vec<String>,
    refs: Vec<String>,
    rows: Vec<serde_json::Value>,
}

/// How a score is named on the page.
fn score_label(name: &str) -> String {
    match name {
        "dino" => "DINO".into(),
        "clip_i" => "CLIP-I".into(),
        "clip_t" => "CLIP-T".into(),
        other => other.to_string(),
    }
}

/// A row's scores in the order of `names` (the three built-in ones, then the extras; `None`
/// where the row lacks an extra or the value is not finite).
fn scores_of(r: &ImageRow, names: &[String]) -> Vec<Option<f64>> {
    names
        .iter()
        .map(|n| match n.as_str() {
            "dino" => Some(r.dino),
            "clip_i" => Some(r.clip_i),
            "clip_t" => Some(r.clip_t),
            other => r.extra.get(other).copied(),
        })
        .map(|v| v.filter(|v| v.is_finite()))
        .collect()
}

/// `to` relative to the folder `from` (both existing), as `..`-and-names components; `to` itself
/// when the two share no root (another drive).
pub fn relative_path(from: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    let canon =
        |p: &Path| std::fs::canonicalize(p).with_context(|| format!("resolving '{}'", p.display()));
    let (from, to) = (canon(from)?, canon(to)?);
    let (a, b): (Vec<Component>, Vec<Component>) =
        (from.components().collect(), to.components().collect());
    if a.first() != b.first() {
        return Ok(to);
    }
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c.as_os_str());
    }
    Ok(out)
}

/// What the page needs of a report: where it goes, the runs its rows come from, the rows (image
/// paths relative to their run when there is one run, joined with it otherwise, as
/// [`super::write_report_with`] reads them), the methods and their summaries.
pub struct Explorer<'a> {
    pub dir: &'a Path,
    pub title: &'a str,
    pub runs: &'a [PathBuf],
    pub rows: &'a [ImageRow],
    pub infos: &'a [MethodInfo],
    pub summaries: &'a [MethodSummary],
}

/// Each row's image as a URL relative to the report folder.
fn image_urls(e: &Explorer) -> anyhow::Result<Vec<String>> {
    let prefixes: Vec<PathBuf> = e
        .runs
        .iter()
        .map(|r| relative_path(e.dir, r))
        .collect::<anyhow::Result<_>>()?;
    e.rows
        .iter()
        .map(|r| {
            let full = match e.runs {
                [one] => one.join(&r.image),
                _ => PathBuf::from(&r.image),
            };
            let rel = e
                .runs
                .iter()
                .zip(&prefixes)
                .find_map(|(run, prefix)| Some(prefix.join(full.strip_prefix(run).ok()?)));
            let rel = match rel {
                Some(rel) => rel,
                None => relative_path(e.dir, &full)
                    .with_context(|| format!("the image of row '{}'", r.id))?,
            };
            Ok(url_path(&rel))
        })
        .collect()
}

/// Writes each distinct reference image as a thumbnail `explore/ref-K-<subject>.jpg` beside the
/// page; returns the files and, per reference path, its index.
fn reference_thumbnails(
    dir: &Path,
    rows: &[ImageRow],
) -> anyhow::Result<(Vec<PathBuf>, BTreeMap<String, usize>)> {
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut files = Vec::new();
    for r in rows {
        if r.reference.is_empty() || index.contains_key(&r.reference) {
            continue;
        }
        let src = Path::new(&r.reference);
        let img = image::open(src)
            .with_context(|| format!("reading the reference image '{}'", src.display()))?;
        let thumb = img.thumbnail(REF_SIDE, REF_SIDE).to_rgb8();
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 88)
            .encode_image(&thumb)
            .with_context(|| format!("encoding a thumbnail of '{}'", src.display()))?;
        let path = dir
            .join(REFS)
            .join(format!("ref-{}-{}.jpg", index.len(), r.subject));
        write_file_atomic(&path, &bytes)?;
        index.insert(r.reference.clone(), files.len());
        files.push(path);
    }
    Ok((files, index))
}

/// The page's data (see [`PageData`]).
fn page_data(e: &Explorer, urls: &[String], refs: &BTreeMap<String, usize>) -> PageData {
    let mut scores: Vec<String> = ["dino", "clip_i", "clip_t"].map(String::from).to_vec();
    scores.extend(extra_names(e.rows));
    let methods: Vec<&MethodInfo> = e
        .infos
        .iter()
        .filter(|i| e.rows.iter().any(|r| r.method == i.name))
        .collect();
    let method_index: BTreeMap<&str, usize> = methods
        .iter()
        .enumerate()
        .map(|(k, m)| (m.name.as_str(), k))
        .collect();
    // The row each row is compared with (by id): the same job cell of its baseline.
    let mut paired_with: BTreeMap<&str, &str> = BTreeMap::new();
    let mut vs: BTreeMap<&str, usize> = BTreeMap::new();
    for s in e.summaries {
        let Some(b) = baseline_of(e.summaries, e.infos, s) else {
            continue;
        };
        if let Some(k) = method_index.get(b.method.as_str()) {
            vs.insert(s.method.as_str(), *k);
        }
        for (g, base) in super::paired::matched(e.rows, &s.method, &b.method) {
            paired_with.insert(g.id.as_str(), base.id.as_str());
        }
    }
    let mut subjects: Vec<String> = e.rows.iter().map(|r| r.subject.clone()).collect();
    subjects.sort();
    subjects.dedup();
    let mut texts: Vec<String> = Vec::new();
    let mut text_index: BTreeMap<String, usize> = BTreeMap::new();
    let mut text = |t: &str| -> usize {
        if let Some(k) = text_index.get(t) {
            return *k;
        }
        texts.push(t.to_string());
        text_index.insert(t.to_string(), texts.len() - 1);
        texts.len() - 1
    };
    let mut rows = Vec::with_capacity(e.rows.len());
    // Rows in the table's method order, then by subject, prompt and seed.
    let mut order: Vec<usize> = (0..e.rows.len())
        .filter(|k| method_index.contains_key(e.rows[*k].method.as_str()))
        .collect();
    order.sort_by_key(|k| {
        let r = &e.rows[*k];
        (
            method_index[r.method.as_str()],
            r.subject.clone(),
            r.prompt_index,
            r.seed,
        )
    });
    let position: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(at, k)| (e.rows[*k].id.as_str(), at))
        .collect();
    for k in order {
        let r = &e.rows[k];
        let paired = paired_with
            .get(r.id.as_str())
            .and_then(|b| position.get(b))
            .map_or(-1, |at| *at as i64);
        let subject = subjects.binary_search(&r.subject).expect("listed");
        let reference = refs.get(&r.reference).map_or(-1, |k| *k as i64);
        rows.push(serde_json::json!([
            method_index[r.method.as_str()],
            subject,
            r.prompt_index,
            r.seed,
            urls[k],
            text(&r.prompt),
            text(&r.clip_t_prompt),
            reference,
            r.id,
            scores_of(r, &scores),
            paired,
        ]));
    }
    PageData {
        title: e.title.to_string(),
        labels: scores.iter().map(|s| score_label(s)).collect(),
        scores,
        methods: methods
            .iter()
            .map(|m| PageMethod {
                name: m.name.clone(),
                label: m.label.clone(),
                vs: vs.get(m.name.as_str()).copied(),
            })
            .collect(),
        subjects,
        texts,
        refs: Vec::new(),
        rows,
    }
}

/// JSON that is safe inside a `<script>` element: `<`, `>` and `&` only occur in JSON strings,
/// where their `\u` escapes mean the same.
fn script_json(value: &impl Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string(value)?
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026"))
}

/// The page itself, from its data.
fn page_html(data: &PageData) -> anyhow::Result<String> {
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
<title>Explorer: {title}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n\
<header><h1>Results explorer</h1><p><a href=\"index.html\">Report</a> of {title}: \
<span id=\"total\">{n}</span> images, {m} methods, {s} subjects.</p></header>\n\
<noscript><p>This page needs JavaScript to list the images (nothing is loaded from the network).</p></noscript>\n\
<form id=\"controls\" autocomplete=\"off\">\n\
<label>View <select id=\"f-view\"><option value=\"grid\">thumbnails</option><option value=\"compare\">side by side</option></select></label>\n\
<label>Subject <select id=\"f-subject\"></select></label>\n\
<label>Prompt <select id=\"f-prompt\"></select></label>\n\
<label>Seed <select id=\"f-seed\"></select></label>\n\
<label>Sort by <select id=\"f-sort\"></select></label>\n\
<label>Order <select id=\"f-order\"><option value=\"desc\">highest first</option><option value=\"asc\">lowest first</option></select></label>\n\
<label>Per page <select id=\"f-size\"><option>50</option><option>100</option><option>200</option><option>500</option></select></label>\n\
<button type=\"button\" id=\"f-reset\">Reset</button>\n\
<fieldset id=\"f-methods\"><legend>Methods</legend></fieldset>\n\
</form>\n<p id=\"status\"></p>\n<nav class=\"pager\" id=\"pager\"></nav>\n<main id=\"grid\"></main>\n\
<section id=\"compare\"></section>\n<nav class=\"pager\" id=\"pager2\"></nav>\n\
<script type=\"application/json\" id=\"data\">{json}</script>\n<script>\n{SCRIPT}</script>\n</body>\n</html>\n",
        title = escape(&data.title),
        n = data.rows.len(),
        m = data.methods.len(),
        s = data.subjects.len(),
        json = script_json(data)?,
    ))
}

/// Writes `explore.html` (and the reference thumbnails under `explore/`) into the report folder;
/// returns the files written, the page first.
pub fn write_explorer(e: &Explorer) -> anyhow::Result<Vec<PathBuf>> {
    let urls = image_urls(e)?;
    let (thumbs, refs) = reference_thumbnails(e.dir, e.rows)?;
    let mut data = page_data(e, &urls, &refs);
    data.refs = thumbs
        .iter()
        .map(|t| url_path(t.strip_prefix(e.dir).unwrap_or(t)))
        .collect();
    let path = e.dir.join(PAGE);
    write_file_atomic(&path, page_html(&data)?.as_bytes())?;
    let mut files = vec![path];
    files.extend(thumbs);
    Ok(files)
}

/// The page for rows whose images and references are taken as given (no file is read): for
/// measuring the page on a synthetic run. `urls` are the rows' image URLs.
pub fn page_for(e: &Explorer, urls: &[String]) -> anyhow::Result<String> {
    page_html(&page_data(e, urls, &BTreeMap::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, image: &str) -> ImageRow {
        ImageRow {
            id: id.into(),
            method: "m".into(),
            baseline: "stable-diffusion".into(),
            guided: false,
            subject: "dog".into(),
            prompt_index: 0,
            seed: 0,
            prompt: "a <b> & c".into(),
            clip_t_prompt: String::new(),
            image: image.into(),
            reference: String::new(),
            dino: 0.5,
            clip_i: 0.5,
            clip_t: 0.5,
            extra: Default::default(),
            device: String::new(),
            dtype: String::new(),
            dino_max: None,
            timing: Default::default(),
        }
    }

    #[test]
    fn image_links_are_relative_to_the_page_for_one_run_or_several() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, out) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("x/out"),
        );
        for d in [&a, &b, &out] {
            std::fs::create_dir_all(d).unwrap();
        }
        let one = [a.clone()];
        let e = Explorer {
            dir: &a.join("report"),
            title: "t",
            runs: &one,
            rows: &[row("m__dog__p00__s0", "files/m+x__dog/image.png")],
            infos: &[],
            summaries: &[],
        };
        std::fs::create_dir_all(e.dir).unwrap();
        assert_eq!(image_urls(&e).unwrap(), ["../files/m%2Bx__dog/image.png"]);
        // Several runs: rows' images are joined with their run folder.
        let two = [a.clone(), b.clone()];
        let rows = [
            row("1", &a.join("files/1/image.png").display().to_string()),
            row("2", &b.join("files/2/image.png").display().to_string()),
        ];
        let e = Explorer {
            dir: &out,
            runs: &two,
            rows: &rows,
            ..e
        };
        assert_eq!(
            image_urls(&e).unwrap(),
            ["../../a/files/1/image.png", "../../b/files/2/image.png"]
        );
        assert_eq!(relative_path(&out, &out).unwrap(), PathBuf::new());
    }

    #[test]
    fn the_embedded_json_cannot_close_its_script() {
        let json = script_json(&serde_json::json!({"t": "</script><!-- & >"})).unwrap();
        assert!(!json.contains('<') && !json.contains('>') && !json.contains('&'));
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["t"], "</script><!-- & >");
    }
}
