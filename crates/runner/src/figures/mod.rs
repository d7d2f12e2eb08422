//! `pnd figures RUN_DIR... --spec FILE --out DIR`: the paper's qualitative figures (Figs. 1, 4,
//! 6–8) from a figure file ([`spec`]) and the run folders of sweeps: per figure a PNG at print
//! resolution, an SVG of the same figure (images embedded, text as SVG text) and a LaTeX `figure`
//! snippet that includes them. Every cell is found and every image read before anything is
//! written; each file is written atomically.

pub mod draw;
pub mod spec;

use crate::report::rows::ImageRow;
use crate::report::tables::MethodInfo;
use crate::sweep::{write_file_atomic, ConfigError, Plan, RunStore, StoreError};
use draw::Layout;
use image::RgbImage;
use spec::{FigureFile, FigureSpec, RowSpec, SpecSource, REFERENCE};
use std::path::{Path, PathBuf};

/// Why figures could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FigureError {
    #[error(transparent)]
    Spec(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run folder '{}': {problem}", dir.display())]
    Run { dir: PathBuf, problem: String },
    /// A column whose method cannot be found: unknown, in several runs, or an unknown run.
    #[error("{at}: figure '{figure}', column {column}: {problem}")]
    Column {
        at: String,
        figure: String,
        column: usize,
        problem: String,
    },
    /// A cell without its image: the figure, row and column, and the job or file looked for.
    #[error("figure '{figure}', row {row} ({subject}, prompt {prompt}, seed {seed}), column {column} '{title}': {missing}")]
    MissingCell {
        figure: String,
        row: usize,
        subject: String,
        prompt: usize,
        seed: u64,
        column: usize,
        title: String,
        missing: String,
    },
    #[error("reading image '{}': {cause}", path.display())]
    Image {
        path: PathBuf,
        cause: image::ImageError,
    },
    #[error("drawing figure '{figure}': {cause}")]
    Draw { figure: String, cause: String },
}

/// One run folder as the figures see it.
pub struct Run {
    pub dir: PathBuf,
    pub store: RunStore,
    pub plan: Plan,
    pub methods: Vec<MethodInfo>,
}

impl Run {
    pub fn open(dir: &Path) -> Result<Self, FigureError> {
        let store = RunStore::open(dir)?;
        let plan = store.plan()?;
        let methods = crate::report::method_infos(&plan.config).map_err(|e| FigureError::Run {
            dir: dir.into(),
            problem: format!("plan.json: {e:#}"),
        })?;
        Ok(Self {
            dir: dir.into(),
            store,
            plan,
            methods,
        })
    }

    /// The experiment's name, or the folder's.
    pub fn name(&self) -> String {
        if self.plan.experiment.is_empty() {
            self.folder_name()
        } else {
            self.plan.experiment.clone()
        }
    }

    fn folder_name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether a column's `run` names this run (its experiment or its folder).
    fn is_named(&self, name: &str) -> bool {
        self.plan.experiment == name || self.folder_name() == name
    }

    fn describe(&self) -> String {
        let names: Vec<&str> = self.methods.iter().map(|m| m.name.as_str()).collect();
        format!(
            "{} ('{}'): {}",
            self.name(),
            self.dir.display(),
            names.join(", ")
        )
    }
}

