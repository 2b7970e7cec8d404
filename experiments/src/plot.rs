//! Figures, drawn with plotters into PNG and GIF files (bundled DejaVu Sans, no system fonts),
//! in Wong's colour-blind-safe palette on the blog's dark background.
//!
//! Everything plotted comes from recorded trajectories: one solve per figure, never one per
//! animation frame.

use crate::experiment::Experiment;
use crate::logging::atomically;
use crate::report::IterationRow;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use flowmatch_data::{rng_from_seed, Sampler};
use flowmatch_models::VelocityField;
use flowmatch_solvers::{solve, Method, SolverSpec};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Wong (2011) palette, as in the blog.
pub mod wong {
    use plotters::style::RGBColor;
    pub const AMBER: RGBColor = RGBColor(230, 159, 0);
    pub const CYAN: RGBColor = RGBColor(86, 180, 233);
    pub const GREEN: RGBColor = RGBColor(0, 158, 115);
    pub const YELLOW: RGBColor = RGBColor(240, 228, 66);
    pub const NAVY: RGBColor = RGBColor(0, 114, 178);
    pub const RED: RGBColor = RGBColor(213, 94, 0);
    pub const PINK: RGBColor = RGBColor(204, 121, 167);
}
const SOURCE: RGBColor = wong::NAVY;
const TARGET: RGBColor = wong::RED;
const GENERATED: RGBColor = wong::GREEN;
const LINES: RGBColor = wong::YELLOW;
/// One colour per class of a conditional model's figures (classes past 8 reuse them).
const CLASS_COLORS: [RGBColor; 8] = [
    wong::AMBER,
    wong::CYAN,
    wong::GREEN,
    wong::YELLOW,
    wong::NAVY,
    wong::RED,
    wong::PINK,
    RGBColor(225, 225, 225),
];

fn class_color(c: usize) -> RGBColor {
    CLASS_COLORS[c % CLASS_COLORS.len()]
}
pub(crate) const BACKGROUND: RGBColor = RGBColor(18, 18, 18);
pub(crate) const INK: RGBColor = RGBColor(225, 225, 225);
pub(crate) const PANEL: u32 = 360;

static FONT: Once = Once::new();

pub(crate) fn font_ready() {
    FONT.call_once(|| {
        let _ = register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// The image runs' figure: generated digits at 1, 2, 5 and 20 Euler steps.
pub const SAMPLES_GRID: &str = "samples_grid.png";
/// A conditional image model's digits: one row per class, a block of columns per guidance scale.
pub const CLASS_GRID: &str = "class_grid.png";

/// The figures of a run folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    /// Source / target / generated scatter side by side.
    Distributions,
    /// ~50 particle trajectories with start and end points.
    Trajectories,
    /// Training lines with crossings | learned field at t = 0.5 | learned paths (blog).
    FlowField,
    /// Samples at 1, 2, 5, 10, 50, 100 Euler steps over the real data (lesson exercise 1).
    StepsGrid,
    /// GIF of the particles flowing.
    Animation,
}

impl Figure {
    /// All per-run figures.
    pub const ALL: [Figure; 5] = [
        Self::Distributions,
        Self::Trajectories,
        Self::FlowField,
        Self::StepsGrid,
        Self::Animation,
    ];

    /// File name in the run folder.
    pub fn file(&self) -> &'static str {
        match self {
            Self::Distributions => "distributions.png",
            Self::Trajectories => "trajectories.png",
            Self::FlowField => "flow_field.png",
            Self::StepsGrid => "steps_grid.png",
            Self::Animation => "flow.gif",
        }
    }

    /// Parses a `--what` name.
    pub fn parse(s: &str) -> Result<Figure> {
        Self::ALL
            .into_iter()
            .find(|f| f.file().split('.').next() == Some(s))
            .ok_or_else(|| anyhow!("unknown figure '{s}' (distributions, trajectories, flow_field, steps_grid, flow)"))
    }
}

type Pts = Vec<(f32, f32)>;

fn points(t: &Tensor) -> Result<Pts> {
    let v: Vec<Vec<f32>> = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2()?;
    Ok(v.into_iter().map(|r| (r[0], r[1])).collect())
}

/// Half-width of a square view holding 99.5% of the points, padded.
fn extent(sets: &[&Pts]) -> f32 {
    let mut a: Vec<f32> = sets
        .iter()
        .flat_map(|s| s.iter().flat_map(|p| [p.0.abs(), p.1.abs()]))
        .filter(|x| x.is_finite())
        .collect();
    if a.is_empty() {
        return 1.0;
    }
    a.sort_by(|x, y| x.total_cmp(y));
    (a[(a.len() - 1) * 995 / 1000] * 1.1).max(0.5)
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf32, plotters::coord::types::RangedCoordf32>,
>;

fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    r: f32,
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18).into_font().color(&INK))
        .margin(8)
        .x_label_area_size(22)
        .y_label_area_size(30)
        .build_cartesian_2d(-r..r, -r..r)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .axis_style(INK.mix(0.6))
        .label_style(("sans-serif", 11).into_font().color(&INK))
        .x_labels(5)
        .y_labels(5)
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    Ok(chart)
}

