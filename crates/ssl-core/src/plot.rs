//! Training-curve figures as PNG files.
//!
//! [`plot_training_curves`] draws one panel per [`CurveSeries`] (for example
//! loss, learning rate and gradient norm), stacked vertically, 1000 px wide.
//! [`plot_panels`] draws panels of several labelled lines each (raw and smoothed
//! loss, held-out curves); [`run`] prepares a run's figures (`loss.png`,
//! `metrics.png`, `health.png`) from its `metrics.jsonl`.
//! Text is rendered with the DejaVu Sans font embedded in the binary, so no
//! system fontconfig or font files are needed at run time.

pub mod run;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use thiserror::Error;

/// Width of the figure in pixels.
pub const FIGURE_WIDTH: u32 = 1000;
/// Height of one panel in pixels.
pub const PANEL_HEIGHT: u32 = 280;
/// Largest number of series accepted in one figure.
pub const MAX_SERIES: usize = 32;

/// DejaVu Sans (Bitstream Vera licence, see `assets/FONT-LICENSE.txt`).
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Family name under which the embedded font is registered; plotters' default
/// text styles look fonts up under this name.
const FONT_FAMILY: &str = "sans-serif";

/// Errors returned by [`plot_training_curves`].
#[derive(Debug, Error)]
pub enum PlotError {
    /// The embedded font could not be registered.
    #[error("could not register the embedded DejaVu Sans font: {0}")]
    Font(String),
    /// Too many series for one figure.
    #[error("{got} series given but a figure holds at most {max}")]
    TooManySeries {
        /// Number of series passed.
        got: usize,
        /// The limit ([`MAX_SERIES`]).
        max: usize,
    },
    /// The output path has no file name.
    #[error("output path {0} does not name a file")]
    BadPath(PathBuf),
    /// plotters failed while drawing or encoding.
    #[error("drawing {path} failed: {message}")]
    Draw {
        /// The output path.
        path: PathBuf,
        /// plotters' error message.
        message: String,
    },
    /// Moving the finished temporary file into place failed.
    #[error("could not move {from} to {to}: {source}")]
    Io {
        /// The temporary file.
        from: PathBuf,
        /// The output path.
        to: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// One curve to plot in its own panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurveSeries {
    /// Panel title and y-axis label (e.g. `"loss"`).
    pub name: String,
    /// `(step, value)` pairs; pairs with a non-finite coordinate are skipped
    /// (and, on a log axis, pairs with a value `<= 0`).
    pub points: Vec<(f64, f64)>,
    /// Use a logarithmic y axis.
    pub log_y: bool,
}

/// How a line of a [`Panel`] is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LineKind {
    /// A measured curve, drawn solid.
    Main,
    /// Raw values under a smoothed curve, drawn faint.
    Raw,
    /// Sparse points (held-out evaluations), drawn with markers.
    Points,
}

/// One labelled line of a [`Panel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// Legend label (e.g. `"loss (smoothed)"`, `"eval_loss"`).
    pub label: String,
    /// `(step, value)` pairs; non-finite pairs are skipped (and `<= 0` on a log axis).
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub kind: LineKind,
}

/// A panel of one or more lines sharing axes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Panel {
    /// Title and y-axis label.
    pub title: String,
    /// The lines, drawn in order (a legend names them when there are several).
    pub lines: Vec<Line>,
    /// Use a logarithmic y axis.
    pub log_y: bool,
}

impl Panel {
    /// A panel holding one solid line named like the panel.
    pub fn single(title: &str, points: Vec<(f64, f64)>, log_y: bool) -> Self {
        Panel {
            title: title.to_string(),
            lines: vec![Line {
                label: title.to_string(),
                points,
                kind: LineKind::Main,
            }],
            log_y,
        }
    }
}

impl From<&CurveSeries> for Panel {
    fn from(s: &CurveSeries) -> Self {
        Panel::single(&s.name, s.points.clone(), s.log_y)
    }
}

