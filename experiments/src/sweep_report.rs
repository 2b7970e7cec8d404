//! A sweep's tables, built from its finished runs: `summary.csv` / `summary.md` with one
//! column per swept key and one row per flow (a reflow run gives 1-RF, 2-RF, … rows), and,
//! with `[replicates]`, `summary_agg.csv` / `summary_agg.md`: per setting and iteration, n,
//! mean, standard deviation and 95% t-interval of every metric, plus the paired difference
//! when one axis compares two values; `sweep.png` (metrics against the first axis or the
//! reflow iteration); and the runs as sessions of TensorBoard's HParams dashboard.

use crate::folder::RunPaths;
use crate::hparams;
use crate::logging::{atomically, write_atomic};
use crate::metrics::{Metric, METRICS};
use crate::report::Summary;
use crate::stats::Interval;
use crate::sweep_plot::{self, Series, SweepFigure, DEFAULT_METRICS};
use anyhow::{anyhow, Context, Result};
use flowmatch_reflow::Flow;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `plan.json`: the planned runs and, per run, the value of each swept key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanFile {
    /// Run folders, in plan order.
    pub runs: Vec<String>,
    /// The swept keys (`[axes]`), in file order.
    #[serde(default)]
    pub axes: Vec<String>,
    /// The replicate keys (`[replicates]`), in file order.
    #[serde(default)]
    pub replicates: Vec<String>,
    /// Per run, its values of `axes` then `replicates`, as text.
    #[serde(default)]
    pub values: BTreeMap<String, Vec<String>>,
}

/// Either `plan.json` form: today's object, or the plain list of names earlier versions wrote.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyPlan {
    Names(Vec<String>),
    Plan(PlanFile),
}

impl PlanFile {
    /// Reads `DIR/plan.json` and checks it as a sweep file is checked (see [`Self::check`]).
    pub fn read(dir: &Path, max_runs: usize) -> Result<PlanFile> {
        let p = dir.join("plan.json");
        let text = std::fs::read_to_string(&p)
            .map_err(|_| anyhow!("{} is not a sweep folder (no plan.json)", dir.display()))?;
        let plan = match serde_json::from_str(&text)
            .with_context(|| format!("reading {}", p.display()))?
        {
            AnyPlan::Names(runs) => PlanFile {
                runs,
                ..PlanFile::default()
            },
            AnyPlan::Plan(plan) => plan,
        };
        plan.check(max_runs)
            .map_err(|m| anyhow!("{}: {m}", p.display()))?;
        Ok(plan)
    }

