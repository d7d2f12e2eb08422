//! `explore.html` in a real browser (issue 27, item 4): headless Chromium loads a demo run's
//! page with a filter in the URL fragment, and the rendered DOM must show exactly the images the
//! filter names, with the scores of `results.csv` and the paired differences the report defines
//! (the image's score minus its baseline's on the same subject, prompt and seed). A synthetic
//! run of 24,000 images measures the page: its size, and the elements one page of thumbnails
//! puts in the DOM.
//!
//! Chromium: Debian's `chromium` (`.ci/run` installs it). Without it these tests fail under CI
//! (`CI` set) and are skipped with a message elsewhere.

mod common;

use runner::report::explore::{page_for, Explorer};
use runner::report::rows::ImageRow;
use runner::report::tables::MethodInfo;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The browser, or `None` (with a message) where it may be missing: not under CI.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "CI is set and no `chromium` is on PATH: `.ci/run` installs it (apt-get install -y chromium)"
        );
        eprintln!(
            "SKIPPED: no `chromium` on PATH (apt-get install -y chromium); the explorer's browser test did not run"
        );
    }
    found
}

/// The DOM of `url` after its scripts ran, as headless Chromium serializes it.
fn dump_dom(browser: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("chromium did not finish loading '{url}' in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dom = reader.join().unwrap();
    assert!(
        dom.contains("</html>"),
        "no DOM from chromium for '{url}':\n{dom}"
    );
    dom
}

/// A `file://` URL of `page` with `fragment`.
fn url(page: &Path, fragment: &str) -> String {
    let page = page.canonicalize().unwrap();
    format!("file://{}#{fragment}", page.display())
}

/// An element's start tag as the DOM serializes it: its name, attributes, and the text right
/// after it (up to the next tag).
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
    text: String,
}

impl Tag {
    fn has_class(&self, class: &str) -> bool {
        self.attrs
            .get("class")
            .is_some_and(|c| c.split(' ').any(|x| x == class))
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Every start tag of `dom` in order (enough HTML for what Chromium writes: quoted attributes,
/// no `>` inside them; the contents of scripts and style sheets skipped).
fn tags(dom: &str) -> Vec<Tag> {
    let mut out: Vec<Tag> = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        let end = rest.find('>').expect("a closed tag");
        let inner = &rest[..end];
        rest = &rest[end + 1..];
        if inner.starts_with('/') || inner.starts_with('!') {
            continue;
        }
        let (name, mut attrs_text) = inner.split_at(inner.find([' ', '/']).unwrap_or(inner.len()));
        let mut attrs = BTreeMap::new();
        loop {
            attrs_text = attrs_text.trim_start_matches([' ', '/']);
            let Some(eq) = attrs_text.find('=') else {
                break;
            };
            let key = attrs_text[..eq].trim().to_string();
            let after = &attrs_text[eq + 1..];
            assert!(after.starts_with('"'), "unquoted attribute in <{inner}>");
            let close = after[1..].find('"').unwrap() + 1;
            attrs.insert(key, unescape(&after[1..close]));
            attrs_text = &after[close + 1..];
        }
        if name == "script" || name == "style" {
            let close = format!("</{name}>");
            rest = &rest[rest.find(&close).expect("a closed script")..];
        }
        let text = unescape(&rest[..rest.find('<').unwrap_or(rest.len())]);
        out.push(Tag {
            name: name.to_string(),
            attrs,
            text,
        });
    }
    out
}

/// One thumbnail or column as rendered: the job id and, per metric, the score and paired
/// difference shown (text and full value).
#[derive(Debug, Default)]
struct Shown {
    id: String,
    src: String,
    scores: BTreeMap<String, (String, f64)>,
    deltas: BTreeMap<String, (String, f64)>,
}

/// The images of a rendered page: cards (`.card`) or columns (`figure.col` with an id).
fn shown(dom: &str) -> Vec<Shown> {
    let mut out: Vec<Shown> = Vec::new();
    for t in tags(dom) {
        if (t.has_class("card") || t.name == "figure") && t.attrs.contains_key("data-id") {
            out.push(Shown {
                id: t.attrs["data-id"].clone(),
                ..Default::default()
            });
        }
        let Some(cur) = out.last_mut() else { continue };
        if (t.has_class("thumb") || t.has_class("full")) && cur.src.is_empty() {
            cur.src = t.attrs["src"].clone();
        }
        for (class, map) in [("score", &mut cur.scores), ("delta", &mut cur.deltas)] {
            if t.has_class(class) {
                if let Some(m) = t.attrs.get("data-metric") {
                    let v: f64 = t.attrs["data-v"].parse().unwrap();
                    map.insert(m.clone(), (t.text.clone(), v));
                }
            }
        }
    }
    out
}

/// The text of the element with `id`.
fn text_of(dom: &str, id: &str) -> String {
    tags(dom)
        .into_iter()
        .find(|t| t.attrs.get("id").is_some_and(|i| i == id))
        .unwrap_or_else(|| panic!("no #{id}"))
        .text
}

struct Demo {
    run: PathBuf,
    report: PathBuf,
    rows: Vec<ImageRow>,
    _tmp: tempfile::TempDir,
}

/// The demo (tiny models, mini benchmark; Stable Diffusion without and with Pick-and-Draw), run
/// once for this file's tests.
fn demo() -> &'static Demo {
    static DEMO: OnceLock<Demo> = OnceLock::new();
    DEMO.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let tokenizer = tmp.path().join("clip-tokenizer");
        clip_tokenizer::write_builtin(&tokenizer).unwrap();
        let out = runner::demo::run_demo(
            &tmp.path().join("demo"),
            Some(&tokenizer),
            false,
            &Default::default(),
        )
        .unwrap();
        let mut r = csv::Reader::from_path(out.run_dir.join("results.csv")).unwrap();
        let rows = r
            .deserialize::<ImageRow>()
            .map(|row| row.unwrap())
            .collect();
        Demo {
            run: out.run_dir,
            report: out.report_dir,
            rows,
            _tmp: tmp,
        }
    })
}