/// Line colours (matplotlib's tab10).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT_FAMILY, FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "font data is not a valid OpenType font".to_string())
        })
        .clone()
        .map_err(PlotError::Font)
}

/// Scientific notation with up to 3 significant digits, e.g. `1.5e-4`.
fn fmt_sci(v: f64) -> String {
    let s = format!("{v:.2e}");
    match s.split_once('e') {
        Some((mant, exp)) if mant.contains('.') => {
            let mant = mant.trim_end_matches('0').trim_end_matches('.');
            format!("{mant}e{exp}")
        }
        _ => s,
    }
}

/// Removes trailing zeros after a decimal point.
fn trim_decimals(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Tick label for a linear axis spanning `lo..hi`: plain decimals with as
/// many digits as the span needs, or scientific notation for very small or
/// very large magnitudes.
fn fmt_linear_tick(v: f64, lo: f64, hi: f64) -> String {
    let scale = lo.abs().max(hi.abs());
    if v == 0.0 {
        return "0".to_string();
    }
    if !(1e-2..1e5).contains(&scale) {
        return fmt_sci(v);
    }
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let decimals = ((-span.log10()).ceil() + 2.0).clamp(0.0, 6.0) as usize;
    let s = trim_decimals(format!("{v:.decimals$}"));
    if s == "-0" {
        "0".to_string()
    } else {
        s
    }
}

/// Tick label with 3 significant digits (used on log axes).
fn fmt_significant(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&a) {
        return fmt_sci(v);
    }
    let decimals = (2.0 - a.log10().floor()).clamp(0.0, 6.0) as usize;
    trim_decimals(format!("{v:.decimals$}"))
}

/// `[lo, hi]` padded so that it has positive width.
fn padded_linear(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    } else {
        let pad = if lo.abs() > 0.0 { lo.abs() * 0.1 } else { 1.0 };
        (lo - pad, hi + pad)
    }
}

