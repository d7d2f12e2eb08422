//! `pnd figures`: the grid's geometry (size from the spec, each cell's pixels the resized source
//! image, titles and prompts in the SVG's text), the LaTeX snippet, the errors (a missing cell, an
//! unknown method) with nothing written, and the shipped figure file against the shipped
//! experiments. The tiny-model sweep of every baseline and both ablations is
//! `tiny_paper_sweep_writes_every_figure` below.

mod common;

use image::{Rgb, RgbImage};
use runner::commands::sweep::plan_of;
use runner::experiment::Experiment;
use runner::figures::draw::{cell_image, Layout};
use runner::figures::spec::FigureFile;
use runner::figures::{write_figures, FigureError};
use runner::report::rows::ImageRow;
use runner::sweep::RunStore;
use std::path::{Path, PathBuf};

/// A source image whose every pixel is distinct enough to catch a shifted or swapped cell.
fn pattern(w: u32, h: u32, k: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            k.wrapping_mul(40),
        ])
    })
}

/// A run folder as a sweep leaves it: plan, rows and images (no models needed), methods `a`
/// (label "Method A") and `b`, subjects dog and can, prompts 0 and 3, seed 0; images of
/// `size`, the reference images beside the run.
fn fake_run(root: &Path, name: &str, methods: &[(&str, &str)], size: (u32, u32)) -> PathBuf {
    let mut text = format!(
        "name = \"{name}\"\nsubjects = [\"dog\", \"can\"]\nprompts = [0, 3]\nseeds = [0]\n"
    );
    for (m, label) in methods {
        text += &format!(
            "[[methods]]\nname = \"{m}\"\nlabel = \"{label}\"\nbaseline = \"dreambooth\"\n"
        );
    }
    let exp = Experiment::parse(&text, "x.toml").unwrap();
    let plan = plan_of(&exp).unwrap();
    let dir = root.join(name);
    let store = RunStore::create(&dir, &plan).unwrap();
    for (k, job) in plan.jobs.iter().enumerate() {
        let id = job.id();
        let image = format!("files/{id}/image.png");
        std::fs::create_dir_all(store.files_dir(&id)).unwrap();
        pattern(size.0, size.1, k as u8)
            .save(dir.join(&image))
            .unwrap();
        let reference = root.join(format!("ref-{}.png", job.subject));
        if !reference.is_file() {
            pattern(80, 60, 200).save(&reference).unwrap();
        }
        let row = ImageRow {
            id: id.0.clone(),
            method: job.method.clone(),
            baseline: "dreambooth".into(),
            guided: false,
            subject: job.subject.clone(),
            prompt_index: job.prompt_index,
            seed: job.seed,
            prompt: "p".into(),
            clip_t_prompt: "p".into(),
            image,
            reference: reference.display().to_string(),
            dino: 0.5,
            clip_i: 0.5,
            clip_t: 0.3,
            extra: Default::default(),
            device: "cpu".into(),
            dtype: "f32".into(),
            dino_max: None,
            timing: Default::default(),
        };
        store.write_row(&id, &row).unwrap();
    }
    dir
}

const SPEC: &str = r#"[[figures]]
name = "grid"
caption = 'Two methods; $\ell_{app}$.'
label = "fig:grid"
wide = true
width = 2.0
dpi = 150
font_size = 9
columns = [
    { method = "reference" },
    { method = "a" },
    { method = "b", title = "B + P&D <x>" },
]
rows = [
    { subject = "dog", prompt = 0, seed = 0 },
    { subject = "can", prompt = 3 },
]
"#;

fn load(path: &Path) -> RgbImage {
    image::open(path).unwrap().to_rgb8()
}

