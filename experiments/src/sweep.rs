//! Sweeps: a base config, fixed overrides and axes whose cartesian product is run in parallel
//! (one candle thread per run), resumable and shardable across a cluster.

use crate::check::Plan;
use crate::config::{
    check_name, describe_differences, fnv1a, resolve_relative, Config, ConfigError, ConfigSource,
    Override,
};
use crate::experiment::Experiment;
use crate::folder::{OnChange, RunOptions, RunPaths};
use crate::lock::{refuse_link, LockError, RunLock, SweepClaim};
use crate::logging::write_atomic;
use crate::run::{evaluate_trained, progress_bar};
use crate::sweep_report::{cell, merge, PlanFile};
use anyhow::{anyhow, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A sweep file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    /// Base config, relative to the sweep file or absolute.
    base: String,
    /// Sweep name (default: the sweep file's stem).
    name: Option<String>,
    /// Overrides applied to every run.
    #[serde(default)]
    set: toml::Table,
    /// Axes: key → list of values; their cartesian product is run.
    #[serde(default)]
    axes: toml::Table,
    /// Replicates: key → list of values (seeds), crossed with the axes like one more axis;
    /// the sweep also reports mean and interval over them (`summary_agg`).
    #[serde(default)]
    replicates: toml::Table,
    /// Variants: name → a table of overrides; one more axis, `variant`, whose values are the
    /// names (methods that differ in several keys: `[variants.meanflow]
    /// "loss.objective" = "meanflow"`, `[variants.reflow] "reflow.iterations" = 1`).
    #[serde(default)]
    variants: toml::Table,
}

/// The axis of `[variants]`.
pub const VARIANT: &str = "variant";

/// One planned run of a sweep.
pub struct PlannedRun {
    pub name: String,
    /// Its values of the swept keys (axes, then replicates).
    pub values: Vec<(String, toml::Value)>,
    /// The checked config; built into an experiment when the run starts.
    pub plan: Plan,
}

/// A parsed, validated sweep.
pub struct Sweep {
    pub name: String,
    /// The sweep file it was planned from (errors name it).
    pub file: PathBuf,
    pub runs: Vec<PlannedRun>,
    /// The swept keys and the replicate keys, in file order.
    pub axes: Vec<String>,
    pub replicates: Vec<String>,
}

/// The most runs a sweep plans unless `--max-runs` says otherwise.
pub const DEFAULT_MAX_RUNS: usize = 1000;

/// An axis value as a short folder-name part: floats in their shorter form (`1e-300`, not
/// 300 digits), other characters than `[A-Za-z0-9.-]` as `_`, and at most 32 characters (a
/// longer one keeps 23 and adds a hash of the whole value, so that names stay distinct).
fn value_label(v: &toml::Value) -> String {
    let s = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => {
            let (plain, sci) = (format!("{f}"), format!("{f:e}"));
            if sci.len() < plain.len() {
                sci
            } else {
                plain
            }
        }
        other => other.to_string(),
    };
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.len() <= 32 {
        clean
    } else {
        format!("{}~{:08x}", &clean[..23], fnv1a(&s) as u32)
    }
}