/// `results.csv`'s score of `row` on `metric`.
fn score(row: &ImageRow, metric: &str) -> f64 {
    match metric {
        "dino" => row.dino,
        "clip_i" => row.clip_i,
        "clip_t" => row.clip_t,
        other => row.extra[other],
    }
}

/// What a rendered image shows against `results.csv`: the row it names, each score (the full
/// value exactly, the text to 4 decimals), and for a guided image its difference from the
/// unguided image of the same subject, prompt and seed.
fn check_against_results(d: &Demo, s: &Shown) {
    let row = d
        .rows
        .iter()
        .find(|r| r.id == s.id)
        .unwrap_or_else(|| panic!("{} is not in results.csv", s.id));
    assert_eq!(
        s.src,
        format!("../{}", row.image.replace('+', "%2B")),
        "{}: image link",
        s.id
    );
    assert!(
        d.report.join(&s.src.replace("%2B", "+")).is_file(),
        "{}",
        s.src
    );
    assert_eq!(
        s.scores.keys().collect::<Vec<_>>(),
        ["clip_i", "clip_t", "dino"],
        "{}",
        s.id
    );
    for (metric, (text, v)) in &s.scores {
        let want = score(row, metric);
        assert_eq!(*v, want, "{} {metric}", s.id);
        assert_eq!(*text, format!("{want:.4}"), "{} {metric}", s.id);
    }
    if row.guided {
        let base = d
            .rows
            .iter()
            .find(|b| {
                !b.guided
                    && (&b.subject, b.prompt_index, b.seed)
                        == (&row.subject, row.prompt_index, row.seed)
            })
            .expect("a baseline image");
        assert_eq!(s.deltas.len(), 3, "{}", s.id);
        for (metric, (text, v)) in &s.deltas {
            let want = score(row, metric) - score(base, metric);
            assert_eq!(*v, want, "{} Δ{metric}", s.id);
            assert_eq!(*text, format!("{want:+.4}"), "{} Δ{metric}", s.id);
        }
    } else {
        assert!(s.deltas.is_empty(), "{}: {:?}", s.id, s.deltas);
    }
}