fn scatter(chart: &mut Chart, pts: &Pts, color: RGBColor, alpha: f64, size: i32) -> Result<()> {
    chart
        .draw_series(
            pts.iter()
                .map(|&p| Circle::new(p, size, color.mix(alpha).filled())),
        )
        .map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

fn polylines(
    chart: &mut Chart,
    paths: &[Pts],
    color: RGBColor,
    alpha: f64,
    width: u32,
) -> Result<()> {
    for p in paths {
        chart
            .draw_series(std::iter::once(PathElement::new(
                p.clone(),
                color.mix(alpha).stroke_width(width),
            )))
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    Ok(())
}

fn canvas(path: &Path, panels: u32) -> BitMapBackend<'_> {
    BitMapBackend::new(path, (PANEL * panels, PANEL))
}

/// Everything a run's figures need, computed once.
struct Flows {
    x0: Pts,
    target: Pts,
    /// Trajectories of the headline solver: states × particles.
    traj: Vec<Pts>,
    /// A conditional model's classes: the real points' labels and the class count (particle
    /// `i` was asked for class `i mod K`).
    classes: Option<(Vec<u32>, usize)>,
}

impl Flows {
    /// `pts` split by class, each with its colour: by `label(i)` for a conditional model, or
    /// all in `plain`.
    fn by_class(
        &self,
        pts: &Pts,
        label: impl Fn(usize) -> usize,
        plain: RGBColor,
    ) -> Vec<(Pts, RGBColor)> {
        match &self.classes {
            None => vec![(pts.clone(), plain)],
            Some((_, k)) => (0..*k)
                .map(|c| {
                    let part = pts.iter().enumerate().filter(|(i, _)| label(*i) == c);
                    (part.map(|(_, p)| *p).collect(), class_color(c))
                })
                .collect(),
        }
    }
}

fn transpose(states: &[Pts], n: usize) -> Vec<Pts> {
    (0..n)
        .map(|i| states.iter().map(|s| s[i]).collect())
        .collect()
}

/// Draws the requested per-run figures of a 2D model into `dir`.
pub fn plot_run(
    field: &dyn VelocityField,
    checked: &Experiment,
    dir: &Path,
    device: &Device,
    figures: &[Figure],
) -> Result<Vec<PathBuf>> {
    let unguided = field;
    let guided = crate::eval::sampling_field(field, checked.guidance);
    let field = guided.as_ref();
    if checked.mnist.is_some() {
        // Images: one figure, digits at 1, 2, 5 and 20 Euler steps, then the headline
        // solver's when it is not Euler (real digits last).
        let mut rng = rng_from_seed(checked.eval.seed ^ 0x9107);
        let x0 = checked.source.sample(16, &mut rng, device)?;
        let mut rows = vec![];
        for steps in [1usize, 2, 5, 20] {
            let x = solve(field, &x0, &SolverSpec::new(Method::Euler, steps), false)?.x;
            rows.push((
                format!("{steps} step{}", if steps == 1 { "" } else { "s" }),
                x,
            ));
        }
        if checked.solver.method != Method::Euler {
            let run = solve(field, &x0, &checked.solver, false)?;
            let (name, steps) = (checked.solver.method.name(), checked.solver.steps);
            rows.push((format!("{name} {steps}\n({} NFE)", run.nfe), run.x));
        }
        rows.push((
            "real".to_string(),
            checked.target.sample(16, &mut rng, &Device::Cpu)?,
        ));
        let path = dir.join(SAMPLES_GRID);
        atomically(&path, |tmp| sample_grid(tmp, &rows, 16))?;
        let mut written = vec![path];
        if unguided.classes() > 0 {
            let path = dir.join(CLASS_GRID);
            atomically(&path, |tmp| class_grid(tmp, unguided, checked, device))?;
            written.push(path);
        }
        return Ok(written);
    }
    if checked.source.dim() != 2 {
        return Ok(vec![]);
    }
    font_ready();
    let n = checked.eval.samples.min(1000);
    let mut rng = rng_from_seed(checked.eval.seed ^ 0x9107);
    let x0t = checked.source.sample(n, &mut rng, device)?;
    // A conditional model's real points come with their labels (the same draws).
    let k = unguided.classes();
    let (real, classes) = if k > 0 {
        let (v, y) = checked
            .target
            .sample_labeled_vec(n, &mut rng)
            .ok_or_else(|| anyhow!("plot: the target has no labels for a conditional model"))?;
        (Tensor::from_vec(v, (n, 2), device)?, Some((y, k)))
    } else {
        (checked.target.sample(n, &mut rng, device)?, None)
    };
    let traj = record(field, &x0t, &SolverSpec::new(Method::Euler, 100))?;
    let f = Flows {
        x0: points(&x0t)?,
        target: points(&real)?,
        traj,
        classes,
    };
    let mut written = vec![];
    for fig in figures {
        let path = dir.join(fig.file());
        // Each figure goes to a temporary file first: a failed one leaves nothing behind.
        atomically(&path, |tmp| match fig {
            Figure::Distributions => distributions(tmp, &f),
            Figure::Trajectories => trajectories(tmp, &f),
            Figure::FlowField => flow_field(tmp, field, checked, &f, device),
            Figure::StepsGrid => steps_grid(tmp, field, &x0t, &f),
            Figure::Animation => animation(tmp, &[("flow", &f.traj)], 40),
        })?;
        written.push(path);
    }
    Ok(written)
}

fn distributions(path: &Path, f: &Flows) -> Result<()> {
    let gen = f.traj.last().cloned().unwrap_or_default();
    let r = extent(&[&f.x0, &f.target, &gen]);
    let root = canvas(path, 3).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let areas = root.split_evenly((1, 3));
    let real_class = |i: usize| f.classes.as_ref().map_or(0, |(y, _)| y[i] as usize);
    let asked = |i: usize| f.classes.as_ref().map_or(0, |(_, k)| i % k);
    let sets = [
        ("source", vec![(f.x0.clone(), SOURCE)]),
        ("target", f.by_class(&f.target, real_class, TARGET)),
        ("generated (Euler 100)", f.by_class(&gen, asked, GENERATED)),
    ];
    for (area, (title, parts)) in areas.iter().zip(sets) {
        let mut c = panel(area, title, r)?;
        for (pts, color) in parts {
            scatter(&mut c, &pts, color, 0.6, 2)?;
        }
    }
    root.present()?;
    Ok(())
}

fn trajectories(path: &Path, f: &Flows) -> Result<()> {
    let k = f.x0.len().min(50);
    let paths = transpose(&f.traj, k);
    let all: Pts = paths.iter().flatten().copied().collect();
    let r = extent(&[&all, &f.target]);
    let root = canvas(path, 1).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let mut c = panel(&root, "trajectories (Euler 100)", r)?;
    match &f.classes {
        // A conditional model's paths in the colour of the class each was asked for.
        Some((_, k)) => {
            for (i, p) in paths.iter().enumerate() {
                polylines(&mut c, std::slice::from_ref(p), class_color(i % k), 0.9, 1)?;
            }
        }
        None => polylines(&mut c, &paths, LINES, 0.9, 1)?,
    }
    scatter(
        &mut c,
        &paths.iter().map(|p| p[0]).collect(),
        SOURCE,
        1.0,
        3,
    )?;
    let ends: Pts = paths.iter().map(|p| p[p.len() - 1]).collect();
    let asked = |i: usize| f.classes.as_ref().map_or(0, |(_, k)| i % k);
    for (pts, color) in f.by_class(&ends, asked, GENERATED) {
        scatter(&mut c, &pts, color, 1.0, 3)?;
    }
    root.present()?;
    Ok(())
}

fn flow_field(
    path: &Path,
    field: &dyn VelocityField,
    checked: &Experiment,
    f: &Flows,
    device: &Device,
) -> Result<()> {
    let k = 50;
    let mut rng = rng_from_seed(7);
    let a = points(&checked.source.sample(k, &mut rng, device)?)?;
    let b = points(&checked.target.sample(k, &mut rng, device)?)?;
    let lines: Vec<Pts> = a.iter().zip(&b).map(|(&p, &q)| vec![p, q]).collect();
    let r = extent(&[&f.x0, &f.target]);
    // The learned field at t = 0.5 on a 20 × 20 grid.
    let g = 20;
    let grid: Vec<f32> = (0..g * g)
        .flat_map(|i| {
            let (ix, iy) = (i % g, i / g);
            [
                -r + 2.0 * r * (ix as f32 + 0.5) / g as f32,
                -r + 2.0 * r * (iy as f32 + 0.5) / g as f32,
            ]
        })
        .collect();
    let gt = Tensor::from_vec(grid, (g * g, 2), device)?;
    let v = points(&field.velocity(&gt, &Tensor::full(0.5f32, g * g, device)?)?)?;
    let gp = points(&gt)?;
    let vmax = v
        .iter()
        .map(|p| (p.0 * p.0 + p.1 * p.1).sqrt())
        .fold(1e-6, f32::max);
    let scale = 0.9 * (2.0 * r / g as f32) / vmax;
    // Paths with RK4, 20 steps, from the same starting points as the training lines.
    let x0 = Tensor::from_vec(
        a.iter().flat_map(|p| [p.0, p.1]).collect::<Vec<_>>(),
        (k, 2),
        device,
    )?;
    let states = record(field, &x0, &SolverSpec::new(Method::Rk4, 20))?;
    let paths = transpose(&states, k);
    let root = canvas(path, 3).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let areas = root.split_evenly((1, 3));
    let mut c = panel(&areas[0], "training lines (with crossings)", r)?;
    polylines(&mut c, &lines, wong::CYAN, 0.6, 2)?;
    let mut c = panel(&areas[1], "learned field at t = 0.5", r)?;
    for (p, d) in gp.iter().zip(&v) {
        let tip = (p.0 + d.0 * scale, p.1 + d.1 * scale);
        let (ux, uy) = (d.0 * scale * 0.3, d.1 * scale * 0.3);
        let head = vec![
            (tip.0 - ux - uy * 0.6, tip.1 - uy + ux * 0.6),
            tip,
            (tip.0 - ux + uy * 0.6, tip.1 - uy - ux * 0.6),
        ];
        polylines(&mut c, &[vec![*p, tip], head], LINES, 0.8, 1)?;
    }
    let mut c = panel(&areas[2], "learned paths (RK4 20)", r)?;
    polylines(&mut c, &paths, LINES, 0.7, 2)?;
    root.present()?;
    Ok(())
}

fn steps_grid(path: &Path, field: &dyn VelocityField, x0: &Tensor, f: &Flows) -> Result<()> {
    let steps = [1usize, 2, 5, 10, 50, 100];
    let r = extent(&[&f.target, &f.x0]);
    let root = canvas(path, steps.len() as u32).into_drawing_area();
    root.fill(&BACKGROUND)?;
    for (area, &s) in root.split_evenly((1, steps.len())).iter().zip(&steps) {
        let gen = points(&solve(field, x0, &SolverSpec::new(Method::Euler, s), false)?.x)?;
        let mut c = panel(
            area,
            &format!("{s} Euler step{}", if s == 1 { "" } else { "s" }),
            r,
        )?;
        scatter(&mut c, &f.target, RGBColor(150, 150, 150), 0.35, 1)?;
        scatter(&mut c, &gen, wong::CYAN, 0.6, 1)?;
    }
    root.present()?;
    Ok(())
}

/// A GIF of particles flowing, one panel per titled trajectory set (states × particles), one
/// frame per recorded state (subsampled to at most `frames`).
pub fn animation(path: &Path, flows: &[(&str, &Vec<Pts>)], frames: usize) -> Result<()> {
    font_ready();
    let all: Pts = flows
        .iter()
        .flat_map(|(_, t)| {
            [
                t.first().cloned().unwrap_or_default(),
                t.last().cloned().unwrap_or_default(),
            ]
        })
        .flatten()
        .collect();
    let r = extent(&[&all]);
    let len = flows.iter().map(|(_, t)| t.len()).min().unwrap_or(0);
    if len == 0 {
        return Err(anyhow!("animation: no recorded states"));
    }
    let idx: Vec<usize> = (0..frames.min(len))
        .map(|k| k * (len - 1) / (frames.min(len) - 1).max(1))
        .collect();
    let root = BitMapBackend::gif(path, (PANEL * flows.len() as u32, PANEL), 60)
        .map_err(|e| anyhow!("gif: {e}"))?
        .into_drawing_area();
    for &k in &idx {
        root.fill(&BACKGROUND)?;
        for (area, (title, t)) in root.split_evenly((1, flows.len())).iter().zip(flows) {
            let mut c = panel(area, title, r)?;
            scatter(&mut c, &t[k], wong::PINK, 0.7, 2)?;
        }
        root.present()?;
    }
    Ok(())
}

/// One panel of the reflow figure: its title and its (label, values, colour) lines.
type Panel<'a> = (&'a str, Vec<(&'a str, Vec<f64>, RGBColor)>);

/// Straightness, Liu's S and W2 at 1 Euler step across reflow iterations.
pub fn reflow_curves(path: &Path, rows: &[IterationRow]) -> Result<()> {
    font_ready();
    let root = BitMapBackend::new(path, (PANEL * 3, PANEL)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let areas = root.split_evenly((1, 3));
    let w2_1: Vec<f64> = rows
        .iter()
        .map(|r| r.w2_euler.first().map(|s| s.w2).unwrap_or(f64::NAN))
        .collect();
    let w2_100: Vec<f64> = rows
        .iter()
        .map(|r| r.w2_euler.last().map(|s| s.w2).unwrap_or(f64::NAN))
        .collect();
    let series: [Panel; 3] = [
        (
            "straightness (1 = straight)",
            vec![(
                "straightness",
                rows.iter().map(|r| r.straightness).collect(),
                wong::GREEN,
            )],
        ),
        (
            "Liu's S (0 = straight)",
            vec![(
                "S",
                rows.iter().map(|r| r.rf_straightness).collect(),
                wong::AMBER,
            )],
        ),
        (
            "W2 vs real data",
            vec![
                ("1 Euler step", w2_1, wong::CYAN),
                ("100 Euler steps", w2_100, wong::PINK),
            ],
        ),
    ];
    for (area, (title, lines)) in areas.iter().zip(series) {
        let vals: Vec<f64> = lines
            .iter()
            .flat_map(|l| l.1.iter().copied())
            .filter(|v| v.is_finite())
            .collect();
        let (lo, hi) = vals
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16).into_font().color(&INK))
            .margin(10)
            .x_label_area_size(26)
            .y_label_area_size(46)
            .build_cartesian_2d(0.5f64..rows.len() as f64 + 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .axis_style(INK.mix(0.6))
            .label_style(("sans-serif", 11).into_font().color(&INK))
            .x_labels(rows.len().max(2))
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                rows.get(i.wrapping_sub(1))
                    .map(|r| r.flow.to_string())
                    .unwrap_or_default()
            })
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        for (name, ys, color) in lines {
            let pts: Vec<(f64, f64)> = ys
                .iter()
                .enumerate()
                .map(|(i, &y)| (i as f64 + 1.0, y))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 11).into_font().color(&INK))
            .background_style(BACKGROUND.mix(0.8))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    root.present()?;
    Ok(())
}