/// Every run's methods, for an unknown method's error.
fn all_methods(runs: &[Run]) -> String {
    runs.iter()
        .map(Run::describe)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A column resolved: the reference image, or a method of one run.
#[derive(Debug, Clone)]
enum Source {
    Reference,
    Method { run: usize, method: String },
}

/// Finds the run of each column's method (the column's `run`, else the figure's, else the one
/// run that has it) and the column titles.
fn resolve_columns(
    fig: &FigureSpec,
    runs: &[Run],
    src: &SpecSource,
) -> Result<Vec<(Source, String)>, FigureError> {
    let mut out = Vec::new();
    for (k, col) in fig.columns.iter().enumerate() {
        let err = |span: std::ops::Range<usize>, problem: String| FigureError::Column {
            at: src.at(span),
            figure: fig.name().into(),
            column: k + 1,
            problem,
        };
        let method = col.method.get_ref();
        if method == REFERENCE {
            out.push((
                Source::Reference,
                col.title.clone().unwrap_or_else(|| "Reference".into()),
            ));
            continue;
        }
        let run_name = col.run.as_ref().or(fig.run.as_ref());
        let candidates: Vec<usize> = match run_name {
            Some(name) => {
                let found: Vec<usize> = (0..runs.len())
                    .filter(|&i| runs[i].is_named(name.get_ref()))
                    .collect();
                if found.is_empty() {
                    let names: Vec<String> = runs
                        .iter()
                        .map(|r| format!("{} ('{}')", r.name(), r.dir.display()))
                        .collect();
                    return Err(err(
                        name.span(),
                        format!(
                            "no run '{}' among the runs given: {}",
                            name.get_ref(),
                            names.join(", ")
                        ),
                    ));
                }
                found
            }
            None => (0..runs.len()).collect(),
        };
        let with: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| runs[i].methods.iter().any(|m| &m.name == method))
            .collect();
        match with.as_slice() {
            [] => {
                let where_ = match run_name {
                    Some(n) => format!("run '{}'", n.get_ref()),
                    None => "any of the runs given".into(),
                };
                return Err(err(
                    col.method.span(),
                    format!(
                        "unknown method '{method}': not in {where_}; the runs' methods: {}",
                        all_methods(runs)
                    ),
                ));
            }
            [i] => {
                let info = runs[*i]
                    .methods
                    .iter()
                    .find(|m| &m.name == method)
                    .expect("filtered on it");
                out.push((
                    Source::Method {
                        run: *i,
                        method: method.clone(),
                    },
                    col.title.clone().unwrap_or_else(|| info.label.clone()),
                ));
            }
            several => {
                let names: Vec<String> = several.iter().map(|&i| runs[i].name()).collect();
                return Err(err(
                    col.method.span(),
                    format!(
                        "method '{method}' is in several runs ({}): say which with `run = \"{}\"` on the column or the figure",
                        names.join(", "),
                        names[0]
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// The generated image of one cell, or why there is none.
fn find_cell(run: &Run, method: &str, row: &RowSpec) -> Result<(ImageRow, PathBuf), String> {
    let job = dreambench::Job {
        method: method.into(),
        subject: row.subject.get_ref().clone(),
        prompt_index: *row.prompt.get_ref(),
        seed: row.seed,
    };
    let id = job.id();
    let row_file = run.store.row_path(&id);
    let image_row: ImageRow = match run.store.read_row(&id) {
        Ok(Some(r)) => r,
        Ok(None) if run.plan.jobs.contains(&job) => {
            return Err(format!(
                "job {id} of run '{}' has not finished (no '{}')",
                run.name(),
                row_file.display()
            ))
        }
        Ok(None) => {
            return Err(format!(
                "run '{}' ('{}') has no job {id}: its plan does not cover this subject, prompt and seed",
                run.name(),
                run.dir.display()
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    let path = run.dir.join(&image_row.image);
    if !path.is_file() {
        return Err(format!(
            "the image of job {id} is missing: '{}'",
            path.display()
        ));
    }
    Ok((image_row, path))
}

/// One figure, drawn: the PNG's pixels, the SVG text, the LaTeX snippet.
pub struct Drawn {
    pub name: String,
    pub layout: Layout,
    pub png: Vec<u8>,
    pub svg: String,
    pub tex: String,
}

/// Finds every cell of a figure and draws it.
pub fn draw_figure(fig: &FigureSpec, runs: &[Run], src: &SpecSource) -> Result<Drawn, FigureError> {
    let columns = resolve_columns(fig, runs, src)?;
    let titles: Vec<String> = columns.iter().map(|(_, t)| t.clone()).collect();
    let mut grid: Vec<Vec<PathBuf>> = Vec::new();
    for (r, row) in fig.rows.iter().enumerate() {
        let missing = |column: usize, missing: String| FigureError::MissingCell {
            figure: fig.name().into(),
            row: r + 1,
            subject: row.subject.get_ref().clone(),
            prompt: *row.prompt.get_ref(),
            seed: row.seed,
            column: column + 1,
            title: titles[column].clone(),
            missing,
        };
        let mut paths: Vec<Option<PathBuf>> = vec![None; columns.len()];
        let mut reference: Option<(String, String)> = None;
        for (c, (source, _)) in columns.iter().enumerate() {
            if let Source::Method { run, method } = source {
                let (image_row, path) =
                    find_cell(&runs[*run], method, row).map_err(|m| missing(c, m))?;
                reference.get_or_insert((image_row.reference.clone(), image_row.id.clone()));
                paths[c] = Some(path);
            }
        }
        let (reference, job) = reference.expect("a figure has a method column (checked)");
        for (c, (source, _)) in columns.iter().enumerate() {
            if let Source::Reference = source {
                let path = PathBuf::from(&reference);
                if !path.is_file() {
                    return Err(missing(
                        c,
                        format!(
                            "the reference image '{reference}' (from job {job}'s row) is missing (a relative path counts from the current folder)"
                        ),
                    ));
                }
                paths[c] = Some(path);
            }
        }
        grid.push(
            paths
                .into_iter()
                .map(|p| p.expect("every column"))
                .collect(),
        );
    }
    let texts: Vec<String> = fig.rows.iter().map(|r| fig.row_text(r)).collect();
    let layout = Layout::new(fig, &titles);
    let mut cells: Vec<Vec<RgbImage>> = Vec::new();
    for row in &grid {
        let mut out = Vec::new();
        for path in row {
            out.push(draw::cell_image(path, layout.cell)?);
        }
        cells.push(out);
    }
    let draw_err = |e: anyhow::Error| FigureError::Draw {
        figure: fig.name().into(),
        cause: format!("{e:#}"),
    };
    let png = draw::png(&layout, &cells, &texts).map_err(draw_err)?;
    let svg = draw::svg(&layout, &cells, &texts).map_err(draw_err)?;
    let tex = draw::latex(fig, &layout, &src.file);
    Ok(Drawn {
        name: fig.name().into(),
        layout,
        png,
        svg,
        tex,
    })
}

/// What `pnd figures` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub name: String,
    pub png: PathBuf,
    pub svg: PathBuf,
    pub tex: PathBuf,
    pub layout: Layout,
}

/// Draws every figure of `spec_path` from `runs` into `out`: nothing is written unless every
/// figure could be drawn.
pub fn write_figures(
    runs: &[PathBuf],
    spec_path: &Path,
    out: &Path,
) -> Result<Vec<Written>, FigureError> {
    let (spec, src) = FigureFile::load(spec_path)?;
    write_figures_from(runs, &spec, &src, out)
}

/// [`write_figures`] from a parsed figure file (`src` names it in errors and snippets).
pub fn write_figures_from(
    runs: &[PathBuf],
    spec: &FigureFile,
    src: &SpecSource,
    out: &Path,
) -> Result<Vec<Written>, FigureError> {
    if runs.is_empty() {
        return Err(FigureError::Run {
            dir: PathBuf::new(),
            problem: "no run folder given".into(),
        });
    }
    let runs: Vec<Run> = runs
        .iter()
        .map(|d| Run::open(d))
        .collect::<Result<_, _>>()?;
    let drawn: Vec<Drawn> = spec
        .figures
        .iter()
        .map(|f| draw_figure(f, &runs, src))
        .collect::<Result<_, _>>()?;
    let mut written = Vec::new();
    for d in drawn {
        let file = |ext: &str| out.join(format!("{}.{ext}", d.name));
        write_file_atomic(&file("png"), &d.png)?;
        write_file_atomic(&file("svg"), d.svg.as_bytes())?;
        write_file_atomic(&file("tex"), d.tex.as_bytes())?;
        written.push(Written {
            png: file("png"),
            svg: file("svg"),
            tex: file("tex"),
            name: d.name,
            layout: d.layout,
        });
    }
    Ok(written)
}