    /// Run names that are folder names inside the sweep folder, each once; at least one run
    /// and at most `max_runs`; per run, one value per swept key.
    pub fn check(&self, max_runs: usize) -> Result<(), String> {
        if self.runs.is_empty() {
            return Err("runs: the plan lists no runs".into());
        }
        if self.runs.len() > max_runs {
            return Err(format!(
                "runs: {} runs, over --max-runs {max_runs}; raise --max-runs if the sweep is that large",
                self.runs.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.runs {
            crate::config::check_name(r).map_err(|m| format!("runs: {m}"))?;
            if !seen.insert(r.as_str()) {
                return Err(format!("runs: '{r}' is listed twice"));
            }
        }
        let n = self.axes.len() + self.replicates.len();
        for (run, vals) in &self.values {
            if !seen.contains(run.as_str()) {
                return Err(format!("values: '{run}' is not a planned run"));
            }
            if vals.len() != n {
                return Err(format!(
                    "values: '{run}' has {} values for {n} swept keys",
                    vals.len()
                ));
            }
        }
        Ok(())
    }
}

/// A value of a swept key as a table cell.
pub fn cell(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One row of the sweep table: a run, or one flow of a reflow run.
struct Row {
    run: String,
    values: Vec<String>,
    /// Its flow in a reflow run (none for a run without reflow).
    flow: Option<Flow>,
    summary: Summary,
}

impl Row {
    /// The table's `iteration` cell: the flow's label, or empty.
    fn iteration(&self) -> String {
        self.flow.map(|f| f.to_string()).unwrap_or_default()
    }

    /// Its value of `m` (NaN when the run did not measure it).
    fn value(&self, m: &Metric) -> f64 {
        (m.value)(&self.summary)
    }
}

/// The registry's metrics that at least one row measured, in registry order (a column no
/// run has is left out).
fn shown(rows: &[Row]) -> Vec<&'static Metric> {
    METRICS
        .iter()
        .filter(|m| rows.iter().any(|r| !r.value(m).is_nan()))
        .collect()
}

fn num(x: f64) -> String {
    if x.is_nan() {
        String::new()
    } else if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:.3e}")
    } else {
        format!("{x:.5}")
    }
}

/// The rows of a finished run: itself, or each flow of its reflow chain.
fn rows_of(dir: &Path, run: &str, values: &[String], s: Summary) -> Result<Vec<Row>> {
    let Some(flows) = &s.reflow else {
        return Ok(vec![Row {
            run: run.to_string(),
            values: values.to_vec(),
            flow: None,
            summary: s,
        }]);
    };
    flows
        .iter()
        .map(|f| {
            Ok(Row {
                run: run.to_string(),
                values: values.to_vec(),
                flow: Some(f.flow),
                summary: RunPaths::new(dir.join(run).join(f.flow.folder())).read_summary()?,
            })
        })
        .collect()
}

/// What a merge found.
pub struct Merged {
    /// Runs with a summary.
    pub finished: usize,
    /// The planned runs without one, in plan order.
    pub missing: Vec<String>,
}

/// A sweep folder's plan and the rows of its finished runs.
struct Gathered {
    plan: PlanFile,
    rows: Vec<Row>,
    finished: usize,
    missing: Vec<String>,
    /// Whether any run is a reflow chain (the table gets an `iteration` column).
    reflow: bool,
}

fn gather(dir: &Path, max_runs: usize) -> Result<Gathered> {
    let plan = PlanFile::read(dir, max_runs)?;
    let mut rows = vec![];
    let mut missing = vec![];
    let mut finished = 0;
    for run in &plan.runs {
        crate::signals::check(&format!("merging {}", dir.display()))?;
        let paths = RunPaths::new(dir.join(run));
        if !paths.finished() {
            missing.push(run.clone());
            continue;
        }
        finished += 1;
        let values = plan.values.get(run).cloned().unwrap_or_default();
        rows.extend(rows_of(dir, run, &values, paths.read_summary()?)?);
    }
    let reflow = rows.iter().any(|r| r.flow.is_some());
    Ok(Gathered {
        plan,
        rows,
        finished,
        missing,
        reflow,
    })
}

/// Writes the sweep folder's tables, `sweep.png` and the HParams sessions from its finished
/// runs (also merging the results of shards run elsewhere into the same folder).
pub fn merge(dir: &Path, max_runs: usize) -> Result<Merged> {
    let g = gather(dir, max_runs)?;
    let (plan, rows, reflow) = (&g.plan, &g.rows, g.reflow);
    let keys: Vec<&String> = plan.axes.iter().chain(&plan.replicates).collect();
    let mut head: Vec<String> = vec!["run".into()];
    head.extend(keys.iter().map(|k| k.to_string()));
    if reflow {
        head.push("iteration".into());
    }
    // The run's settings, each with the key that sets it: a column that only repeats a swept
    // key's values (`coupling` beside a `loss.coupling` axis) is left out.
    type Setting = fn(&Summary) -> String;
    let settings: [(&str, &str, Setting); 5] = [
        ("coupling", "loss.coupling", |s| s.coupling.to_string()),
        ("path", "loss.path", |s| s.path.clone()),
        ("solver", "solver.method", |s| s.eval.solver.to_string()),
        ("solver_steps", "solver.steps", |s| {
            s.eval.solver_steps.to_string()
        }),
        ("train_steps", "train.steps", |s| s.train_steps.to_string()),
    ];
    let repeats = |key: &str, cell: Setting| match keys.iter().position(|k| *k == key) {
        Some(i) => rows
            .iter()
            .all(|r| r.values.get(i).is_some_and(|v| *v == cell(&r.summary))),
        None => false,
    };
    let settings: Vec<(&str, Setting)> = settings
        .into_iter()
        .filter(|(_, key, cell)| !repeats(key, *cell))
        .map(|(name, _, cell)| (name, cell))
        .collect();
    head.extend(settings.iter().map(|(name, _)| name.to_string()));
    let shown = shown(rows);
    head.extend(shown.iter().map(|m| m.name.to_string()));
    head.push("nfe".into());
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let s = &r.summary;
            let mut v = vec![r.run.clone()];
            v.extend((0..keys.len()).map(|i| r.values.get(i).cloned().unwrap_or_default()));
            if reflow {
                v.push(r.iteration());
            }
            v.extend(settings.iter().map(|(_, cell)| cell(s)));
            v.extend(shown.iter().map(|m| num(r.value(m))));
            v.push(s.nfe.to_string());
            v
        })
        .collect();
    write_tables(dir, "summary", &head, &table)?;
    if !plan.replicates.is_empty() {
        aggregate(dir, plan, rows, reflow, &shown)?;
    }
    if !rows.is_empty() {
        let metrics = DEFAULT_METRICS.map(String::from);
        let fig = figure(&g, &metrics)?;
        atomically(&dir.join(sweep_plot::FILE), |tmp| {
            sweep_plot::draw(tmp, &fig)
        })?;
        write_hparams(dir, &g, &shown)?;
    }
    Ok(Merged {
        finished: g.finished,
        missing: g.missing,
    })
}