/// The swept keys of a sweep file with their values, in file order: `variant` (the names of
/// `[variants]`) first, then `[axes]`, then `[replicates]`. Each list is non-empty and
/// without repeats, replicate keys are seeds, and no key is swept twice or also set by a
/// variant.
fn axes_of(file: &SweepFile, path: &Path) -> Result<Vec<(String, Vec<toml::Value>)>, ConfigError> {
    let mut axes: Vec<(String, Vec<toml::Value>)> = vec![];
    for (name, v) in &file.variants {
        if !matches!(v, toml::Value::Table(_)) {
            return Err(ConfigError(format!(
                "{}: variant '{name}' must be a table of overrides ([variants.{name}])",
                path.display()
            )));
        }
    }
    if !file.variants.is_empty() {
        if file.axes.contains_key(VARIANT) || file.replicates.contains_key(VARIANT) {
            return Err(ConfigError(format!(
                "{}: '{VARIANT}' is the axis of [variants]; it cannot also be an axis or a replicate key",
                path.display()
            )));
        }
        let names = file.variants.keys().cloned().map(toml::Value::String);
        axes.push((VARIANT.to_string(), names.collect()));
    }
    for (table, what) in [(&file.axes, "axis"), (&file.replicates, "replicate key")] {
        for (k, v) in table {
            if axes.iter().any(|(a, _)| a == k) {
                return Err(ConfigError(format!(
                    "{}: '{k}' is both an axis and a replicate key",
                    path.display()
                )));
            }
            if what == "replicate key" && !k.ends_with(".seed") {
                return Err(ConfigError(format!(
                    "{}: [replicates] '{k}' is not a seed; replicates repeat a setting over seeds (train.seed, eval.seed): put other keys in [axes]",
                    path.display()
                )));
            }
            match v {
                toml::Value::Array(vals) if !vals.is_empty() => {
                    if let Some(d) = crate::check::first_repeat(vals) {
                        return Err(ConfigError(format!(
                            "{}: {what} '{k}' lists {d} twice (each value is one run, so it would count twice)",
                            path.display()
                        )));
                    }
                    axes.push((k.clone(), vals.clone()))
                }
                _ => {
                    return Err(ConfigError(format!(
                        "{}: {what} '{k}' must be a non-empty list",
                        path.display()
                    )))
                }
            }
        }
    }
    // A variant that sets a swept key would silently override the axis (or the reverse).
    for (name, v) in &file.variants {
        if let toml::Value::Table(t) = v {
            if let Some(k) = t
                .keys()
                .find(|k| file.axes.contains_key(*k) || file.replicates.contains_key(*k))
            {
                return Err(ConfigError(format!(
                    "{}: '{k}' is set by [variants.{name}] and is also swept in [axes] or [replicates]; set it in one place",
                    path.display()
                )));
            }
        }
    }
    Ok(axes)
}

/// The cartesian product of the axes' values, the last axis varying fastest.
fn combinations(axes: &[(String, Vec<toml::Value>)]) -> Vec<Vec<(String, toml::Value)>> {
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for (k, vals) in axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                vals.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((k.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    combos
}

/// Reads a sweep file and validates every run's config before anything runs; a sweep of more
/// than `max_runs` runs is refused with its count before any is planned.
pub fn plan(path: &Path, extra_sets: &[Override], max_runs: usize) -> Result<Sweep, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    let file: SweepFile = toml::from_str(&text).map_err(|e| {
        ConfigError(format!(
            "{}: {}",
            path.display(),
            e.message().trim().replace('\n', " ")
        ))
    })?;
    let base = resolve_relative(&file.base, path);
    let name = file.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or("sweep".into())
    });
    check_name(&name).map_err(|m| ConfigError(format!("{}: name: {m}", path.display())))?;
    let axes = axes_of(&file, path)?;
    let count = axes
        .iter()
        .try_fold(1usize, |n, (_, vals)| n.checked_mul(vals.len()));
    match count {
        Some(n) if n <= max_runs => {}
        _ => {
            let n = count.map_or("more than 2^64".to_string(), |n| n.to_string());
            return Err(ConfigError(format!(
                "{}: the axes make {n} runs, over --max-runs {max_runs}; shrink the axes or raise --max-runs",
                path.display()
            )));
        }
    }
    let set_origin = format!("{} [set]", path.display());
    let axis_origin = format!("{} [axes]", path.display());
    let replicate_origin = format!("{} [replicates]", path.display());
    let combos = combinations(&axes);
    let mut runs = vec![];
    for (i, combo) in combos.into_iter().enumerate() {
        crate::signals::check(&format!("planning sweep {}", path.display()))
            .map_err(|e| ConfigError(e.to_string()))?;
        let label: Vec<String> = combo
            .iter()
            .map(|(k, v)| format!("{}-{}", k.rsplit('.').next().unwrap_or(k), value_label(v)))
            .collect();
        let run_name = if label.is_empty() {
            format!("{i:03}")
        } else {
            format!("{i:03}_{}", label.join("_"))
        };
        let values = combo.clone();
        let mut sets: Vec<Override> = file
            .set
            .iter()
            .map(|(k, v)| Override::new(k, v.clone(), &set_origin))
            .collect();
        for (k, v) in combo {
            match (k.as_str(), &v) {
                (VARIANT, toml::Value::String(name)) => {
                    let origin = format!("{} [variants.{name}]", path.display());
                    if let Some(toml::Value::Table(t)) = file.variants.get(name) {
                        sets.extend(t.iter().map(|(k, v)| Override::new(k, v.clone(), &origin)));
                    }
                }
                _ if file.replicates.contains_key(&k) => {
                    sets.push(Override::new(&k, v, &replicate_origin))
                }
                _ => sets.push(Override::new(&k, v, &axis_origin)),
            }
        }
        sets.extend(extra_sets.iter().cloned());
        sets.push(Override::new(
            "name",
            toml::Value::String(run_name.clone()),
            format!("sweep {}", path.display()),
        ));
        let plan = Config::load(&ConfigSource {
            file: Some(&base),
            sets: &sets,
        })
        .map_err(|e| ConfigError(format!("sweep {} run {run_name}: {}", path.display(), e.0)))?;
        runs.push(PlannedRun {
            name: run_name,
            values,
            plan,
        });
    }
    Ok(Sweep {
        name,
        file: path.to_path_buf(),
        runs,
        axes: (!file.variants.is_empty())
            .then(|| VARIANT.to_string())
            .into_iter()
            .chain(file.axes.keys().cloned())
            .collect(),
        replicates: file.replicates.keys().cloned().collect(),
    })
}