/// Recorded trajectories of `field` from `x0` with the solver `spec` (for side-by-side
/// animations).
pub fn record(field: &dyn VelocityField, x0: &Tensor, spec: &SolverSpec) -> Result<Vec<Pts>> {
    let sol = solve(field, x0, spec, true)?;
    sol.trajectory
        .unwrap_or_default()
        .iter()
        .map(points)
        .collect()
}

/// Pixels per digit pixel in the digit figures.
const DIGIT_SCALE: u32 = 2;

/// Draws one digit (`SIDE²` grey levels in [-1, 1]) with its top left at `(x0, y0)`,
/// [`DIGIT_SCALE`] px per pixel.
fn draw_digit(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    digit: &[f32],
    (x0, y0): (u32, u32),
) -> Result<()> {
    let side = flowmatch_data::mnist::SIDE as u32;
    for (i, row) in digit.chunks_exact(side as usize).enumerate() {
        for (j, &p) in row.iter().enumerate() {
            let g = ((p.clamp(-1.0, 1.0) + 1.0) * 127.5) as u8;
            let (px, py) = (
                (x0 + j as u32 * DIGIT_SCALE) as i32,
                (y0 + i as u32 * DIGIT_SCALE) as i32,
            );
            let s = DIGIT_SCALE as i32;
            root.draw(&Rectangle::new(
                [(px, py), (px + s, py + s)],
                RGBColor(g, g, g).filled(),
            ))?;
        }
    }
    Ok(())
}