#[test]
fn a_figure_has_the_specs_rows_columns_titles_and_cells() {
    let tmp = tempfile::tempdir().unwrap();
    let run = fake_run(
        tmp.path(),
        "runA",
        &[("a", "Method A"), ("b", "Method B")],
        (90, 70),
    );
    let spec = tmp.path().join("spec.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let out = tmp.path().join("out");
    let written = write_figures(&[run.clone()], &spec, &out).unwrap();
    assert_eq!(written.len(), 1);
    let w = &written[0];
    let l: &Layout = &w.layout;

    // The size from the spec: 2 in at 150 dpi; 3 columns with 2 pt (4 px) between them.
    let png = load(&w.png);
    assert_eq!((png.width(), l.width), (300, 300));
    let gap = (2.0f64 * 150.0 / 72.0).round() as u32;
    assert_eq!(l.gap, gap);
    assert_eq!(l.cell, (300 - 2 * gap) / 3);
    assert_eq!((l.rows, l.columns), (2, 3));
    assert_eq!(
        png.height(),
        l.header + 2 * (l.cell + l.label) + l.gap,
        "header, two rows of cells each with its prompt line, one gap"
    );
    assert_eq!(png.height(), l.height);

    // Each cell's pixels are its source image, center-cropped and resized; the reference
    // column is the subject's reference image.
    let parsed = FigureFile::parse(SPEC, "spec.toml").unwrap();
    let fig = &parsed.figures[0];
    for (r, row) in fig.rows.iter().enumerate() {
        for (c, method) in ["reference", "a", "b"].iter().enumerate() {
            let source = if *method == "reference" {
                tmp.path()
                    .join(format!("ref-{}.png", row.subject.get_ref()))
            } else {
                let id = format!(
                    "{method}__{}__p{:02}__s0",
                    row.subject.get_ref(),
                    row.prompt.get_ref()
                );
                run.join("files").join(id).join("image.png")
            };
            let expected = cell_image(&source, l.cell).unwrap();
            // Independently: the centered square of the source, resized with Lanczos3.
            let src = load(&source);
            let s = src.width().min(src.height());
            let square = image::imageops::crop_imm(
                &src,
                (src.width() - s) / 2,
                (src.height() - s) / 2,
                s,
                s,
            )
            .to_image();
            let resized = image::imageops::resize(
                &square,
                l.cell,
                l.cell,
                image::imageops::FilterType::Lanczos3,
            );
            assert_eq!(expected, resized);
            let (x, y) = l.cell_origin(r, c);
            assert_eq!(
                (x, y),
                (
                    l.left + c as u32 * (l.cell + l.gap),
                    l.header + r as u32 * (l.cell + l.label + l.gap)
                )
            );
            let block = image::imageops::crop_imm(&png, x, y, l.cell, l.cell).to_image();
            assert_eq!(block, expected, "row {r}, column {c} ({method})");
        }
    }
    // Text is drawn in the header above each column and in the line under each row, and nothing
    // but white lies between the columns.
    let dark = |x0: u32, y0: u32, w: u32, h: u32| {
        (y0..y0 + h).any(|y| (x0..x0 + w).any(|x| png.get_pixel(x, y).0.iter().all(|&v| v < 128)))
    };
    for c in 0..3 {
        let (x, _) = l.cell_origin(0, c);
        assert!(dark(x, 0, l.cell, l.header), "title of column {c}");
    }
    for r in 0..2 {
        let (_, y) = l.cell_origin(r, 0);
        assert!(
            dark(0, y + l.cell, l.width, l.label),
            "prompt under row {r}"
        );
    }
    let (x1, _) = l.cell_origin(0, 1);
    let between = image::imageops::crop_imm(&png, x1 - l.gap, l.header, l.gap, l.cell).to_image();
    assert!(between.pixels().all(|p| p.0 == [255, 255, 255]));

    // The SVG: the same size, one embedded image per cell, the titles and prompts as text.
    let svg = std::fs::read_to_string(&w.svg).unwrap();
    assert!(
        svg.contains(&format!("viewBox=\"0 0 {} {}\"", l.width, l.height)),
        "{}",
        &svg[..300]
    );
    assert!(svg.contains("width=\"2.0000in\""));
    assert_eq!(svg.matches("<image ").count(), 6);
    assert_eq!(svg.matches("data:image/png;base64,").count(), 6);
    // Titles as the spec says (default: the method's label), wrapped at spaces where a column
    // is too narrow for them; the prompts with V* for the identifier.
    let titles: Vec<String> = l.titles.iter().map(|(lines, _)| lines.join(" ")).collect();
    assert_eq!(titles, ["Reference", "Method A", "B + P&D <x>"]);
    assert!(l.titles[2].0.len() == 2, "{:?}", l.titles);
    let escape = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut texts: Vec<String> = l
        .titles
        .iter()
        .flat_map(|(lines, _)| lines.clone())
        .collect();
    texts.extend([
        "a V* dog in the jungle".into(),
        "a V* can on a cobblestone street".into(),
    ]);
    for text in &texts {
        let element = format!(">{}</text>", escape(text));
        assert!(svg.contains(&element), "{element} not in the SVG");
    }
    assert_eq!(svg.matches("<text ").count(), texts.len());

    // The LaTeX snippet includes the PNG at the text width, with the spec's caption and label.
    let tex = std::fs::read_to_string(&w.tex).unwrap();
    for line in [
        "\\begin{figure*}[t]",
        "\\includegraphics[width=\\textwidth]{grid.png}",
        "\\caption{Two methods; $\\ell_{app}$.}",
        "\\label{fig:grid}",
        "\\end{figure*}",
        "\\includesvg[width=\\textwidth]{grid}",
        "300 x",
    ] {
        assert!(tex.contains(line), "{line} not in:\n{tex}");
    }
}

#[test]
fn a_missing_cell_and_an_unknown_method_are_one_clear_error_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let run = fake_run(
        tmp.path(),
        "runA",
        &[("a", "Method A"), ("b", "Method B")],
        (64, 64),
    );
    let other = fake_run(
        tmp.path(),
        "runB",
        &[("a", "Method A"), ("c", "Method C")],
        (64, 64),
    );
    let out = tmp.path().join("out");
    let spec = tmp.path().join("spec.toml");
    let try_spec = |text: &str, runs: &[PathBuf]| -> String {
        std::fs::write(&spec, text).unwrap();
        let err = write_figures(runs, &spec, &out).unwrap_err();
        assert!(
            !out.exists(),
            "figures were written before the error: {err}"
        );
        err.to_string()
    };
    // A second figure that draws fine comes first: it must not be written either.
    let two = format!(
        "{}\n{}",
        SPEC.replace("name = \"grid\"", "name = \"first\""),
        SPEC
    );

    // The image file of one cell is gone.
    let gone = run.join("files/b__can__p03__s0/image.png");
    std::fs::rename(&gone, tmp.path().join("moved.png")).unwrap();
    let err = try_spec(&two, std::slice::from_ref(&run));
    assert!(
        err.contains("figure 'first', row 2 (can, prompt 3, seed 0), column 3 'B + P&D <x>'")
            && err.contains("the image of job b__can__p03__s0 is missing")
            && err.contains(&gone.display().to_string()),
        "{err}"
    );
    std::fs::rename(tmp.path().join("moved.png"), &gone).unwrap();

    // Its job has not finished (no row).
    let row = run.join("rows/a__dog__p00__s0.json");
    std::fs::rename(&row, tmp.path().join("row.json")).unwrap();
    let err = try_spec(SPEC, std::slice::from_ref(&run));
    assert!(
        err.contains("figure 'grid', row 1 (dog, prompt 0, seed 0), column 2 'Method A'")
            && err.contains("job a__dog__p00__s0 of run 'runA' has not finished")
            && err.contains(&row.display().to_string()),
        "{err}"
    );
    std::fs::rename(tmp.path().join("row.json"), &row).unwrap();

    // A cell the run never had.
    let err = try_spec(
        &SPEC.replace("prompt = 3", "prompt = 7"),
        std::slice::from_ref(&run),
    );
    assert!(
        err.contains("row 2 (can, prompt 7, seed 0), column 2 'Method A'")
            && err.contains("has no job a__can__p07__s0"),
        "{err}"
    );

    // The reference image is gone.
    let reference = tmp.path().join("ref-dog.png");
    std::fs::rename(&reference, tmp.path().join("ref.png")).unwrap();
    let err = try_spec(SPEC, std::slice::from_ref(&run));
    assert!(
        err.contains("row 1 (dog, prompt 0, seed 0), column 1 'Reference'")
            && err.contains(&format!("the reference image '{}'", reference.display())),
        "{err}"
    );
    std::fs::rename(tmp.path().join("ref.png"), &reference).unwrap();

    // An unknown method: the error points into the spec and lists every run's methods.
    let err = try_spec(
        &SPEC
            .replace("{ method = \"a\" }", "{ method = \"a\", run = \"runA\" }")
            .replace("{ method = \"b\", ", "{ method = \"zz\", "),
        &[run.clone(), other.clone()],
    );
    assert!(
        err.starts_with(&format!("{}:12:16:", spec.display()))
            && err.contains("figure 'grid', column 3: unknown method 'zz'")
            && err.contains(&format!("runA ('{}'): a, b", run.display()))
            && err.contains(&format!("runB ('{}'): a, c", other.display())),
        "{err}"
    );
    // A method in two runs needs `run`; an unknown `run` lists the runs.
    let err = try_spec(SPEC, &[run.clone(), other.clone()]);
    assert!(
        err.contains("column 2: method 'a' is in several runs (runA, runB)"),
        "{err}"
    );
    let err = try_spec(
        &SPEC.replace("wide = true", "wide = true\nrun = \"runC\""),
        &[run.clone(), other.clone()],
    );
    assert!(err.contains("no run 'runC' among the runs given"), "{err}");
    // Named, the method of the other run is found; its own run lacks b.
    let err = try_spec(
        &SPEC.replace("wide = true", "wide = true\nrun = \"runB\""),
        &[run.clone(), other.clone()],
    );
    assert!(
        err.contains("column 3: unknown method 'b': not in run 'runB'"),
        "{err}"
    );
    assert!(matches!(
        write_figures(&[run.clone()], &tmp.path().join("none.toml"), &out),
        Err(FigureError::Spec(_))
    ));

    // With everything in place, both figures are written.
    std::fs::write(&spec, &two).unwrap();
    let written = write_figures(std::slice::from_ref(&run), &spec, &out).unwrap();
    assert_eq!(written.len(), 2);
    for name in ["first", "grid"] {
        for ext in ["png", "svg", "tex"] {
            assert!(out.join(format!("{name}.{ext}")).is_file());
        }
    }
}