#[test]
fn a_filter_in_the_fragment_shows_its_images_with_the_scores_of_results_csv() {
    let Some(browser) = chromium() else { return };
    let d = demo();
    let page = d.report.join("explore.html");
    let index = std::fs::read_to_string(d.report.join("index.html")).unwrap();
    assert!(index.contains("href=\"explore.html\""), "not linked");
    let subjects: Vec<String> = {
        let mut s: Vec<String> = d.rows.iter().map(|r| r.subject.clone()).collect();
        s.sort();
        s.dedup();
        s
    };
    assert_eq!(d.rows.len(), 12);

    // No filter: every image of the run, in one page.
    let dom = dump_dom(&browser, &url(&page, ""));
    let all = shown(&dom);
    assert_eq!(all.len(), 12, "{dom}");
    assert_eq!(text_of(&dom, "count"), "12");
    for s in &all {
        check_against_results(d, s);
    }

    // One subject, the guided method: its images only.
    let subject = &subjects[1];
    let dom = dump_dom(
        &browser,
        &url(&page, &format!("subject={subject}&method=sd%2Bpnd")),
    );
    let got = shown(&dom);
    let want: Vec<&ImageRow> = d
        .rows
        .iter()
        .filter(|r| &r.subject == subject && r.method == "sd+pnd")
        .collect();
    assert_eq!(got.len(), want.len(), "{dom}");
    assert_eq!(text_of(&dom, "count"), want.len().to_string());
    assert!(got.iter().all(|s| want.iter().any(|r| r.id == s.id)));
    for s in &got {
        check_against_results(d, s);
    }

    // Sorted by DINO, lowest first, both methods of one prompt.
    let dom = dump_dom(&browser, &url(&page, "prompt=20&sort=dino&order=asc"));
    let got = shown(&dom);
    assert_eq!(got.len(), 6, "{dom}");
    let dino: Vec<f64> = got.iter().map(|s| s.scores["dino"].1).collect();
    assert!(dino.windows(2).all(|w| w[0] <= w[1]), "{dino:?}");
    // Sorted by the paired difference: the guided images, largest gain first, then the rest.
    let dom = dump_dom(&browser, &url(&page, "sort=delta%3Aclip_t"));
    let got = shown(&dom);
    let deltas: Vec<f64> = got
        .iter()
        .take_while(|s| !s.deltas.is_empty())
        .map(|s| s.deltas["clip_t"].1)
        .collect();
    assert_eq!(deltas.len(), 6);
    assert!(deltas.windows(2).all(|w| w[0] >= w[1]), "{deltas:?}");

    // Side by side: one cell, every method, the reference first.
    let row = d.rows.iter().find(|r| r.method == "sd+pnd").unwrap();
    let dom = dump_dom(
        &browser,
        &url(
            &page,
            &format!(
                "view=compare&subject={}&prompt={}&seed={}",
                row.subject, row.prompt_index, row.seed
            ),
        ),
    );
    let cols = shown(&dom);
    assert_eq!(
        cols.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [
            format!(
                "sd__{}__p{:02}__s{}",
                row.subject, row.prompt_index, row.seed
            ),
            row.id.clone()
        ],
        "{dom}"
    );
    for s in &cols {
        check_against_results(d, s);
    }
    let refs: Vec<Tag> = tags(&dom)
        .into_iter()
        .filter(|t| t.name == "img" && t.has_class("ref"))
        .collect();
    assert_eq!(refs.len(), 1, "{dom}");
    let thumb = d.report.join(&refs[0].attrs["src"]);
    assert!(image::open(&thumb).is_ok(), "{}", thumb.display());
    assert!(d.run.join("results.csv").is_file());
}

/// A run copied elsewhere (a cluster's run folder fetched whole): the page still finds every
/// image, because every link is relative and inside the copy.
#[test]
fn the_page_of_a_copied_run_finds_its_images() {
    let Some(browser) = chromium() else { return };
    let d = demo();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copied-run");
    testdata::copy_tree(&d.run, &copy);
    let dom = dump_dom(&browser, &url(&copy.join("report/explore.html"), "seed=0"));
    let got = shown(&dom);
    assert_eq!(got.len(), 12);
    for s in got {
        let file = copy.join("report").join(s.src.replace("%2B", "+"));
        assert!(file.is_file(), "{}", file.display());
        assert!(
            !s.src.starts_with('/') && !s.src.contains("://"),
            "{}",
            s.src
        );
    }
}