/// Draws rows of digits (`(label, (n, 784) tensor in [-1, 1])`), up to `per_row` each, into a
/// PNG: one row per label, 2 px per pixel, the label on the left (lines split at `\n`).
pub fn sample_grid(path: &Path, rows: &[(String, Tensor)], per_row: usize) -> Result<()> {
    font_ready();
    let side = flowmatch_data::mnist::SIDE as u32;
    let cell = side * DIGIT_SCALE + 4;
    let label_w = 110;
    let (w, h) = (
        label_w + cell * per_row as u32,
        cell * rows.len() as u32 + 4,
    );
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    for (r, (label, x)) in rows.iter().enumerate() {
        let y0 = 4 + cell * r as u32;
        // One line, or several (split at '\n') centred on the row.
        let lines: Vec<&str> = label.lines().collect();
        let top = (y0 + cell / 2) as i32 - 8 * lines.len() as i32;
        for (i, line) in lines.iter().enumerate() {
            root.draw(&Text::new(
                line.to_string(),
                (8, top + 16 * i as i32),
                ("sans-serif", 15).into_font().color(&WHITE),
            ))?;
        }
        let n = x.dim(0)?.min(per_row);
        let v = x
            .narrow(0, 0, n)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (k, digit) in v.chunks_exact((side * side) as usize).enumerate() {
            draw_digit(&root, digit, (label_w + cell * k as u32, y0))?;
        }
    }
    root.present()?;
    Ok(())
}