/// The shipped figure file parses, and every column's method is a method of the shipped
/// experiment its figure names (Table 1 and the two ablations).
#[test]
fn the_shipped_figures_name_the_shipped_experiments_methods() {
    let (file, _) =
        FigureFile::load(&common::repo().join("experiments/figures/paper.toml")).unwrap();
    let names: Vec<&str> = file.figures.iter().map(|f| f.name()).collect();
    assert_eq!(names, ["fig1", "fig4", "fig6", "fig7", "fig8"]);
    for fig in &file.figures {
        let run = fig.run.as_ref().expect("each shipped figure names its run");
        let exp =
            Experiment::load(&common::repo().join(format!("experiments/{}.toml", run.get_ref())))
                .unwrap();
        assert_eq!(&exp.name, run.get_ref());
        let methods = exp.method_names();
        assert_eq!(fig.columns[0].method.get_ref(), "reference");
        for c in &fig.columns[1..] {
            assert!(
                methods.contains(c.method.get_ref()),
                "{}: {} not in {methods:?}",
                fig.name(),
                c.method.get_ref()
            );
        }
    }
    // The paper's column orders.
    let titles = |i: usize| -> Vec<String> {
        file.figures[i]
            .columns
            .iter()
            .map(|c| c.title.clone().unwrap())
            .collect()
    };
    assert_eq!(
        titles(0),
        [
            "Reference",
            "TI",
            "TI + P&D",
            "DreamBooth",
            "DreamBooth + P&D",
            "BLIP-Diffusion",
            "BLIP-Diffusion + P&D"
        ]
    );
    assert_eq!(titles(1), titles(0));
    assert_eq!(
        titles(2),
        ["Reference", "DreamBooth", "+ ℓ_app", "+ ℓ_lay", "+ both"]
    );
    assert_eq!(
        titles(3),
        ["Reference", "Stable Diffusion", "+ Pick-and-Draw"]
    );
    assert_eq!(titles(4), ["Reference", "DreamBooth", "EMD", "UREMD"]);
}

