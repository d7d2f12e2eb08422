//! `index.html`: the whole report on one self-contained page (no scripts, no external assets).
//! Its text comes from the same Markdown the report writes (header and warnings, the tables,
//! where the time went), turned into HTML by [`markdown_to_html`], which knows the subset of
//! Markdown the report uses; the plots and grids are the PNG files beside it, linked relatively,
//! so the folder can be moved or archived as a whole.

use std::fmt::Write;
use std::path::{Path, PathBuf};

/// What the page shows, in order: `head` (Markdown: title, provenance, jobs, gate), the `table`
/// (Markdown), the figures and grids (files in the report folder), `timing` (Markdown), and the
/// data files.
pub struct Page<'a> {
    pub dir: &'a Path,
    pub head: &'a str,
    pub table: &'a str,
    pub timing: &'a str,
    /// Written figures and grids (PNG and SVG); the page shows the PNGs and links the SVGs.
    pub images: &'a [PathBuf],
    /// Other files beside the page (tables, CSVs, Parquet), linked in a list.
    pub data: &'a [PathBuf],
    /// (name, label) of each method, in the table's order: grid sections are headed by label.
    pub methods: &'a [(String, String)],
}

/// The page's style sheet (also the profiles' page's, [`super::protocols`]).
pub const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;padding:0 16px;color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:4px}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #e4e4e4;padding-bottom:2px}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:10px 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f2f2f2}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fafafa}
blockquote{margin:12px 0;padding:8px 14px;border-left:5px solid #d9a400;background:#fff6d6}
code{background:#f0f0f0;padding:0 3px;border-radius:3px;font-size:90%;overflow-wrap:anywhere}
figure{margin:8px;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#444}
.figs figure{width:calc(50% - 20px)}
.grids figure{max-width:600px}";

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            '\'' => s.push_str("&#39;"),
            c => s.push(c),
        }
    }
    s
}

/// A relative path as a URL: each byte outside the unreserved set (letters, digits, `-._~`)
/// percent-encoded, segments joined by `/` (method names may hold `+`, subject names `_`).
pub fn url_path(rel: &Path) -> String {
    rel.components()
        .map(|c| {
            let mut s = String::new();
            for b in c.as_os_str().to_string_lossy().bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    s.push(b as char);
                } else {
                    let _ = write!(s, "%{b:02X}");
                }
            }
            s
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Inline Markdown: `**bold**` and `` `code` ``, the rest escaped.
fn inline(text: &str) -> String {
    let mut out = String::new();
    // Code spans first: their content is literal.
    for (k, part) in text.split('`').enumerate() {
        if k % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", escape(part));
            continue;
        }
        for (j, piece) in part.split("**").enumerate() {
            if j % 2 == 1 {
                let _ = write!(out, "<strong>{}</strong>", escape(piece));
            } else {
                out.push_str(&escape(piece));
            }
        }
    }
    out
}

/// The cells of a table line `| a | b |`, with `\|` as a literal bar.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("one cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("one cell").push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_string()).collect()
}

