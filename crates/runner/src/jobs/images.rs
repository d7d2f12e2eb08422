//! Images made by another program (baseline `images`, and `pnd eval`): where each job's image is,
//! from a path template or a manifest, or found in a folder laid out as
//! `<subject>/<prompt index>-s<seed>.<png|jpg>`. Every bad input is one error that names the file,
//! the line or the name at fault; nothing is scored before the whole set is known to be readable.

use crate::experiment::MethodSpec;
use anyhow::{bail, Context};
use dreambench::Job;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image of a method: which job it answers and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    pub subject: String,
    pub prompt_index: usize,
    pub seed: u64,
    pub path: PathBuf,
    /// The prompt the method generated it from, when a manifest says.
    pub prompt: Option<String>,
}

impl ImageEntry {
    /// The job this image answers, for `method`.
    pub fn job(&self, method: &str) -> Job {
        Job {
            method: method.to_string(),
            subject: self.subject.clone(),
            prompt_index: self.prompt_index,
            seed: self.seed,
        }
    }

    pub(crate) fn key(&self) -> (String, usize, u64) {
        (self.subject.clone(), self.prompt_index, self.seed)
    }
}

const PLACEHOLDERS: [&str; 4] = ["{subject}", "{prompt}", "{prompt:02}", "{seed}"];

fn is_manifest(images: &str) -> bool {
    images.to_ascii_lowercase().ends_with(".csv")
}

/// Checks an `images` value: a manifest `.csv`, or a template naming the subject, the prompt
/// index and the seed with known placeholders only.
pub fn check_template(template: &str) -> Result<(), String> {
    if is_manifest(template) {
        return Ok(());
    }
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("images template '{template}': an unclosed '{{'"))?;
        let name = &rest[open..open + close + 1];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "images template '{template}': unknown placeholder {name} (known: {})",
                PLACEHOLDERS.join(", ")
            ));
        }
        rest = &rest[open + close + 1..];
    }
    let has = |p: &str| template.contains(p);
    if !(has("{subject}") && (has("{prompt}") || has("{prompt:02}")) && has("{seed}")) {
        return Err(format!(
            "images template '{template}' must name {{subject}}, {{prompt}} (or {{prompt:02}}) and {{seed}}, so each job has its own file"
        ));
    }
    Ok(())
}

/// The template's path for one job.
pub fn render_template(template: &str, job: &Job) -> PathBuf {
    PathBuf::from(
        template
            .replace("{subject}", &job.subject)
            .replace("{prompt:02}", &format!("{:02}", job.prompt_index))
            .replace("{prompt}", &job.prompt_index.to_string())
            .replace("{seed}", &job.seed.to_string()),
    )
}

/// A subject name of DreamBench and a prompt index in range, or the error naming `place`.
fn check_job_keys(subject: &str, prompt_index: usize, place: &str) -> anyhow::Result<()> {
    if dreambench::subject(subject).is_none() {
        bail!("{place}: unknown subject '{subject}' (see `pnd dataset list`)");
    }
    if prompt_index >= 25 {
        bail!("{place}: prompt index {prompt_index} out of range 0..25");
    }
    Ok(())
}

fn no_duplicates(entries: &[ImageEntry]) -> anyhow::Result<()> {
    let mut seen: BTreeMap<(String, usize, u64), &Path> = BTreeMap::new();
    for e in entries {
        if let Some(first) = seen.insert(e.key(), &e.path) {
            bail!(
                "two images for subject '{}', prompt {}, seed {}: '{}' and '{}'",
                e.subject,
                e.prompt_index,
                e.seed,
                first.display(),
                e.path.display()
            );
        }
    }
    Ok(())
}