/// A conditional image model's digits: one row per class, a block of 6 columns per guidance
/// scale (the headline's and `eval.guidance`'s, in increasing order), each block from the same
/// source points under the headline solver.
fn class_grid(
    path: &Path,
    field: &dyn VelocityField,
    checked: &Experiment,
    device: &Device,
) -> Result<()> {
    const PER: usize = 6;
    let k = field.classes();
    let mut scales: Vec<f64> = checked.guidance_rows.clone();
    scales.push(checked.guidance);
    scales.sort_by(f64::total_cmp);
    scales.dedup();
    let mut rng = rng_from_seed(checked.eval.seed ^ 0xc1a5);
    let x0 = checked.source.sample(k * PER, &mut rng, device)?;
    let labels: Vec<u32> = (0..k * PER).map(|i| (i / PER) as u32).collect();
    let y = flowmatch_models::label_tensor(&labels, device)?;
    let mut blocks = vec![];
    for &w in &scales {
        let guided = flowmatch_models::Guided::new(field, y.clone(), w)?;
        blocks.push(
            solve(&guided, &x0, &checked.solver, false)?
                .x
                .to_device(&Device::Cpu)?,
        );
    }
    font_ready();
    let side = flowmatch_data::mnist::SIDE as u32;
    let cell = side * DIGIT_SCALE + 4;
    let (label_w, head, gap) = (40u32, 26u32, 16u32);
    let block_w = cell * PER as u32 + gap;
    let (w, h) = (
        label_w + block_w * scales.len() as u32,
        head + cell * k as u32 + 4,
    );
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let font = ("sans-serif", 15).into_font().color(&WHITE);
    for (b, &scale) in scales.iter().enumerate() {
        let x = (label_w + block_w * b as u32) as i32;
        root.draw(&Text::new(format!("w = {scale}"), (x + 4, 6), font.clone()))?;
    }
    for c in 0..k {
        let y0 = head + cell * c as u32;
        root.draw(&Text::new(
            format!("{c}"),
            (12, (y0 + cell / 2) as i32 - 8),
            font.clone(),
        ))?;
        for (b, x) in blocks.iter().enumerate() {
            let v = x.narrow(0, c * PER, PER)?.flatten_all()?.to_vec1::<f32>()?;
            for (j, digit) in v.chunks_exact((side * side) as usize).enumerate() {
                let x0 = label_w + block_w * b as u32 + cell * j as u32;
                draw_digit(&root, digit, (x0, y0))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// One panel per model: its samples (green) over the real ones (grey), in rows of three
/// (the few-step leaderboard's samples at one NFE).
pub fn sample_panels(path: &Path, real: &Tensor, panels: &[(String, Tensor)]) -> Result<()> {
    font_ready();
    let real = points(real)?;
    let gens: Vec<Pts> = panels
        .iter()
        .map(|(_, t)| points(t))
        .collect::<Result<_>>()?;
    let mut sets: Vec<&Pts> = gens.iter().collect();
    sets.push(&real);
    let r = extent(&sets);
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols).max(1);
    let root =
        BitMapBackend::new(path, (PANEL * cols as u32, PANEL * rows as u32)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    for (area, ((title, _), gen)) in root
        .split_evenly((rows, cols))
        .iter()
        .zip(panels.iter().zip(&gens))
    {
        let mut c = panel(area, title, r)?;
        scatter(&mut c, &real, TARGET, 0.25, 2)?;
        scatter(&mut c, gen, GENERATED, 0.6, 2)?;
    }
    root.present()?;
    Ok(())
}

/// Draws `figures` of a finished run folder again (with `sets` applied to its config); a
/// reflow parent also gets `reflow.png` and `fm_vs_reflow.gif`. Returns the files written.
pub fn redraw_run(
    run_dir: &Path,
    figures: &[Figure],
    sets: &[crate::config::Override],
) -> Result<Vec<PathBuf>> {
    // A reflow parent is finished when its own summary is there (written after the chain).
    let parent = crate::folder::RunPaths::new(run_dir);
    let rows = parent.read_reflow_rows()?;
    let _parent_lock = if rows.is_some() {
        Some(crate::folder::open_finished(run_dir)?)
    } else {
        None
    };
    let cfg_dir = if rows.is_some() {
        run_dir.join("rf1")
    } else {
        run_dir.to_path_buf()
    };
    let run = crate::folder::open_run(&cfg_dir, sets)?;
    let (model, checked) = (run.model, run.exp);
    let (dim, dev) = (checked.dim(), checked.device.clone());
    let mut written = plot_run(&model, &checked, &cfg_dir, &dev, figures)?;
    if let Some(rows) = rows {
        // The last flow of the chain lives in the folder named after its row.
        let last_dir = rows.last().map(|r| run_dir.join(r.flow.folder()));
        let last = match last_dir {
            Some(d) if d.join("model.safetensors").is_file() => {
                checked
                    .model
                    .load(dim, &d.join("model.safetensors"), &dev)?
            }
            _ => model.duplicate()?,
        };
        crate::reflow::reflow_figures(&checked, &model, &last, &rows, run_dir)?;
        written.push(run_dir.join("reflow.png"));
        written.push(run_dir.join("fm_vs_reflow.gif"));
    }
    Ok(written)
}