fn table(lines: &[&str]) -> String {
    let head = cells(lines[0]);
    let right: Vec<bool> = lines
        .get(1)
        .map(|l| cells(l).iter().map(|c| c.ends_with(':')).collect())
        .unwrap_or_default();
    let class = |k: usize| {
        if right.get(k).copied().unwrap_or(false) {
            " class=\"r\""
        } else {
            ""
        }
    };
    let mut s = String::from("<table>\n<thead><tr>");
    for (k, h) in head.iter().enumerate() {
        let _ = write!(s, "<th{}>{}</th>", class(k), inline(h));
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for line in lines.iter().skip(2) {
        s.push_str("<tr>");
        for (k, c) in cells(line).iter().enumerate() {
            let _ = write!(s, "<td{}>{}</td>", class(k), inline(c));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody>\n</table>\n");
    s
}

/// The Markdown the report writes, as HTML: `#`/`##`/`###` headings, `>` quotes, `-` lists
/// (nested by two spaces), `|` tables (a `---:` column right-aligned), paragraphs, and inline
/// bold and code. Anything else is kept as escaped paragraph text.
pub fn markdown_to_html(md: &str) -> String {
    let lines: Vec<&str> = md.lines().collect();
    let mut s = String::new();
    let mut k = 0;
    while k < lines.len() {
        let line = lines[k];
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            k += 1;
        } else if let Some(level) = ["### ", "## ", "# "]
            .iter()
            .position(|p| line.starts_with(p))
        {
            let n = 3 - level;
            let _ = writeln!(s, "<h{n}>{}</h{n}>", inline(&line[n + 1..]));
            k += 1;
        } else if trimmed.starts_with('|') {
            let start = k;
            while k < lines.len() && lines[k].trim_start().starts_with('|') {
                k += 1;
            }
            s.push_str(&table(&lines[start..k]));
        } else if let Some(rest) = line.strip_prefix('>') {
            let mut text = vec![rest.trim()];
            k += 1;
            while k < lines.len() {
                match lines[k].strip_prefix('>') {
                    Some(r) => text.push(r.trim()),
                    None => break,
                }
                k += 1;
            }
            let _ = writeln!(s, "<blockquote>{}</blockquote>", inline(&text.join(" ")));
        } else if trimmed.starts_with("- ") {
            // A list: depth from the indentation (two spaces a level).
            let mut depth = 0usize;
            while k < lines.len() && lines[k].trim_start().starts_with("- ") {
                let l = lines[k];
                let d = (l.len() - l.trim_start().len()) / 2 + 1;
                if d > depth {
                    for _ in depth..d {
                        s.push_str("<ul>\n<li>");
                    }
                } else {
                    for _ in d..depth {
                        s.push_str("</li>\n</ul>\n");
                    }
                    s.push_str("</li>\n<li>");
                }
                depth = d;
                s.push_str(&inline(&l.trim_start()[2..]));
                k += 1;
            }
            for _ in 0..depth {
                s.push_str("</li>\n</ul>\n");
            }
        } else {
            let mut text = vec![trimmed];
            k += 1;
            while k < lines.len() {
                let t = lines[k].trim_start();
                if t.is_empty()
                    || t.starts_with('#')
                    || t.starts_with('|')
                    || t.starts_with('>')
                    || t.starts_with("- ")
                {
                    break;
                }
                text.push(t);
                k += 1;
            }
            let _ = writeln!(s, "<p>{}</p>", inline(&text.join(" ")));
        }
    }
    s
}

/// How a figure is named on the page, from its file stem.
fn figure_caption(stem: &str) -> String {
    let metric = |m: &str| {
        match m {
            "dino" => "DINO",
            "clip_i" => "CLIP-I",
            "clip_t" => "CLIP-T",
            other => other,
        }
        .to_string()
    };
    if let Some(m) = stem.strip_prefix("pareto_") {
        format!("{} vs CLIP-T (means, 95% intervals)", metric(m))
    } else if let Some(m) = stem.strip_prefix("subjects_") {
        format!("{} per subject", metric(m))
    } else {
        stem.to_string()
    }
}

/// One figure: the PNG, linked to its SVG when there is one.
fn figure(dir: &Path, png: &Path, images: &[PathBuf], caption: &str) -> String {
    let rel = |p: &Path| url_path(p.strip_prefix(dir).unwrap_or(p));
    let svg = png.with_extension("svg");
    let svg_link = if images.contains(&svg) {
        format!(" (<a href=\"{}\">SVG</a>)", rel(&svg))
    } else {
        String::new()
    };
    format!(
        "<figure><a href=\"{0}\"><img src=\"{0}\" alt=\"{1}\" loading=\"lazy\"></a><figcaption>{1}{svg_link}</figcaption></figure>\n",
        rel(png),
        escape(caption)
    )
}

/// The page: the header, the table, the Pareto plots, the per-subject bars, the grids (by
/// method, then subject), where the time went, and the files.
pub fn page(p: &Page) -> String {
    let title = p
        .head
        .lines()
        .next()
        .unwrap_or("Report")
        .trim_start_matches("# ");
    let pngs: Vec<&PathBuf> = p
        .images
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .collect();
    let stem = |f: &Path| {
        f.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let in_grids = |f: &Path| {
        f.parent()
            .and_then(|d| d.file_name())
            .is_some_and(|n| n == "grids")
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>\n",
        escape(title)
    );
    s.push_str(&markdown_to_html(p.head));
    if p.dir.join(super::explore::PAGE).is_file() {
        let _ = writeln!(
            s,
            "<p><strong><a href=\"{}\">Results explorer</a></strong>: every image of the run, filtered, sorted by any score, and every method side by side on one subject, prompt and seed.</p>",
            super::explore::PAGE
        );
    }
    s.push_str("<h2>Table</h2>\n");
    s.push_str(&markdown_to_html(p.table));
    for (heading, prefix) in [("Pareto plots", "pareto_"), ("Per subject", "subjects_")] {
        let figs: Vec<&&PathBuf> = pngs
            .iter()
            .filter(|f| !in_grids(f) && stem(f).starts_with(prefix))
            .collect();
        if figs.is_empty() {
            continue;
        }
        let _ = writeln!(s, "<h2>{heading}</h2>\n<div class=\"figs\">");
        for f in figs {
            s.push_str(&figure(p.dir, f, p.images, &figure_caption(&stem(f))));
        }
        s.push_str("</div>\n");
    }
    let grids: Vec<&&PathBuf> = pngs.iter().filter(|f| in_grids(f)).collect();
    if !grids.is_empty() {
        s.push_str("<h2>Image grids</h2>\n<p>Per subject: a real image, the baseline and the guided method on the same prompt and seed.</p>\n");
        // Grids are named `<subject>__<method>.png`: one section per method, in the table's order.
        let method_of = |f: &Path| stem(f).split_once("__").map(|(_, m)| m.to_string());
        for (name, label) in p.methods {
            let mine: Vec<&&PathBuf> = grids
                .iter()
                .copied()
                .filter(|f| method_of(f).as_ref() == Some(name))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let _ = writeln!(s, "<h3>{}</h3>\n<div class=\"grids\">", escape(label));
            for f in mine {
                let st = stem(f);
                let subject = st.split_once("__").map(|(a, _)| a).unwrap_or(&st);
                s.push_str(&figure(p.dir, f, p.images, subject));
            }
            s.push_str("</div>\n");
        }
    }
    s.push_str(&markdown_to_html(p.timing));
    s.push_str("<h2>Files</h2>\n<ul>\n");
    for f in p.data {
        let name = f.strip_prefix(p.dir).unwrap_or(f);
        let _ = writeln!(
            s,
            "<li><a href=\"{}\">{}</a></li>",
            url_path(name),
            escape(&name.display().to_string())
        );
    }
    s.push_str("</ul>\n</body>\n</html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_subset_becomes_html() {
        let md = "# Report of experiment 'a<b'\n\n- Build: x\n- Models:\n  - dino: `m` r\n- Jobs: 1\n\n> **Warning (oracle gate):** off\n\n| Method | DINO ↑ |\n|---|---:|\n| a \\| b | 0.5 |\n\nSome text\non two lines.\n";
        let html = markdown_to_html(md);
        assert_eq!(
            html,
            "<h1>Report of experiment &#39;a&lt;b&#39;</h1>\n\
             <ul>\n<li>Build: x</li>\n<li>Models:<ul>\n<li>dino: <code>m</code> r</li>\n</ul>\n</li>\n<li>Jobs: 1</li>\n</ul>\n\
             <blockquote><strong>Warning (oracle gate):</strong> off</blockquote>\n\
             <table>\n<thead><tr><th>Method</th><th class=\"r\">DINO ↑</th></tr></thead>\n<tbody>\n<tr><td>a | b</td><td class=\"r\">0.5</td></tr>\n</tbody>\n</table>\n\
             <p>Some text on two lines.</p>\n"
        );
    }

    #[test]
    fn paths_are_percent_encoded_by_segment() {
        assert_eq!(
            url_path(Path::new("grids/dog__db+pnd.png")),
            "grids/dog__db%2Bpnd.png"
        );
        assert_eq!(url_path(Path::new("a b/é.png")), "a%20b/%C3%A9.png");
    }
}