/// Reads a manifest: a CSV with a header naming the columns `subject`, `prompt_index`, `seed`,
/// `path` and optionally `prompt` (any order); relative paths are relative to the manifest's
/// folder. Errors name the manifest and the line.
pub fn read_manifest(manifest: &Path) -> anyhow::Result<Vec<ImageEntry>> {
    let name = manifest.display();
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(manifest)
        .with_context(|| format!("reading manifest '{name}'"))?;
    let header = reader
        .headers()
        .with_context(|| format!("reading the header of manifest '{name}'"))?
        .clone();
    let column = |c: &str| header.iter().position(|h| h == c);
    let mut required = Vec::new();
    for c in ["subject", "prompt_index", "seed", "path"] {
        match column(c) {
            Some(i) => required.push(i),
            None => bail!(
                "manifest '{name}': no column '{c}' in the header (want subject,prompt_index,seed,path[,prompt]; got {})",
                header.iter().collect::<Vec<_>>().join(",")
            ),
        }
    }
    let prompt = column("prompt");
    let folder = manifest.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let place = format!("manifest '{name}' line {line}");
        let record = record.with_context(|| place.clone())?;
        let cell = |k: usize| record.get(required[k]).unwrap_or_default();
        let prompt_index: usize = cell(1)
            .parse()
            .map_err(|_| anyhow::anyhow!("{place}: prompt_index '{}' is not a number", cell(1)))?;
        let seed: u64 = cell(2)
            .parse()
            .map_err(|_| anyhow::anyhow!("{place}: seed '{}' is not a number", cell(2)))?;
        check_job_keys(cell(0), prompt_index, &place)?;
        if cell(3).is_empty() {
            bail!("{place}: empty path");
        }
        entries.push(ImageEntry {
            subject: cell(0).to_string(),
            prompt_index,
            seed,
            path: folder.join(cell(3)),
            prompt: prompt
                .and_then(|k| record.get(k))
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        });
    }
    if entries.is_empty() {
        bail!("manifest '{name}' lists no images");
    }
    no_duplicates(&entries)?;
    Ok(entries)
}

fn image_extension(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    matches!(ext.as_str(), "png" | "jpg" | "jpeg").then_some(ext)
}

/// `3-s0` or `03-s0`: (prompt index, seed).
fn parse_stem(stem: &str) -> Option<(usize, u64)> {
    let (p, s) = stem.split_once("-s")?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(p) || !digits(s) {
        return None;
    }
    Some((p.parse().ok()?, s.parse().ok()?))
}

/// What a folder of images holds.
#[derive(Debug, Clone, Default)]
pub struct FolderScan {
    pub entries: Vec<ImageEntry>,
    /// Files that are not images (`.txt`, hidden files): left alone, listed.
    pub ignored: Vec<PathBuf>,
}

/// Finds the images of a folder laid out as `<subject>/<prompt index>-s<seed>.<png|jpg|jpeg>`
/// (prompt index plain or zero-padded). A subject folder DreamBench does not have, an image
/// named otherwise, an out-of-range prompt index, an image outside a subject folder or two
/// images of one job are errors.
pub fn scan_folder(root: &Path) -> anyhow::Result<FolderScan> {
    let read = |dir: &Path| -> anyhow::Result<Vec<PathBuf>> {
        let mut v = std::fs::read_dir(dir)
            .with_context(|| format!("reading folder '{}'", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading folder '{}'", dir.display()))?;
        v.sort();
        Ok(v)
    };
    let hidden = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
    };
    let mut scan = FolderScan::default();
    for path in read(root)? {
        if hidden(&path) {
            scan.ignored.push(path);
            continue;
        }
        if !path.is_dir() {
            if image_extension(&path).is_some() {
                bail!(
                    "image '{}' is not in a subject folder: the layout is <subject>/<prompt index>-s<seed>.png (or give a manifest CSV)",
                    path.display()
                );
            }
            scan.ignored.push(path);
            continue;
        }
        let subject = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if dreambench::subject(&subject).is_none() {
            bail!(
                "folder '{}': unknown subject '{subject}' (the layout is <subject>/<prompt index>-s<seed>.png with DreamBench's subject names; see `pnd dataset list`)",
                path.display()
            );
        }
        for file in read(&path)? {
            if hidden(&file) || file.is_dir() || image_extension(&file).is_none() {
                scan.ignored.push(file);
                continue;
            }
            let stem = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let Some((prompt_index, seed)) = parse_stem(stem) else {
                bail!(
                    "image '{}' is not named <prompt index>-s<seed>.<png|jpg> (e.g. 3-s0.png); rename it or give a manifest CSV",
                    file.display()
                );
            };
            check_job_keys(
                &subject,
                prompt_index,
                &format!("image '{}'", file.display()),
            )?;
            scan.entries.push(ImageEntry {
                subject: subject.clone(),
                prompt_index,
                seed,
                path: file,
                prompt: None,
            });
        }
    }
    if scan.entries.is_empty() {
        bail!(
            "no images in '{}' (the layout is <subject>/<prompt index>-s<seed>.png)",
            root.display()
        );
    }
    no_duplicates(&scan.entries)?;
    Ok(scan)
}

/// Whether a file is an image this harness reads: it exists, has a PNG or JPEG extension, and
/// decodes whole (a header alone is not enough: a truncated or corrupt body would stop a run
/// partway). Returns its width and height; the error names the file.
pub fn check_readable(path: &Path) -> anyhow::Result<(u32, u32)> {
    if image_extension(path).is_none() {
        bail!("'{}' is not a .png, .jpg or .jpeg image", path.display());
    }
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot read image '{}'", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image '{}'", path.display()))?;
    let img = reader
        .decode()
        .with_context(|| format!("'{}' is not a readable image", path.display()))?;
    Ok((img.width(), img.height()))
}

