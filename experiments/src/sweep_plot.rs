//! `sweep.png`: chosen metrics against the first axis (or the reflow iteration), one line
//! per setting, the mean over replicates with its 95% interval as a band.

use crate::plot::{font_ready, wong, BACKGROUND, INK, PANEL};
use crate::stats::Interval;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The figure's file in a sweep folder.
pub const FILE: &str = "sweep.png";

/// The metrics drawn unless others are asked for.
pub const DEFAULT_METRICS: [&str; 3] = ["straightness", "w2_euler_1", "w2_euler_100"];

/// One line of a panel: a setting, with its interval at each x position (None: no run).
pub struct Series {
    pub label: String,
    pub points: Vec<Option<Interval>>,
}

/// What `sweep.png` shows.
pub struct SweepFigure {
    /// What the x axis is (the first swept key, or "reflow iteration").
    pub x_title: String,
    /// The x positions' labels, in order.
    pub x_ticks: Vec<String>,
    /// Per metric: its name and its lines.
    pub panels: Vec<(String, Vec<Series>)>,
}

/// A metric's panel title (from the registry).
fn title(metric: &str) -> String {
    crate::metrics::find(metric).map_or(metric.to_string(), |m| m.title.to_string())
}

const COLORS: [RGBColor; 7] = [
    wong::CYAN,
    wong::AMBER,
    wong::GREEN,
    wong::PINK,
    wong::YELLOW,
    wong::RED,
    wong::NAVY,
];

/// The y range of a panel's lines (means ± half-widths), and whether any point is measured
/// (`(0, 1)` otherwise).
fn y_range(lines: &[Series]) -> (f64, f64, bool) {
    let ends: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().flatten())
        .flat_map(|i| {
            let h = if i.half.is_finite() { i.half } else { 0.0 };
            [i.mean - h, i.mean + h]
        })
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = if ends.is_empty() {
        (0.0, 1.0)
    } else {
        ends.iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)))
    };
    (lo, hi, !ends.is_empty())
}

/// Draws `fig` to `path` (one panel per metric, side by side).
pub fn draw(path: &Path, fig: &SweepFigure) -> Result<()> {
    font_ready();
    let n = fig.x_ticks.len();
    if n == 0 || fig.panels.is_empty() {
        return Err(anyhow!("nothing to draw: no finished runs"));
    }
    let width = PANEL * 4 / 3 * fig.panels.len() as u32;
    let root = BitMapBackend::new(path, (width, PANEL + 70)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let (strip, body) = root.split_vertically(34);
    legend(&strip, fig)?;
    let areas = body.split_evenly((1, fig.panels.len()));
    for (area, (metric, lines)) in areas.iter().zip(&fig.panels) {
        let (lo, hi, measured) = y_range(lines);
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let caption = if !measured {
            format!("{} (not measured)", title(metric))
        } else {
            title(metric)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16).into_font().color(&INK))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .axis_style(INK.mix(0.6))
            .label_style(("sans-serif", 11).into_font().color(&INK))
            .axis_desc_style(("sans-serif", 12).into_font().color(&INK))
            .x_desc(fig.x_title.as_str())
            // One tick per position: labels only at whole numbers.
            .x_labels(n + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 1e-6 || i < 0.0 {
                    return String::new();
                }
                fig.x_ticks.get(i as usize).cloned().unwrap_or_default()
            })
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        for (k, line) in lines.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let pts: Vec<(f64, Interval)> = line
                .points
                .iter()
                .enumerate()
                .filter_map(|(x, p)| p.filter(|i| i.mean.is_finite()).map(|i| (x as f64, i)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            // The band: mean ± half-width, where there are replicates.
            let banded: Vec<&(f64, Interval)> =
                pts.iter().filter(|(_, i)| i.half.is_finite()).collect();
            if !banded.is_empty() {
                let mut poly: Vec<(f64, f64)> =
                    banded.iter().map(|(x, i)| (*x, i.mean + i.half)).collect();
                poly.extend(banded.iter().rev().map(|(x, i)| (*x, i.mean - i.half)));
                if banded.len() == 1 {
                    // A single position: an error bar instead of a band.
                    let (x, i) = banded[0];
                    poly = vec![
                        (x - 0.06, i.mean + i.half),
                        (x + 0.06, i.mean + i.half),
                        (x + 0.06, i.mean - i.half),
                        (x - 0.06, i.mean - i.half),
                    ];
                }
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        poly,
                        color.mix(0.22).filled(),
                    )))
                    .map_err(|e| anyhow!("plot: {e}"))?;
            }
            let xy: Vec<(f64, f64)> = pts.iter().map(|(x, i)| (*x, i.mean)).collect();
            chart
                .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?;
            chart
                .draw_series(xy.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
    }
    root.present()?;
    Ok(())
}