/// Parses `--shard I/N` (0-based `I < N`).
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("--shard '{s}': expected I/N with 0 ≤ I < N");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// What a sweep invocation did.
pub struct SweepReport {
    pub dir: PathBuf,
    pub ran: usize,
    pub skipped: usize,
    /// Runs another process was writing (another shard, a second invocation): left to it.
    pub busy: Vec<String>,
    /// Runs stopped by SIGTERM / Ctrl-C (checkpointed) or not started after one.
    pub stopped: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// The sweep's runs grouped by training: runs whose configs differ only in keys that the
/// evaluation reads (`solver.*`, `eval.*`, the name) train once, the first of each group;
/// a reflow run or one with progress scores (`eval.every`) trains alone. Indices in plan
/// order, groups in the order of their first run.
pub fn training_groups(runs: &[PlannedRun]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<String>, Vec<usize>)> = vec![];
    for (i, r) in runs.iter().enumerate() {
        let k = r.plan.training_key();
        match groups.iter_mut().find(|(g, _)| k.is_some() && *g == k) {
            Some((_, members)) => members.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    groups.into_iter().map(|(_, m)| m).collect()
}

/// The runs of `runs` whose folder holds a run made with another config, with the keys.
fn changed_runs(dir: &Path, runs: &[&PlannedRun]) -> Result<Vec<(String, Vec<String>)>> {
    let mut changed = vec![];
    for r in runs {
        let stored = RunPaths::new(dir.join(&r.name)).config();
        if stored.is_file() {
            let old = Config::read_resolved(&stored).map_err(|e| anyhow!(e.0))?;
            let diffs = old.differences(r.plan.config());
            if !diffs.is_empty() {
                changed.push((r.name.clone(), diffs));
            }
        }
    }
    Ok(changed)
}

/// How one run of a sweep went.
enum Outcome {
    Ran,
    Busy,
    Stopped,
    Failed(String),
}

/// Runs `r` in `dir` (training, or evaluating the model its `trainer` run trained), unless
/// another process holds its folder, a stop was asked for, or its training did not finish.
fn run_one(r: &PlannedRun, trainer: &PlannedRun, dir: &Path, run_opts: RunOptions) -> Outcome {
    let trained_dir = dir.join(&trainer.name);
    match RunLock::acquire(&dir.join(&r.name)) {
        // After a stop request, no new run starts.
        _ if crate::signals::stop_requested() => Outcome::Stopped,
        Err(LockError::Busy { .. }) => Outcome::Busy,
        Err(e) => Outcome::Failed(e.to_string()),
        // A variant whose training did not finish here waits for a later invocation.
        Ok(_) if trainer.name != r.name && !RunPaths::new(trained_dir.clone()).finished() => {
            Outcome::Failed(format!("its training run {} did not finish", trainer.name))
        }
        Ok(lock) => {
            let ran = Experiment::build(&r.plan).and_then(|exp| {
                if trainer.name == r.name {
                    crate::reflow::run_experiment(&exp, &lock, run_opts)
                } else {
                    let pb = indicatif::ProgressBar::hidden();
                    evaluate_trained(&exp, lock.dir(), &trained_dir, &pb, run_opts)
                }
            });
            match ran {
                Ok(_) => Outcome::Ran,
                Err(e) if crate::signals::is_stop(&e) => Outcome::Stopped,
                Err(e) => Outcome::Failed(format!("{e:#}")),
            }
        }
    }
}

impl SweepReport {
    /// The tally of a sweep invocation's outcomes.
    fn of(dir: PathBuf, skipped: usize, results: Vec<(String, Outcome)>) -> Self {
        let mut report = SweepReport {
            dir,
            ran: 0,
            skipped,
            busy: vec![],
            stopped: vec![],
            failed: vec![],
        };
        for (name, outcome) in results {
            match outcome {
                Outcome::Ran => report.ran += 1,
                Outcome::Busy => report.busy.push(name),
                Outcome::Stopped => report.stopped.push(name),
                Outcome::Failed(e) => report.failed.push((name, e)),
            }
        }
        report
    }
}

/// Joins the sweep folder `dir` for this plan (shards of it work together; a sweep of
/// another plan is refused while it runs) and writes `plan.json`; the claim is held while
/// the value lives.
fn open_sweep_dir(sweep: &Sweep, dir: &Path) -> Result<SweepClaim> {
    // Shards of this plan work together; a sweep of another plan is refused while it runs.
    let fingerprint = format!(
        "{:016x}",
        fnv1a(
            &sweep
                .runs
                .iter()
                .map(|r| format!("{} {}\n", r.name, r.plan.fingerprint()))
                .collect::<String>()
        )
    );
    let claim = SweepClaim::join(
        dir,
        &fingerprint,
        &format!("sweep {}", sweep.file.display()),
    )?;
    let plan = PlanFile {
        runs: sweep.runs.iter().map(|r| r.name.clone()).collect(),
        axes: sweep.axes.clone(),
        replicates: sweep.replicates.clone(),
        values: sweep
            .runs
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.values.iter().map(|(_, v)| cell(v)).collect(),
                )
            })
            .collect(),
    };
    // Every shard writes the same plan, each through its own temporary file.
    write_atomic(
        &dir.join("plan.json"),
        serde_json::to_string_pretty(&plan)?.as_bytes(),
    )?;
    Ok(claim)
}