/// Draws `sweep.png` again from the finished runs, with `metrics` (default: straightness,
/// W2 @1, W2 @100); returns its path.
pub fn redraw(dir: &Path, metrics: &[String]) -> Result<PathBuf> {
    let g = gather(dir, crate::sweep::DEFAULT_MAX_RUNS)?;
    if g.rows.is_empty() {
        return Err(anyhow!(
            "nothing to draw: no run of {} has finished",
            dir.display()
        ));
    }
    let metrics: Vec<String> = if metrics.is_empty() {
        DEFAULT_METRICS.map(String::from).to_vec()
    } else {
        metrics.to_vec()
    };
    let fig = figure(&g, &metrics)?;
    let path = dir.join(sweep_plot::FILE);
    atomically(&path, |tmp| sweep_plot::draw(tmp, &fig))?;
    Ok(path)
}

/// The last part of a dotted key (`loss.coupling` → `coupling`), for legends.
fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// What `sweep.png` shows: x is the reflow iteration (a reflow sweep) or the first axis;
/// each other combination of axis values is a line; replicates give the band.
fn figure(g: &Gathered, metrics: &[String]) -> Result<SweepFigure> {
    let cols: Vec<&Metric> = metrics
        .iter()
        .map(|m| {
            crate::metrics::find(m).ok_or_else(|| {
                let known: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
                anyhow!(
                    "unknown sweep metric `{m}`: expected one of {}",
                    known.join(", ")
                )
            })
        })
        .collect::<Result<_>>()?;
    let (plan, rows) = (&g.plan, &g.rows);
    let na = plan.axes.len();
    // A run without reflow in a reflow sweep is its first flow.
    let x_of = |r: &Row| -> String {
        if g.reflow {
            r.flow.unwrap_or(Flow::Rectified(1)).to_string()
        } else {
            r.values
                .first()
                .filter(|_| na > 0)
                .cloned()
                .unwrap_or_default()
        }
    };
    let line_axes: Vec<usize> = if g.reflow {
        (0..na).collect()
    } else {
        (1..na).collect()
    };
    let line_of = |r: &Row| -> String {
        let parts: Vec<String> = line_axes
            .iter()
            .filter_map(|&i| Some(format!("{}={}", short(&plan.axes[i]), r.values.get(i)?)))
            .collect();
        if parts.is_empty() {
            "all runs".into()
        } else {
            parts.join(", ")
        }
    };
    // Each row's x position and line, once.
    let placed: Vec<(String, String, &Row)> =
        rows.iter().map(|r| (x_of(r), line_of(r), r)).collect();
    let mut ticks: Vec<String> = vec![];
    let mut labels: Vec<String> = vec![];
    for (x, l, _) in &placed {
        if !ticks.contains(x) {
            ticks.push(x.clone());
        }
        if !labels.contains(l) {
            labels.push(l.clone());
        }
    }
    let panels = cols
        .iter()
        .map(|&m| {
            let lines = labels
                .iter()
                .map(|l| Series {
                    label: l.clone(),
                    points: ticks
                        .iter()
                        .map(|x| {
                            let xs: Vec<f64> = placed
                                .iter()
                                .filter(|(px, pl, _)| px == x && pl == l)
                                .map(|(_, _, r)| r.value(m))
                                .collect();
                            let i = Interval::of(&xs);
                            (i.n > 0).then_some(i)
                        })
                        .collect(),
                })
                .collect();
            (m.name.to_string(), lines)
        })
        .collect();
    Ok(SweepFigure {
        x_title: if g.reflow {
            "reflow iteration".into()
        } else {
            plan.axes.first().cloned().unwrap_or_default()
        },
        x_ticks: ticks,
        panels,
    })
}