fn min_max(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Draws one panel. `path` is only used in error messages.
fn draw_panel(area: &Area<'_>, panel: &Panel, path: &Path) -> Result<(), PlotError> {
    let err = draw_err(path);
    let usable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!panel.log_y || y > 0.0);
    // Log axes are drawn as log10(value) on a linear axis whose tick labels
    // show the original values; this gives evenly spread ticks at any range.
    let lines: Vec<(&Line, Vec<(f64, f64)>)> = panel
        .lines
        .iter()
        .map(|l| {
            let pts = l.points.iter().copied().filter(usable);
            let pts = if panel.log_y {
                pts.map(|(x, y)| (x, y.log10())).collect()
            } else {
                pts.collect()
            };
            (l, pts)
        })
        .collect();
    let title = if panel.log_y {
        format!("{} (log scale)", panel.title)
    } else {
        panel.title.clone()
    };
    if lines.iter().all(|(_, p)| p.is_empty()) {
        let area = area
            .titled(&title, (FONT_FAMILY, 22).into_font())
            .map_err(&err)?;
        let (w, h) = area.dim_in_pixel();
        let grey = BLACK.mix(0.6);
        let style = TextStyle::from((FONT_FAMILY, 18).into_font())
            .color(&grey)
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ));
        area.draw_text(
            "no finite data points",
            &style,
            (w as i32 / 2, h as i32 / 2),
        )
        .map_err(&err)?;
        return Ok(());
    }
    let all = || lines.iter().flat_map(|(_, p)| p.iter());
    let (x_lo, x_hi) = padded_linear_x(min_max(all().map(|p| p.0)));
    let (y_lo, y_hi) = {
        let (lo, hi) = min_max(all().map(|p| p.1));
        if panel.log_y && hi <= lo {
            (lo - 0.5, hi + 0.5)
        } else {
            padded_linear(lo, hi)
        }
    };
    let x_fmt = |v: &f64| fmt_linear_tick(*v, x_lo, x_hi);
    let y_fmt = |v: &f64| {
        if panel.log_y {
            fmt_significant(10f64.powf(*v))
        } else {
            fmt_linear_tick(*v, y_lo, y_hi)
        }
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&title, (FONT_FAMILY, 22))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(panel.title.as_str())
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.15))
        .draw()
        .map_err(&err)?;
    let mut colour = 0;
    for (line, pts) in &lines {
        // A raw line takes the colour of the smoothed line that follows it, faint.
        let base = PALETTE[colour % PALETTE.len()];
        let style = match line.kind {
            LineKind::Raw => base.mix(0.3).stroke_width(1),
            _ => {
                colour += 1;
                base.stroke_width(2)
            }
        };
        let drawn = chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))
            .map_err(&err)?;
        if lines.len() > 1 {
            drawn
                .label(line.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        if line.kind == LineKind::Points || pts.len() == 1 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, base.filled())))
                .map_err(&err)?;
        }
    }
    if lines.len() > 1 {
        // The legend goes in the right-hand corner the curves' last third keeps clear.
        let tail: Vec<f64> = all()
            .filter(|p| p.0 >= x_lo + (x_hi - x_lo) * 2.0 / 3.0)
            .map(|p| p.1)
            .collect();
        let high =
            !tail.is_empty() && tail.iter().sum::<f64>() / tail.len() as f64 > (y_lo + y_hi) / 2.0;
        chart
            .configure_series_labels()
            .position(if high {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(&err)?;
    }
    Ok(())
}

/// Step axis range: exact when there is a spread, padded otherwise.
fn padded_linear_x((lo, hi): (f64, f64)) -> (f64, f64) {
    if hi > lo {
        (lo, hi)
    } else {
        padded_linear(lo, hi)
    }
}

/// Writes a PNG with one panel per series, stacked vertically
/// ([`FIGURE_WIDTH`] wide, [`PANEL_HEIGHT`] per panel), each titled with the
/// series name, x axis labelled "step" and y axis labelled with the name.
///
/// Non-finite points are skipped; a series with no usable point gets a panel
/// that says so, and a single point is drawn as a dot. With no series at all
/// a single "no data" panel is written. The image is rendered to a temporary
/// file next to `path` and renamed into place, so readers never see a
/// half-written file. The output is PNG whatever `path`'s extension is.
///
/// # Errors
/// If there are more than [`MAX_SERIES`] series, `path` has no file name, or
/// drawing, encoding or renaming fails (e.g. the directory does not exist).
pub fn plot_training_curves(path: &Path, series: &[CurveSeries]) -> Result<(), PlotError> {
    if series.len() > MAX_SERIES {
        return Err(PlotError::TooManySeries {
            got: series.len(),
            max: MAX_SERIES,
        });
    }
    let panels: Vec<Panel> = series.iter().map(Panel::from).collect();
    plot_panels(path, &panels)
}

/// Writes a PNG with one [`Panel`] per row, like [`plot_training_curves`] (same size,
/// atomic write, "no data" panels), each panel drawing its lines with a legend when it has
/// several.
///
/// # Errors
/// As [`plot_training_curves`].
pub fn plot_panels(path: &Path, panels: &[Panel]) -> Result<(), PlotError> {
    if panels.len() > MAX_SERIES {
        return Err(PlotError::TooManySeries {
            got: panels.len(),
            max: MAX_SERIES,
        });
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| PlotError::BadPath(path.to_path_buf()))?;
    ensure_font()?;
    // The temporary name ends in .png: the bitmap backend picks the encoder
    // from the extension.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{}.{}-{}.tmp.png",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = render(&tmp, panels, path);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        PlotError::Io {
            from: tmp.clone(),
            to: path.to_path_buf(),
            source,
        }
    })
}