/// Table 1's scale: 8 methods × 30 subjects × 25 prompts × 4 seeds = 24,000 images. The page
/// embeds them all as one JSON blob and puts one page of thumbnails in the DOM; paging shows the
/// next ones.
#[test]
fn a_run_of_24000_images_is_one_page_of_bounded_size_and_dom() {
    let methods = [
        ("sd", "stable-diffusion", false),
        ("sd+pnd", "stable-diffusion", true),
        ("ti", "textual-inversion", false),
        ("ti+pnd", "textual-inversion", true),
        ("db", "dreambooth", false),
        ("db+pnd", "dreambooth", true),
        ("blip", "blip-diffusion", false),
        ("blip+pnd", "blip-diffusion", true),
    ];
    let subjects: Vec<&str> = dreambench::SUBJECTS.iter().map(|s| s.name).collect();
    assert_eq!(subjects.len(), 30);
    let mut rows = Vec::new();
    for (mi, (m, b, g)) in methods.iter().enumerate() {
        for (si, s) in subjects.iter().enumerate() {
            for p in 0..25usize {
                for seed in 0..4u64 {
                    let id = format!("{m}__{s}__p{p:02}__s{seed}");
                    let x = ((mi * 7919 + si * 104_729 + p * 31 + seed as usize) % 1000) as f64;
                    rows.push(ImageRow {
                        id: id.clone(),
                        method: m.to_string(),
                        baseline: b.to_string(),
                        guided: *g,
                        subject: s.to_string(),
                        prompt_index: p,
                        seed,
                        prompt: format!("a sks {s} in scene {p}"),
                        clip_t_prompt: format!("a {s} in scene {p}"),
                        image: format!("files/{id}/image.png"),
                        reference: String::new(),
                        dino: 0.3 + x / 2000.0,
                        clip_i: 0.6 + x / 3000.0,
                        clip_t: 0.25 + x / 10000.0,
                        extra: Default::default(),
                        device: "cuda:0".into(),
                        dtype: "f16".into(),
                        dino_max: None,
                        timing: Default::default(),
                    });
                }
            }
        }
    }
    assert_eq!(rows.len(), 24_000);
    let infos: Vec<MethodInfo> = methods
        .iter()
        .map(|(n, b, g)| MethodInfo {
            name: n.to_string(),
            label: n.to_string(),
            baseline: b.to_string(),
            guided: *g,
            compare_to: None,
        })
        .collect();
    let names: Vec<String> = infos.iter().map(|i| i.name.clone()).collect();
    let summaries = runner::report::aggregate::by_method(&rows, &names, 0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let urls: Vec<String> = rows.iter().map(|r| format!("../{}", r.image)).collect();
    let started = Instant::now();
    let html = page_for(
        &Explorer {
            dir: tmp.path(),
            title: "experiment 'table1'",
            runs: &[tmp.path().join("..")],
            rows: &rows,
            infos: &infos,
            summaries: &summaries,
        },
        &urls,
    )
    .unwrap();
    let built = started.elapsed();
    let page = tmp.path().join("explore.html");
    std::fs::write(&page, &html).unwrap();
    let bytes = html.len();
    eprintln!(
        "24,000 images: explore.html is {bytes} bytes ({:.2} MB), written in {:.2} s",
        bytes as f64 / 1e6,
        built.as_secs_f64()
    );
    assert!(bytes < 8_000_000, "{bytes} bytes");
    let Some(browser) = chromium() else { return };
    let started = Instant::now();
    let dom = dump_dom(&browser, &url(&page, "page=3&size=100&method=db%2Bpnd"));
    let elements = tags(&dom).len();
    eprintln!(
        "24,000 images, one page of 100 thumbnails: {elements} elements in the DOM, {} bytes of DOM, chromium done in {:.1} s",
        dom.len(),
        started.elapsed().as_secs_f64()
    );
    let got = shown(&dom);
    assert_eq!(got.len(), 100);
    assert_eq!(text_of(&dom, "count"), "3000");
    // Page 3 of db+pnd in run order: its images 200..300.
    let want: Vec<&String> = rows
        .iter()
        .filter(|r| r.method == "db+pnd")
        .skip(200)
        .take(100)
        .map(|r| &r.id)
        .collect();
    assert_eq!(got.iter().map(|s| &s.id).collect::<Vec<_>>(), want);
    assert!(elements < 3000, "{elements} elements");
    // Every thumbnail is lazy.
    let imgs: Vec<Tag> = tags(&dom)
        .into_iter()
        .filter(|t| t.has_class("thumb"))
        .collect();
    assert_eq!(imgs.len(), 100);
    assert!(imgs
        .iter()
        .all(|t| t.attrs.get("loading").is_some_and(|l| l == "lazy")));
}