/// Runs this shard's share of the sweep with `jobs` runs at a time (at most one per run);
/// finished runs are skipped, killed ones continue. Runs whose folder holds another config
/// stop the sweep before anything runs, unless `opts.on_change` redoes them.
pub fn execute(
    sweep: &Sweep,
    out: &Path,
    jobs: usize,
    shard: (usize, usize),
    opts: RunOptions,
) -> Result<SweepReport> {
    let dir = out.join(&sweep.name);
    let _claim = open_sweep_dir(sweep, &dir)?;
    // Shards take whole training groups, so that a group trains once, in one shard.
    let groups = training_groups(&sweep.runs);
    let mine: Vec<&PlannedRun> = groups
        .iter()
        .enumerate()
        .filter(|(g, _)| g % shard.1 == shard.0)
        .flat_map(|(_, members)| members.iter().map(|&i| &sweep.runs[i]))
        .collect();
    // The run whose training each run reuses (itself for the first of its group).
    let trainer_of = |r: &PlannedRun| -> &PlannedRun {
        let g = groups
            .iter()
            .find(|m| m.iter().any(|&i| sweep.runs[i].name == r.name))
            .expect("every run is in a group");
        &sweep.runs[g[0]]
    };
    // Never through a link left in place of a run folder: refused before anything runs.
    for r in &mine {
        refuse_link(&dir.join(&r.name))?;
    }
    let changed = changed_runs(&dir, &mine)?;
    if let (Some((first, diffs)), OnChange::Refuse) = (changed.first(), opts.on_change) {
        return Err(anyhow!(
            "sweep {}: {} run(s) in {} were made with another config, e.g. {first}: {}; rerun with --redo-changed to redo them (the others are kept)",
            sweep.name,
            changed.len(),
            dir.display(),
            describe_differences(diffs)
        ));
    }
    let todo: Vec<&PlannedRun> = mine
        .iter()
        .copied()
        .filter(|r| {
            !RunPaths::new(dir.join(&r.name)).finished()
                || changed.iter().any(|(n, _)| *n == r.name)
        })
        .collect();
    let skipped = mine.len() - todo.len();
    let pb = progress_bar(todo.len() as u64, opts.show, &sweep.name);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.min(todo.len()).max(1))
        .build()?;
    let done = AtomicUsize::new(0);
    let run_opts = RunOptions {
        show: false,
        ..opts
    };
    let one = |r: &PlannedRun| -> (String, Outcome) {
        let trainer = trainer_of(r);
        let outcome = run_one(r, trainer, &dir, run_opts);
        pb.set_position(done.fetch_add(1, Ordering::SeqCst) as u64 + 1);
        (r.name.clone(), outcome)
    };
    // First the trainings, then the runs that evaluate a model trained in the first phase.
    let (train, reuse): (Vec<&PlannedRun>, Vec<&PlannedRun>) =
        todo.iter().partition(|r| trainer_of(r).name == r.name);
    let results: Vec<(String, Outcome)> = pool.install(|| {
        use rayon::prelude::*;
        let mut all: Vec<(String, Outcome)> = train.par_iter().map(|r| one(r)).collect();
        all.extend(reuse.par_iter().map(|r| one(r)).collect::<Vec<_>>());
        all
    });
    pb.finish_and_clear();
    let report = SweepReport::of(dir, skipped, results);
    if shard.1 == 1 && report.busy.is_empty() && report.stopped.is_empty() {
        merge(&report.dir, sweep.runs.len().max(DEFAULT_MAX_RUNS))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_validate() {
        assert_eq!(parse_shard("1/4"), Ok((1, 4)));
        assert!(parse_shard("4/4").is_err());
        assert!(parse_shard("a/b").is_err());
        assert!(parse_shard("1").is_err());
    }

    #[test]
    fn plan_is_the_cartesian_product_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), "[train]\nsteps = 5\n").unwrap();
        let sw = dir.path().join("sw.toml");
        std::fs::write(
            &sw,
            "base = \"base.toml\"\n[set]\n\"train.batch_size\" = 8\n[axes]\n\"loss.coupling\" = [\"independent\", \"ot\"]\n\"solver.method\" = [\"euler\", \"rk4\", \"heun\"]\n",
        )
        .unwrap();
        let s = plan(&sw, &[], DEFAULT_MAX_RUNS).unwrap();
        assert_eq!(s.runs.len(), 6);
        assert_eq!(s.runs[0].name, "000_coupling-independent_method-euler");
        assert_eq!(s.runs[5].name, "005_coupling-ot_method-heun");
        assert!(s
            .runs
            .iter()
            .all(|r| r.plan.train.batch_size == 8 && r.plan.train.steps == 5));
        std::fs::write(
            &sw,
            "base = \"base.toml\"\n[axes]\n\"solver.method\" = [\"euler\", \"leapfrog\"]\n",
        )
        .unwrap();
        let e = plan(&sw, &[], DEFAULT_MAX_RUNS).err().unwrap().0;
        assert!(e.contains("leapfrog") && e.contains("solver.method"), "{e}");
        // The error names the sweep file's axes as the value's source, not a code location.
        assert!(e.contains("sw.toml [axes]") && !e.contains(".rs"), "{e}");
    }

    #[test]
    fn names_that_escape_or_explode_are_refused_and_labels_stay_short() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), "[train]\nsteps = 5\n").unwrap();
        let sw = dir.path().join("sw.toml");
        for bad in ["../../x", "/abs", "", "a\\nb", ".hidden"] {
            std::fs::write(&sw, format!("base = \"base.toml\"\nname = \"{bad}\"\n")).unwrap();
            let e = plan(&sw, &[], DEFAULT_MAX_RUNS).err().unwrap().0;
            assert!(
                e.contains("name") && e.contains("not a usable name"),
                "{bad:?}: {e}"
            );
        }
        // 10^6 runs: refused with the count, before any is planned.
        let axis = format!(
            "[{}]",
            (0..100)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        std::fs::write(
            &sw,
            format!("base = \"base.toml\"\n[axes]\n\"train.seed\" = {axis}\n\"eval.seed\" = {axis}\n\"train.steps\" = {axis}\n"),
        )
        .unwrap();
        let e = plan(&sw, &[], DEFAULT_MAX_RUNS).err().unwrap().0;
        assert!(
            e.contains("1000000 runs") && e.contains("--max-runs"),
            "{e}"
        );
        // A tiny float is written in its short form; a long value is cut and hashed.
        std::fs::write(
            &sw,
            "base = \"base.toml\"\n[axes]\n\"train.weight_decay\" = [1e-300, 0.0]\n",
        )
        .unwrap();
        let s = plan(&sw, &[], DEFAULT_MAX_RUNS).unwrap();
        assert_eq!(s.runs[0].name, "000_weight_decay-1e-300");
        let long = toml::Value::String("x".repeat(300));
        let l = value_label(&long);
        assert!(l.len() <= 32 && l.starts_with("xxxx"), "{l}");
        assert_ne!(l, value_label(&toml::Value::String("x".repeat(301))));
    }

    #[test]
    fn silent_conflicts_in_a_sweep_file_are_errors_naming_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), "[train]\nsteps = 5\n").unwrap();
        let sw = dir.path().join("sw.toml");
        let err = |text: &str| {
            std::fs::write(&sw, format!("base = \"base.toml\"\n{text}")).unwrap();
            plan(&sw, &[], DEFAULT_MAX_RUNS).err().unwrap().0
        };
        // A variant that sets a swept key.
        let e = err("[axes]\n\"loss.coupling\" = [\"independent\"]\n[variants.ot]\n\"loss.coupling\" = \"ot\"\n");
        assert!(
            e.contains("loss.coupling") && e.contains("[variants.ot]"),
            "{e}"
        );
        // Repeated values would count one run twice.
        let e = err("[replicates]\n\"train.seed\" = [1, 1]\n");
        assert!(e.contains("train.seed") && e.contains("twice"), "{e}");
        let e = err("[axes]\n\"solver.steps\" = [5, 5]\n");
        assert!(e.contains("solver.steps") && e.contains("twice"), "{e}");
        // Replicates repeat over seeds only.
        let e = err("[replicates]\n\"train.lr\" = [0.1, 0.2]\n");
        assert!(e.contains("train.lr") && e.contains("not a seed"), "{e}");
        // A bad replicate value is blamed on [replicates], not [axes].
        let e = err("[replicates]\n\"train.seed\" = [1, \"x\"]\n");
        assert!(e.contains("[replicates]") && !e.contains("[axes]"), "{e}");
    }
}