/// One legend for all panels, in a strip above them: a line per setting, and what the band
/// is.
fn legend<DB: DrawingBackend>(
    strip: &DrawingArea<DB, plotters::coord::Shift>,
    fig: &SweepFigure,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let font = ("sans-serif", 13).into_font().color(&INK);
    let labels: Vec<&str> = fig
        .panels
        .first()
        .map(|(_, lines)| lines.iter().map(|l| l.label.as_str()).collect())
        .unwrap_or_default();
    let banded = fig.panels.iter().any(|(_, lines)| {
        lines
            .iter()
            .any(|l| l.points.iter().flatten().any(|i| i.half.is_finite()))
    });
    let (mut x, y) = (16i32, 18i32);
    for (k, label) in labels.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        strip
            .draw(&PathElement::new(
                vec![(x, y), (x + 20, y)],
                color.stroke_width(3),
            ))
            .map_err(|e| anyhow!("plot: {e}"))?;
        strip
            .draw(&Text::new(label.to_string(), (x + 26, y - 8), font.clone()))
            .map_err(|e| anyhow!("plot: {e}"))?;
        let w = strip
            .estimate_text_size(label, &font)
            .map_err(|e| anyhow!("plot: {e}"))?
            .0 as i32;
        x += 26 + w + 24;
    }
    if banded {
        let note = "line: mean over replicates; band: 95% t-interval of the mean";
        strip
            .draw(&Text::new(note, (x + 8, y - 8), font.color(&INK.mix(0.7))))
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    Ok(())
}

/// `plot SWEEP --what samples[:K]`: `samples_nfeK.png` (K = 1 unless given), one panel per
/// setting and flow of the sweep, each the samples of K Euler steps (a span model's K-step
/// sampler) from the eval source sample, for the first replicate (seed) of each setting.
pub fn samples_figure(dir: &Path, what: &[String]) -> Result<PathBuf> {
    use flowmatch_solvers::{solve, Method, SolverSpec};
    let [w] = what else {
        return Err(anyhow!("--what samples draws one figure; give it alone"));
    };
    let k: usize = match w.strip_prefix("samples") {
        Some("") => 1,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|k| k.parse().ok())
            .filter(|&k| k > 0)
            .ok_or_else(|| anyhow!("--what {w}: expected samples or samples:K with K ≥ 1"))?,
        None => unreachable!("called for samples"),
    };
    // K Euler steps hold a time grid of K + 1 steps per panel: bounded like a run's solves.
    if let Some((_, need, limit)) =
        crate::limits::over_default_limit(&[(crate::limits::grid_bytes(k), "--what")])
    {
        return Err(anyhow!(
            "--what {w}: {k} Euler steps would need about {} of memory for the time grid, over limits.memory_gb = {}",
            crate::limits::human(need),
            limit / 1e9
        ));
    }
    let plan = crate::sweep_report::PlanFile::read(dir, crate::sweep::DEFAULT_MAX_RUNS)?;
    let n_axes = plan.axes.len();
    let first_replicate = plan
        .runs
        .first()
        .and_then(|r| plan.values.get(r))
        .map(|v| v[n_axes.min(v.len())..].to_vec())
        .unwrap_or_default();
    let mut panels = vec![];
    let mut real = None;
    for run in &plan.runs {
        let values = plan.values.get(run).cloned().unwrap_or_default();
        if values[n_axes.min(values.len())..] != first_replicate[..] {
            continue;
        }
        let paths = crate::folder::RunPaths::new(dir.join(run));
        if !paths.finished() {
            continue;
        }
        let setting = values[..n_axes.min(values.len())].join(" ");
        let flows: Vec<(String, PathBuf)> = match paths.read_reflow_rows()? {
            Some(rows) => rows
                .iter()
                .map(|r| {
                    (
                        format!("{setting} {}", r.flow),
                        paths.dir.join(r.flow.folder()),
                    )
                })
                .collect(),
            None => vec![(setting, paths.dir.clone())],
        };
        for (title, d) in flows {
            let run = crate::folder::open_run(&d, &[])?;
            let (model, checked) = (run.model, run.exp);
            let (x0, r) = crate::eval::EvalSet::samples(&checked, &checked.device)?;
            real.get_or_insert(r);
            let field = crate::eval::sampling_field(&model, checked.guidance);
            let x = solve(
                field.as_ref(),
                &x0,
                &SolverSpec::new(Method::Euler, k),
                false,
            )?
            .x;
            panels.push((format!("{title} ({k} NFE)"), x));
        }
    }
    let Some(real) = real else {
        return Err(anyhow!("{}: no finished run to draw", dir.display()));
    };
    let path = dir.join(format!("samples_nfe{k}.png"));
    crate::logging::atomically(&path, |tmp| crate::plot::sample_panels(tmp, &real, &panels))?;
    Ok(path)
}