/// Whether a run logged to TensorBoard: an event file in its folder or in a flow's (`rf*`).
fn logged_to_tensorboard(run_dir: &Path) -> bool {
    has_events(run_dir)
        || std::fs::read_dir(run_dir).is_ok_and(|es| {
            es.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("rf") && has_events(&e.path()))
        })
}

fn has_events(d: &Path) -> bool {
    std::fs::read_dir(d).is_ok_and(|es| {
        es.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
    })
}

/// The table's rows as HParams sessions, for the runs that logged to TensorBoard.
fn write_hparams(dir: &Path, g: &Gathered, shown: &[&Metric]) -> Result<()> {
    let mut keys: Vec<String> = g
        .plan
        .axes
        .iter()
        .chain(&g.plan.replicates)
        .cloned()
        .collect();
    if g.reflow {
        keys.push("iteration".into());
    }
    let sessions: Vec<hparams::Session> = g
        .rows
        .iter()
        .filter(|r| logged_to_tensorboard(&dir.join(&r.run)))
        .map(|r| {
            let mut values = r.values.clone();
            let mut name = r.run.clone();
            if g.reflow {
                let flow = r.flow.unwrap_or(Flow::Rectified(1));
                values.push(flow.to_string());
                name = format!("{}/{}", r.run, flow.folder());
            }
            hparams::Session {
                name,
                hparams: keys.iter().cloned().zip(values).collect(),
                // A metric the run did not measure (W2 at 4 steps without 4 in eval.steps, NLL
                // without a Gaussian source) is left out rather than logged as NaN.
                metrics: shown
                    .iter()
                    .map(|m| (m.name.to_string(), r.value(m)))
                    .filter(|(_, v)| !v.is_nan())
                    .collect(),
            }
        })
        .collect();
    if sessions.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = shown.iter().map(|m| m.name).collect();
    hparams::write(dir, &keys, &names, &sessions)
}

/// Writes `NAME.csv` and `NAME.md`.
fn write_tables(dir: &Path, name: &str, head: &[String], rows: &[Vec<String>]) -> Result<()> {
    write_atomic(
        &dir.join(format!("{name}.csv")),
        csv_text(head, rows).as_bytes(),
    )?;
    write_atomic(
        &dir.join(format!("{name}.md")),
        md_table(head, rows).as_bytes(),
    )?;
    Ok(())
}

fn csv_text(head: &[String], rows: &[Vec<String>]) -> String {
    let cell = |c: &String| {
        if c.contains([',', '"']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.clone()
        }
    };
    let line = |r: &[String]| r.iter().map(cell).collect::<Vec<_>>().join(",") + "\n";
    let mut csv = line(head);
    for r in rows {
        csv.push_str(&line(r));
    }
    csv
}