/// `pnd demo --paper` (what `just paper-figures-tiny` runs): every baseline with and without
/// Pick-and-Draw and both ablations on tiny models, then every figure of the shipped file; then
/// `pnd figures` itself over the same runs.
#[test]
fn tiny_paper_sweep_writes_every_figure() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("paper");
    let o = common::pnd(&["demo", "--paper", "--out", root.to_str().unwrap()]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stderr}");
    let runs: Vec<PathBuf> = ["table1", "ablation-losses", "ablation-emd"]
        .iter()
        .map(|r| root.join("runs").join(r))
        .collect();
    // Every method of the shipped experiments ran on every cell.
    for (run, methods) in runs.iter().zip([8, 4, 3]) {
        let rows: Vec<ImageRow> = RunStore::open(run).unwrap().rows().unwrap();
        assert_eq!(rows.len(), methods * 4, "{}", run.display());
    }
    let (spec, _) = FigureFile::load(&root.join("figures.toml")).unwrap();
    for name in ["fig1", "fig4", "fig6", "fig7", "fig8"] {
        let fig = spec.figures.iter().find(|f| f.name() == name).unwrap();
        for ext in ["png", "svg", "tex"] {
            let f = root.join("figures").join(format!("{name}.{ext}"));
            assert!(f.is_file(), "{} missing; stdout:\n{stdout}", f.display());
        }
        let png = load(&root.join("figures").join(format!("{name}.png")));
        assert_eq!(
            png.width(),
            (fig.width_in() * 300.0).round() as u32,
            "{name}"
        );
        assert!(
            stdout.contains(&format!(
                "{name}: {} x {} px at 300 dpi",
                png.width(),
                png.height()
            )),
            "{stdout}"
        );
    }

    // The same figures through `pnd figures`, byte for byte.
    let again = tmp.path().join("again");
    let mut args: Vec<String> = vec!["figures".into()];
    args.extend(runs.iter().map(|r| r.display().to_string()));
    args.extend([
        "--spec".into(),
        root.join("figures.toml").display().to_string(),
        "--out".into(),
        again.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = common::pnd(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("5 figures written"), "{stdout}");
    for name in ["fig1", "fig4", "fig6", "fig7", "fig8"] {
        for ext in ["png", "svg"] {
            let f = format!("{name}.{ext}");
            assert_eq!(
                std::fs::read(root.join("figures").join(&f)).unwrap(),
                std::fs::read(again.join(&f)).unwrap(),
                "{f}"
            );
        }
    }
    // An unknown method through the CLI: one error, listing the runs' methods.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(root.join("figures.toml"))
            .unwrap()
            .replace("\"db+lay\"", "\"db+layout\""),
    )
    .unwrap();
    let mut bad_args = args.clone();
    let at = bad_args.iter().position(|a| *a == "--spec").unwrap();
    let bad_s = bad.display().to_string();
    bad_args[at + 1] = &bad_s;
    let o = common::pnd(&bad_args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("unknown method 'db+layout'")
            && err.contains("ablation-losses (")
            && err.contains("db, db+app, db+lay, db+both"),
        "{err}"
    );
}