/// Where the images of one `images` method are.
#[derive(Debug, Clone)]
pub enum ImageSources {
    Template(String),
    Manifest(BTreeMap<(String, usize, u64), ImageEntry>),
}

impl ImageSources {
    /// The sources of a method of baseline `images` (its manifest read now).
    pub fn open(method: &MethodSpec) -> anyhow::Result<Self> {
        let Some(images) = &method.images else {
            bail!("baseline \"images\" needs `images` = a path template or a manifest .csv")
        };
        if is_manifest(images) {
            let entries = read_manifest(Path::new(images))?;
            Ok(Self::Manifest(
                entries.into_iter().map(|e| (e.key(), e)).collect(),
            ))
        } else {
            check_template(images).map_err(anyhow::Error::msg)?;
            Ok(Self::Template(images.clone()))
        }
    }

    /// The image of a job and the prompt it was made from (when known).
    pub fn source(&self, job: &Job) -> anyhow::Result<(PathBuf, Option<String>)> {
        match self {
            Self::Template(t) => Ok((render_template(t, job), None)),
            Self::Manifest(m) => {
                let e = m
                    .get(&(job.subject.clone(), job.prompt_index, job.seed))
                    .with_context(|| format!("the manifest has no image for job {}", job.id()))?;
                Ok((e.path.clone(), e.prompt.clone()))
            }
        }
    }