fn render(tmp: &Path, panels: &[Panel], path: &Path) -> Result<(), PlotError> {
    let err = draw_err(path);
    let rows = panels.len().max(1) as u32;
    let root = BitMapBackend::new(tmp, (FIGURE_WIDTH, PANEL_HEIGHT * rows)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    if panels.is_empty() {
        draw_panel(&root, &Panel::single("no series", Vec::new(), false), path)?;
    } else {
        let areas = root.split_evenly((panels.len(), 1));
        for (area, p) in areas.iter().zip(panels) {
            draw_panel(area, p, path)?;
        }
    }
    root.present().map_err(&err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ssl-core-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn assert_png(path: &Path, min_bytes: usize, height: u32) {
        let bytes = std::fs::read(path).unwrap();
        assert!(bytes.len() >= min_bytes, "only {} bytes", bytes.len());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, at offsets 16 and 20.
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (FIGURE_WIDTH, height));
    }

    #[test]
    fn writes_stacked_panels() {
        let dir = tmpdir("stacked");
        let path = dir.join("curves.png");
        let loss: Vec<(f64, f64)> = (0..200)
            .map(|i| (i as f64 * 10.0, 5.0 * (-(i as f64) / 50.0).exp() + 0.1))
            .chain([(2000.0, f64::NAN), (f64::INFINITY, 1.0)])
            .collect();
        let lr: Vec<(f64, f64)> = (0..200)
            .map(|i| {
                (
                    i as f64 * 10.0,
                    1e-3 * (1.0 + (i as f64 / 30.0).cos()) / 2.0,
                )
            })
            .collect();
        let series = vec![
            CurveSeries {
                name: "loss".into(),
                points: loss,
                log_y: true,
            },
            CurveSeries {
                name: "lr".into(),
                points: lr,
                log_y: false,
            },
            CurveSeries {
                name: "grad_norm".into(),
                points: vec![(5.0, 0.7)],
                log_y: false,
            },
        ];
        plot_training_curves(&path, &series).unwrap();
        assert_png(&path, 10_000, 3 * PANEL_HEIGHT);
        // No temporary file is left behind.
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn handles_empty_input() {
        let dir = tmpdir("empty");
        let path = dir.join("empty.png");
        plot_training_curves(&path, &[]).unwrap();
        assert_png(&path, 1_000, PANEL_HEIGHT);
        let series = [CurveSeries {
            name: "loss".into(),
            points: vec![(0.0, f64::NAN), (1.0, -1.0)],
            log_y: true,
        }];
        plot_training_curves(&path, &series).unwrap();
        assert_png(&path, 1_000, PANEL_HEIGHT);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reports_errors() {
        let missing = std::env::temp_dir()
            .join(format!("ssl-core-plot-missing-{}", std::process::id()))
            .join("x.png");
        let e = plot_training_curves(&missing, &[]).unwrap_err();
        assert!(e.to_string().contains("x.png"), "{e}");
        let many = vec![
            CurveSeries {
                name: "a".into(),
                points: vec![],
                log_y: false,
            };
            MAX_SERIES + 1
        ];
        assert!(matches!(
            plot_training_curves(Path::new("a.png"), &many),
            Err(PlotError::TooManySeries { .. })
        ));
        assert!(matches!(
            plot_training_curves(Path::new("/"), &[]),
            Err(PlotError::BadPath(_))
        ));
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(fmt_linear_tick(0.0, 0.0, 1.0), "0");
        assert_eq!(fmt_linear_tick(0.5, 0.0, 1.0), "0.5");
        assert_eq!(fmt_linear_tick(0.64, 0.63, 0.77), "0.64");
        assert_eq!(fmt_linear_tick(1500.0, 0.0, 2000.0), "1500");
        assert_eq!(fmt_linear_tick(9e-4, 0.0, 1e-3), "9e-4");
        assert_eq!(fmt_linear_tick(1.5e-4, 0.0, 1e-3), "1.5e-4");
        assert_eq!(fmt_significant(10f64.powf(-0.5)), "0.316");
        assert_eq!(fmt_significant(2.0), "2");
        assert_eq!(fmt_significant(1e-5), "1e-5");
    }
}