/// `summary_agg.*`: replicates grouped by setting (the non-replicate values) and iteration;
/// with exactly one axis of two values, also `summary_diff.*`: second minus first, paired by
/// the replicate values.
fn aggregate(
    dir: &Path,
    plan: &PlanFile,
    rows: &[Row],
    reflow: bool,
    shown: &[&Metric],
) -> Result<()> {
    let na = plan.axes.len();
    let setting = |r: &Row| (r.values[..na.min(r.values.len())].to_vec(), r.iteration());
    // (the setting's values, the iteration) → its replicate rows, in table order.
    type Group<'a> = ((Vec<String>, String), Vec<&'a Row>);
    let mut groups: Vec<Group> = vec![];
    for r in rows {
        let key = setting(r);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let mut head: Vec<String> = plan.axes.clone();
    if reflow {
        head.push("iteration".into());
    }
    head.push("n".into());
    let mut md_head = head.clone();
    for m in shown.iter().map(|m| m.name) {
        head.extend([
            format!("{m}_mean"),
            format!("{m}_std"),
            format!("{m}_ci95_lo"),
            format!("{m}_ci95_hi"),
        ]);
        md_head.push(format!("{m} (mean ± 95% CI)"));
    }
    let (mut csv_rows, mut md_rows) = (vec![], vec![]);
    for ((values, iteration), g) in &groups {
        let mut lead = values.clone();
        if reflow {
            lead.push(iteration.clone());
        }
        lead.push(g.len().to_string());
        let (mut c, mut m) = (lead.clone(), lead);
        for metric in shown {
            let xs: Vec<f64> = g.iter().map(|r| r.value(metric)).collect();
            let i = Interval::of(&xs);
            c.extend([
                num(i.mean),
                num(i.std),
                num(i.mean - i.half),
                num(i.mean + i.half),
            ]);
            m.push(if i.n == 0 {
                String::new()
            } else {
                format!("{} ± {}", num(i.mean), num(i.half))
            });
        }
        csv_rows.push(c);
        md_rows.push(m);
    }
    write_atomic(
        &dir.join("summary_agg.csv"),
        csv_text(&head, &csv_rows).as_bytes(),
    )?;
    let mut md = format!(
        "Per setting{}: n replicates ({}), mean ± half-width of the 95% interval of the mean, t(0.975, n − 1) · s / √n.\n\n{}",
        if reflow { " and reflow iteration" } else { "" },
        plan.replicates.join(", "),
        md_table(&md_head, &md_rows)
    );
    write_atomic(&dir.join("summary_agg.md"), md.as_bytes())?;
    // The paired difference, where one axis compares two values.
    let two = compared_values(plan, rows);
    if two.len() != 2 {
        return Ok(());
    }
    let (dhead, drows) = paired_differences(rows, na, reflow, shown, [two[0], two[1]]);
    write_tables(dir, "summary_diff", &dhead, &drows)?;
    // summary_agg.md also names the comparison and holds the difference table.
    md.push_str(&format!(
        "\nDifference {} = {} minus {} = {}, paired by {}: mean and 95% t-interval of the paired differences; \"beyond_noise\" where the interval leaves out 0.\n\n{}",
        plan.axes[0],
        two[1],
        plan.axes[0],
        two[0],
        plan.replicates.join(", "),
        md_table(&dhead, &drows)
    ));
    write_atomic(&dir.join("summary_agg.md"), md.as_bytes())?;
    Ok(())
}

/// The values of the one axis, in table order, when the sweep has exactly one (the paired
/// difference compares them when there are two).
fn compared_values<'a>(plan: &PlanFile, rows: &'a [Row]) -> Vec<&'a String> {
    match (plan.axes.as_slice(), rows.first()) {
        ([_], Some(_)) => {
            let mut vals: Vec<&String> = vec![];
            for r in rows {
                if let Some(v) = r.values.first() {
                    if !vals.contains(&v) {
                        vals.push(v);
                    }
                }
            }
            vals
        }
        _ => vec![],
    }
}