    /// Every job of `method` among `jobs` has a readable image; the missing ones are listed (the
    /// first ten and a count). With `allow_missing` (`pnd eval`, which lists them itself) the
    /// jobs without an image are returned instead.
    pub fn check(
        &self,
        method: &MethodSpec,
        jobs: &[Job],
        allow_missing: bool,
    ) -> anyhow::Result<Vec<Job>> {
        let mut missing = Vec::new();
        let mut named = Vec::new();
        for job in jobs.iter().filter(|j| j.method == method.name) {
            match self.source(job) {
                Ok((path, _)) if path.is_file() => {
                    check_readable(&path)?;
                }
                Ok((path, _)) => {
                    named.push(format!("{} ('{}')", job.id(), path.display()));
                    missing.push(job.clone());
                }
                Err(e) => {
                    named.push(format!("{e}"));
                    missing.push(job.clone());
                }
            }
        }
        if !named.is_empty() && !allow_missing {
            let n = named.len();
            named.truncate(10);
            bail!(
                "{n} image(s) missing (`pnd eval` scores a partial set): {}{}",
                named.join(", "),
                if n > 10 { ", ..." } else { "" }
            );
        }
        Ok(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn templates_name_every_part_of_a_job() {
        assert!(check_template("x/{subject}/{prompt}-s{seed}.png").is_ok());
        assert!(check_template("x/{subject}_{prompt:02}_{seed}.jpg").is_ok());
        assert!(check_template("list.CSV").is_ok());
        let e = check_template("x/{subject}/{prompt}.png").unwrap_err();
        assert!(e.contains("{seed}"), "{e}");
        let e = check_template("x/{subj}/{prompt}-s{seed}.png").unwrap_err();
        assert!(e.contains("unknown placeholder {subj}"), "{e}");
        let job = Job {
            method: "m".into(),
            subject: "dog".into(),
            prompt_index: 3,
            seed: 2,
        };
        assert_eq!(
            render_template("a/{subject}/{prompt:02}-{prompt}-s{seed}.png", &job),
            PathBuf::from("a/dog/03-3-s2.png")
        );
    }

    #[test]
    fn a_folder_layout_is_found_and_bad_names_are_one_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        png(&root.join("dog/0-s0.png"));
        png(&root.join("dog/03-s1.png"));
        png(&root.join("cat/24-s0.png"));
        std::fs::write(root.join("dog/notes.txt"), "x").unwrap();
        std::fs::write(root.join(".DS_Store"), "x").unwrap();
        let scan = scan_folder(root).unwrap();
        let keys: Vec<_> = scan.entries.iter().map(|e| e.key()).collect();
        assert_eq!(
            keys,
            [
                ("cat".to_string(), 24, 0),
                ("dog".to_string(), 0, 0),
                ("dog".to_string(), 3, 1)
            ]
        );
        assert_eq!(scan.ignored.len(), 2);

        let bad = |make: &dyn Fn(&Path), want: &[&str]| {
            let tmp = tempfile::tempdir().unwrap();
            png(&tmp.path().join("dog/0-s0.png"));
            make(tmp.path());
            let e = format!("{:#}", scan_folder(tmp.path()).unwrap_err());
            for w in want {
                assert!(e.contains(w), "want '{w}' in: {e}");
            }
        };
        bad(
            &|r| png(&r.join("dogg/0-s0.png")),
            &["unknown subject 'dogg'"],
        );
        bad(
            &|r| png(&r.join("dog/25-s0.png")),
            &["25-s0.png", "prompt index 25 out of range"],
        );
        bad(
            &|r| png(&r.join("dog/final.png")),
            &["final.png", "not named"],
        );
        bad(
            &|r| png(&r.join("dog/00-s0.jpg")),
            &["two images", "0-s0.png"],
        );
        bad(&|r| png(&r.join("0-s0.png")), &["not in a subject folder"]);
        let empty = tempfile::tempdir().unwrap();
        let e = format!("{:#}", scan_folder(empty.path()).unwrap_err());
        assert!(e.contains("no images"), "{e}");
    }

    #[test]
    fn manifests_are_read_and_malformed_ones_are_one_error() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("list.csv");
        std::fs::write(
            &m,
            "path,subject,seed,prompt_index,prompt\nimgs/a.png,dog,0,3,a sks dog in the jungle\n/abs/b.jpg, cat ,1,0,\n",
        )
        .unwrap();
        let e = read_manifest(&m).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].path, tmp.path().join("imgs/a.png"));
        assert_eq!(e[0].prompt.as_deref(), Some("a sks dog in the jungle"));
        assert_eq!((e[1].subject.as_str(), e[1].seed), ("cat", 1));
        assert_eq!(
            (e[1].path.as_path(), e[1].prompt.as_ref()),
            (Path::new("/abs/b.jpg"), None)
        );

        let bad = |text: &str, want: &[&str]| {
            std::fs::write(&m, text).unwrap();
            let e = format!("{:#}", read_manifest(&m).unwrap_err());
            for w in want {
                assert!(e.contains(w), "want '{w}' in: {e}");
            }
        };
        bad(
            "subject,seed,path\ndog,0,a.png\n",
            &["list.csv", "no column 'prompt_index'"],
        );
        bad(
            "subject,prompt_index,seed,path\ndog,0,0,a.png\nwolf,0,0,b.png\n",
            &["line 3", "unknown subject 'wolf'"],
        );
        bad(
            "subject,prompt_index,seed,path\ndog,30,0,a.png\n",
            &["line 2", "prompt index 30 out of range"],
        );
        bad(
            "subject,prompt_index,seed,path\ndog,x,0,a.png\n",
            &["line 2", "prompt_index 'x' is not a number"],
        );
        bad(
            "subject,prompt_index,seed,path\ndog,0,0,a.png,extra\n",
            &["line 2"],
        );
        bad(
            "subject,prompt_index,seed,path\ndog,0,0,a.png\ndog,0,0,b.png\n",
            &["two images", "a.png", "b.png"],
        );
        bad("subject,prompt_index,seed,path\n", &["lists no images"]);
    }

    #[test]
    fn unreadable_images_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.png");
        std::fs::write(&p, b"not a png at all").unwrap();
        let e = format!("{:#}", check_readable(&p).unwrap_err());
        assert!(
            e.contains("x.png") && e.contains("not a readable image"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            check_readable(&tmp.path().join("gone.png")).unwrap_err()
        );
        assert!(e.contains("gone.png"), "{e}");
        png(&p);
        let (w, h) = check_readable(&p).unwrap();
        assert!(w > 0 && h > 0);
        // A whole header over a cut body: found now, not when the job scores it.
        let noisy = tmp.path().join("noisy.png");
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 7 ^ y * 13) as u8, (x * y) as u8, 9])
        })
        .save(&noisy)
        .unwrap();
        let bytes = std::fs::read(&noisy).unwrap();
        let cut = tmp.path().join("cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let e = format!("{:#}", check_readable(&cut).unwrap_err());
        assert!(
            e.contains("cut.png") && e.contains("not a readable image"),
            "{e}"
        );
    }
}
