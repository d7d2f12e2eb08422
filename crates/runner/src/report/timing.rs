//! Where the time went: per method, the device and precision its images were made on, and the
//! mean seconds per image of the whole generation and of each phase the rows record (inversion,
//! palette, layout template, sampling with its guidance passes, decoding, scoring). A batch's
//! time is shared equally by its images. The timings are the run folder's `timings/` files (see
//! [`super::rows::Timing`]), which the report attaches to the rows it reads.

use super::rows::ImageRow;
use super::tables::MethodInfo;
use std::collections::BTreeSet;
use std::fmt::Write;

/// Mean of the recorded values; `None` when no row recorded it.
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn cell(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2}")).unwrap_or_else(|| "–".into())
}

/// The Markdown section: the builds when the runs had several, then one line per method with
/// rows.
pub fn markdown(rows: &[ImageRow], infos: &[MethodInfo], builds: &[String]) -> String {
    let mut s = String::from("## Where the time went\n\n");
    // One build is in the header already; several (runs of other builds in one table) are
    // listed here, since their times are not comparable.
    if builds.len() > 1 {
        for b in builds {
            let _ = writeln!(s, "- Build: {b}");
        }
    }
    s.push_str(
        "\nSeconds per image, mean over the method's images (a batch's time shared by its images); – where a phase did not run or was not recorded. Generation is the whole of it (guidance included); sampling includes the guidance passes.\n\n| Method | device | dtype | images | generation | inversion | palette | template | sampling | decoding | scoring |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for info in infos {
        let mine: Vec<&ImageRow> = rows.iter().filter(|r| r.method == info.name).collect();
        if mine.is_empty() {
            continue;
        }
        let set = |f: fn(&ImageRow) -> &str| {
            let v: BTreeSet<&str> = mine
                .iter()
                .map(|r| f(r))
                .filter(|x| !x.is_empty())
                .collect();
            if v.is_empty() {
                "–".to_string()
            } else {
                v.into_iter().collect::<Vec<_>>().join(", ")
            }
        };
        // Another program's images: their generation was not timed here.
        let generated = |r: &&&ImageRow| r.device != "external";
        let m = |f: fn(&ImageRow) -> Option<f64>| cell(mean(mine.iter().map(|r| f(r))));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            info.label,
            set(|r| r.device.as_str()),
            set(|r| r.dtype.as_str()),
            mine.len(),
            cell(mean(
                mine.iter()
                    .filter(generated)
                    .map(|r| Some(r.timing.seconds))
            )),
            m(|r| r.timing.inversion_s),
            m(|r| r.timing.palette_s),
            m(|r| r.timing.template_s),
            m(|r| r.timing.sampling_s),
            m(|r| r.timing.decode_s),
            m(|r| r.timing.scoring_s),
        );
    }
    s
}