/// `summary_diff`'s header and rows: per flow and metric, the mean and 95% t-interval of
/// the differences `two[1] − two[0]` of the one axis, paired by the replicate values (the
/// values after the first `na`).
fn paired_differences(
    rows: &[Row],
    na: usize,
    reflow: bool,
    shown: &[&Metric],
    two: [&String; 2],
) -> (Vec<String>, Vec<Vec<String>>) {
    let mut iterations: Vec<Option<Flow>> = vec![];
    for r in rows {
        if !iterations.contains(&r.flow) {
            iterations.push(r.flow);
        }
    }
    let mut dhead: Vec<String> = vec![];
    if reflow {
        dhead.push("iteration".into());
    }
    dhead.extend(
        [
            "metric",
            "n",
            "mean_difference",
            "ci95_lo",
            "ci95_hi",
            "beyond_noise",
        ]
        .map(String::from),
    );
    let mut drows = vec![];
    for it in iterations {
        let side = |v: &String| -> BTreeMap<&[String], &Row> {
            rows.iter()
                .filter(|r| r.flow == it && r.values.first() == Some(v))
                .map(|r| (&r.values[na..], r))
                .collect()
        };
        let (a, b) = (side(two[0]), side(two[1]));
        for m in shown {
            let metric = &m.name;
            let ds: Vec<f64> = a
                .iter()
                .filter_map(|(seed, ra)| b.get(seed).map(|rb| rb.value(m) - ra.value(m)))
                .collect();
            let i = Interval::of(&ds);
            if i.n == 0 {
                continue;
            }
            let mut row = vec![];
            if reflow {
                row.push(it.map(|f| f.to_string()).unwrap_or_default());
            }
            row.extend([
                metric.to_string(),
                i.n.to_string(),
                num(i.mean),
                num(i.mean - i.half),
                num(i.mean + i.half),
                if i.excludes_zero() { "yes" } else { "no" }.to_string(),
            ]);
            drows.push(row);
        }
    }
    (dhead, drows)
}

fn md_table(head: &[String], rows: &[Vec<String>]) -> String {
    let mut md = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for r in rows {
        md.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_files_of_earlier_versions_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("plan.json"), r#"["000_a", "001_b"]"#).unwrap();
        let p = PlanFile::read(tmp.path(), 1000).unwrap();
        assert_eq!(p.runs, ["000_a", "001_b"]);
        assert!(p.axes.is_empty() && p.values.is_empty());
        let e = PlanFile::read(&tmp.path().join("nope"), 1000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a sweep folder"), "{e}");
    }

    #[test]
    fn crafted_plans_are_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let bad = |json: &str, max: usize| {
            std::fs::write(tmp.path().join("plan.json"), json).unwrap();
            PlanFile::read(tmp.path(), max).unwrap_err().to_string()
        };
        let e = bad(r#"["../o1/lesson_moons"]"#, 1000);
        assert!(
            e.contains("plan.json") && e.contains("not a usable name"),
            "{e}"
        );
        let e = bad(r#"["000_a", "000_a"]"#, 1000);
        assert!(e.contains("'000_a' is listed twice"), "{e}");
        let e = bad(r#"{"runs": []}"#, 1000);
        assert!(e.contains("no runs"), "{e}");
        let e = bad(r#"["a", "b", "c"]"#, 2);
        assert!(e.contains("3 runs") && e.contains("--max-runs 2"), "{e}");
        let e = bad(
            r#"{"runs": ["a"], "axes": ["k"], "values": {"a": ["1", "2"]}}"#,
            1000,
        );
        assert!(e.contains("2 values for 1 swept keys"), "{e}");
        let e = bad(
            r#"{"runs": ["a"], "axes": ["k"], "values": {"b": ["1"]}}"#,
            1000,
        );
        assert!(e.contains("'b' is not a planned run"), "{e}");
    }
}
