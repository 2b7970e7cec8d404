//! Sweeps: a base config, fixed overrides and axes whose cartesian product is run in parallel
//! (one candle thread per run), resumable and shardable across a cluster.

use crate::config::{resolve_relative, Checked, Config, ConfigError, ConfigSource};
use crate::logging::write_atomic;
use crate::run::{progress_bar, RunPaths, Summary};
use anyhow::{anyhow, Context, Result};
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
}

/// One planned run of a sweep.
pub struct PlannedRun {
    pub name: String,
    pub sets: Vec<(String, toml::Value)>,
    pub config: Config,
    pub checked: Checked,
}

/// A parsed, validated sweep.
pub struct Sweep {
    pub name: String,
    pub runs: Vec<PlannedRun>,
    pub axis_keys: Vec<String>,
}

fn value_label(v: &toml::Value) -> String {
    let s = match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Reads a sweep file and validates every run's config before anything runs.
pub fn plan(path: &Path, extra_sets: &[(String, toml::Value)]) -> Result<Sweep, ConfigError> {
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
    let mut axes: Vec<(String, Vec<toml::Value>)> = vec![];
    for (k, v) in &file.axes {
        match v {
            toml::Value::Array(vals) if !vals.is_empty() => axes.push((k.clone(), vals.clone())),
            _ => {
                return Err(ConfigError(format!(
                    "{}: axis '{k}' must be a non-empty list",
                    path.display()
                )))
            }
        }
    }
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for (k, vals) in &axes {
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
    let mut runs = vec![];
    for (i, combo) in combos.into_iter().enumerate() {
        let label: Vec<String> = combo
            .iter()
            .map(|(k, v)| format!("{}-{}", k.rsplit('.').next().unwrap_or(k), value_label(v)))
            .collect();
        let run_name = if label.is_empty() {
            format!("{i:03}")
        } else {
            format!("{i:03}_{}", label.join("_"))
        };
        let mut sets: Vec<(String, toml::Value)> = file
            .set
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        sets.extend(combo);
        sets.extend(extra_sets.iter().cloned());
        sets.push(("name".into(), toml::Value::String(run_name.clone())));
        let (config, checked) = Config::load(&ConfigSource {
            file: Some(&base),
            sets: &sets,
        })
        .map_err(|e| ConfigError(format!("sweep {} run {run_name}: {}", path.display(), e.0)))?;
        runs.push(PlannedRun {
            name: run_name,
            sets,
            config,
            checked,
        });
    }
    Ok(Sweep {
        name,
        runs,
        axis_keys: axes.into_iter().map(|(k, _)| k).collect(),
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
    pub failed: Vec<(String, String)>,
}

/// Runs this shard's share of the sweep with `jobs` runs at a time; finished runs are skipped.
pub fn execute(
    sweep: &Sweep,
    out: &Path,
    jobs: usize,
    shard: (usize, usize),
    progress: bool,
) -> Result<SweepReport> {
    let dir = out.join(&sweep.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let plan: Vec<&str> = sweep.runs.iter().map(|r| r.name.as_str()).collect();
    write_atomic(
        &dir.join("plan.json"),
        serde_json::to_string_pretty(&plan)?.as_bytes(),
    )?;
    let mine: Vec<&PlannedRun> = sweep
        .runs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % shard.1 == shard.0)
        .map(|(_, r)| r)
        .collect();
    let todo: Vec<&PlannedRun> = mine
        .iter()
        .copied()
        .filter(|r| {
            !RunPaths {
                dir: dir.join(&r.name),
            }
            .finished()
        })
        .collect();
    let skipped = mine.len() - todo.len();
    let pb = progress_bar(todo.len() as u64, progress, &sweep.name);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()?;
    let done = AtomicUsize::new(0);
    let results: Vec<(String, Result<Summary>)> = pool.install(|| {
        use rayon::prelude::*;
        todo.par_iter()
            .map(|r| {
                let res =
                    crate::reflow::run_experiment(&r.config, &r.checked, &dir.join(&r.name), false);
                pb.set_position(done.fetch_add(1, Ordering::SeqCst) as u64 + 1);
                (r.name.clone(), res)
            })
            .collect()
    });
    pb.finish_and_clear();
    let failed: Vec<(String, String)> = results
        .iter()
        .filter_map(|(n, r)| r.as_ref().err().map(|e| (n.clone(), format!("{e:#}"))))
        .collect();
    if shard.1 == 1 {
        merge(&dir)?;
    }
    Ok(SweepReport {
        dir,
        ran: todo.len() - failed.len(),
        skipped,
        failed,
    })
}

/// Columns of summary.csv / summary.md besides the run name.
const COLUMNS: &[&str] = &[
    "coupling",
    "path",
    "solver",
    "solver_steps",
    "train_steps",
    "final_loss",
    "w2",
    "mmd",
    "straightness",
    "rf_straightness",
    "normalized_path_energy",
    "nfe",
];

fn row_values(s: &Summary) -> Vec<String> {
    vec![
        s.coupling.clone(),
        s.path.clone(),
        s.eval.solver.clone(),
        s.eval.solver_steps.to_string(),
        s.train_steps.to_string(),
        format!("{:.5}", s.final_loss),
        format!("{:.5}", s.w2),
        format!("{:.3e}", s.mmd),
        format!("{:.5}", s.straightness),
        format!("{:.5}", s.rf_straightness),
        format!("{:.5}", s.normalized_path_energy),
        s.nfe.to_string(),
    ]
}

/// Writes summary.csv and summary.md of a sweep folder from its finished runs (also merges
/// the results of shards run elsewhere into the same folder). Returns (finished, planned).
pub fn merge(dir: &Path) -> Result<(usize, usize)> {
    let plan: Vec<String> = match std::fs::read_to_string(dir.join("plan.json")) {
        Ok(t) => {
            serde_json::from_str(&t).with_context(|| format!("{}/plan.json", dir.display()))?
        }
        Err(_) => {
            return Err(anyhow!(
                "{} is not a sweep folder (no plan.json)",
                dir.display()
            ))
        }
    };
    let mut rows = vec![];
    for name in &plan {
        let p = dir.join(name).join("summary.json");
        if let Ok(t) = std::fs::read_to_string(&p) {
            let s: Summary =
                serde_json::from_str(&t).with_context(|| format!("reading {}", p.display()))?;
            rows.push((name.clone(), s));
        }
    }
    let mut csv = format!("run,{}\n", COLUMNS.join(","));
    let mut md = format!(
        "| run | {} |\n|{}\n",
        COLUMNS.join(" | "),
        "---|".repeat(COLUMNS.len() + 1)
    );
    for (name, s) in &rows {
        let v = row_values(s);
        csv.push_str(&format!("{name},{}\n", v.join(",")));
        md.push_str(&format!("| {name} | {} |\n", v.join(" | ")));
    }
    write_atomic(&dir.join("summary.csv"), csv.as_bytes())?;
    write_atomic(&dir.join("summary.md"), md.as_bytes())?;
    Ok((rows.len(), plan.len()))
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
        let s = plan(&sw, &[]).unwrap();
        assert_eq!(s.runs.len(), 6);
        assert_eq!(s.runs[0].name, "000_coupling-independent_method-euler");
        assert_eq!(s.runs[5].name, "005_coupling-ot_method-heun");
        assert!(s
            .runs
            .iter()
            .all(|r| r.config.train.batch_size == 8 && r.config.train.steps == 5));
        std::fs::write(
            &sw,
            "base = \"base.toml\"\n[axes]\n\"solver.method\" = [\"euler\", \"leapfrog\"]\n",
        )
        .unwrap();
        let e = plan(&sw, &[]).err().unwrap().0;
        assert!(e.contains("leapfrog") && e.contains("solver.method"), "{e}");
    }
}
