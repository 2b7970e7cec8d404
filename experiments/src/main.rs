//! `flowmatch`: train, evaluate and sweep flow-matching experiments.

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use flowmatch_experiments::config::{parse_set, Config, ConfigSource, Override};
use flowmatch_experiments::experiment::{with_reflow_eval, Experiment};
use flowmatch_experiments::folder::{
    claim_run_dir, open_finished, OnChange, RunOptions, RunPaths,
};
use flowmatch_experiments::lock::RunLock;
use flowmatch_experiments::logging::write_json;
use flowmatch_experiments::report::{Evaluation, TableRow};
use flowmatch_experiments::{bench, checkpoint, device, eval, plot, reflow, signals, sweep};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// stdout could not be written (a closed pipe, a full disk).
#[derive(Debug, thiserror::Error)]
#[error("writing to stdout: {0}")]
struct StdoutError(std::io::Error);

/// Prints a line on stdout; a failure becomes a [`StdoutError`] (a closed pipe then ends the
/// program quietly, as `flowmatch eval RUN | head -1` expects).
macro_rules! say {
    ($($t:tt)*) => {
        writeln!(std::io::stdout().lock(), $($t)*).map_err(StdoutError)?
    };
}

/// Prints a line on stderr, never failing (a closed stderr loses the note, not the run).
macro_rules! note {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

/// candle allocates a fresh buffer per op; glibc hands buffers over 128 KiB back to the kernel
/// each time (mmap/munmap + page faults), which cost more than the maths on 2048-row batches.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flowmatch",
    version,
    about = "Flow matching and rectified flow experiments"
)]
struct Cli {
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train one config, evaluate it, write a run folder.
    Run {
        /// Config file (TOML).
        config: PathBuf,
        /// Override a key: --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Device: cpu, cuda, cuda:N, auto (same as --set device=…).
        #[arg(long)]
        device: Option<String>,
        /// Parent folder of the run folder.
        #[arg(long, default_value = "results/runs")]
        out: PathBuf,
        /// A killed run of this name whose config differs: discard it and run this one there
        /// (without this, that is an error naming the key).
        #[arg(long)]
        redo_changed: bool,
        /// Test hook: stop abruptly after this training step, as if killed.
        #[arg(long, hide = true)]
        halt_after: Option<usize>,
    },
    /// Run the cartesian product of a sweep file.
    Sweep {
        /// Sweep file (TOML: base, [set], [axes]).
        sweep: PathBuf,
        /// Runs at a time (default: the number of cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Run only share I of N (0-based), e.g. from a Slurm array.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Override a key in every run (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Parent folder of the sweep folder.
        #[arg(long, default_value = "results/runs")]
        out: PathBuf,
        /// Redo the runs whose folder holds another config (without this, such runs are an
        /// error that names the run and the key, and nothing runs).
        #[arg(long)]
        redo_changed: bool,
        /// Refuse sweeps of more runs than this (the count is checked before planning).
        #[arg(long, default_value_t = sweep::DEFAULT_MAX_RUNS)]
        max_runs: usize,
        /// Test hook: each run stops abruptly after this training step, as if killed.
        #[arg(long, hide = true)]
        halt_after: Option<usize>,
    },
    /// Re-evaluate a saved run with other solvers / steps (--set solver.method=rk4 …).
    Eval {
        /// A run folder written by `flowmatch run`.
        run_dir: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Overwrite an eval file of this solver and step count made with other settings.
        #[arg(long)]
        redo_changed: bool,
    },
    /// Reflow a finished run: train k-rectified flows with it as the first teacher
    /// (--set reflow.iterations=K, reflow.mode=offline, …); writes RUN_DIR/reflow/.
    Reflow {
        /// A run folder written by `flowmatch run`.
        run_dir: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// RUN_DIR/reflow holds a reflow of other settings: discard it and reflow again.
        #[arg(long)]
        redo_changed: bool,
    },
    /// Draw a run folder's figures again (or only some: --what distributions,flow), or a
    /// sweep folder's sweep.png (--what picks its metrics: w2_euler_5,mmd …).
    Plot {
        /// A run folder, a reflow parent folder (with reflow.json) or a sweep folder.
        run_dir: PathBuf,
        /// Figures: distributions, trajectories, flow_field, steps_grid, flow (default: all);
        /// for a sweep folder, metric columns of summary.csv (default: straightness,
        /// w2_euler_1, w2_euler_100).
        #[arg(long, value_delimiter = ',')]
        what: Vec<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Train the small MNIST classifier behind the FID-like score (eval.classifier).
    Classifier {
        /// Folder of the MNIST IDX files (scripts/fetch-mnist.sh), or `hub`.
        #[arg(long, default_value = "data/mnist")]
        data: String,
        /// Where to save the weights (a JSON with the test accuracy goes beside them).
        #[arg(long, default_value = "results/mnist_classifier.safetensors")]
        out: PathBuf,
        #[arg(long, default_value_t = 3000)]
        steps: usize,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// GPU benchmark: the blog's training step at a large batch, and sampling many points
    /// (defaults: batch 65,536 and 1M points, as for a GPU; prints steps/s and points/s).
    Bench {
        /// Device: cpu, cuda, cuda:N, auto.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 65_536)]
        batch: usize,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 1_000_000)]
        points: usize,
        /// Euler steps for the sampling benchmark.
        #[arg(long, default_value_t = 100)]
        sample_steps: usize,
    },
    /// Rebuild summary.csv / summary.md of a sweep folder (e.g. after sharded runs).
    Merge {
        /// A sweep folder.
        sweep_dir: PathBuf,
        /// Refuse plans of more runs than this (as `sweep --max-runs`).
        #[arg(long, default_value_t = sweep::DEFAULT_MAX_RUNS)]
        max_runs: usize,
    },
}

fn sets_of(raw: &[String]) -> Result<Vec<Override>> {
    raw.iter()
        .map(|s| parse_set(s).map_err(|e| anyhow!(e.0)))
        .collect()
}

fn on_change(redo: bool) -> OnChange {
    if redo {
        OnChange::Redo
    } else {
        OnChange::Refuse
    }
}

/// A finished run folder's model and config (with `--set` overrides), loaded and checked,
/// with the folder's lock held: an error when the run is not finished (see [`open_finished`]),
/// when the folder holds no model, or a model with non-finite weights.
fn open_run(
    dir: &std::path::Path,
    sets: &[Override],
) -> Result<(RunLock, flowmatch_models::Model, Config, Experiment)> {
    let lock = open_finished(dir)?;
    let model_path = RunPaths {
        dir: dir.to_path_buf(),
    }
    .model();
    if !model_path.is_file() {
        return Err(anyhow!(
            "{} has no model.safetensors (not a run folder?)",
            dir.display()
        ));
    }
    let (cfg, plan) = Config::load(&ConfigSource {
        file: Some(&dir.join("config.toml")),
        sets,
    })
    .map_err(|e| anyhow!(e.0))?;
    let exp = Experiment::build(&cfg, &plan)?;
    let model = exp.model.load(exp.dim(), &model_path, &exp.device)?;
    for (name, var) in model.params.named_vars() {
        let finite = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            return Err(anyhow!(
                "{}: weight '{name}' is not finite (NaN or infinity): the run diverged; nothing to draw or evaluate",
                model_path.display()
            ));
        }
    }
    Ok((lock, model, cfg, exp))
}

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h` of mimalloc v3; libmimalloc-sys 0.1.49
/// names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the memory mimalloc frees for reuse instead of handing it back to the OS 10 ms later
/// (its default). An image model's training step frees and allocates the same large buffers
/// every step; each hand-back cost a page fault and a cleared page per 4 KiB on reuse (19% of a
/// U-Net step, 15,000 faults a run of the bench, 370 without). Peak memory is unchanged.
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option, which mimalloc allows at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Whether RAYON_NUM_THREADS came from the user (then it is kept as it is).
static THREADS_SET_BY_USER: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// An image run on its own uses every core: its convolutions split the batch over threads,
/// with the same bits for any count (the lesson U-Net: 3.5 -> 5.4 steps/s on 2 cores). 2-D runs
/// stay on one thread, where their small models run fastest, unless RAYON_NUM_THREADS says
/// otherwise.
fn threads_for(exp: &Experiment) {
    if exp.dim() > 2 && !THREADS_SET_BY_USER.load(std::sync::atomic::Ordering::Relaxed) {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Fails only if the pool already exists; the run then keeps one thread.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    // Small models run fastest on one candle thread; sweeps parallelise across runs instead
    // (their rayon pool is sized explicitly, so this only affects candle's matmuls).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    } else {
        THREADS_SET_BY_USER.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let cli = Cli::parse();
    if let Err(e) = signals::install() {
        note!("warning: cannot catch SIGTERM ({e}): a stopped run keeps only its last checkpoint");
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(StdoutError(io)) = e.downcast_ref::<StdoutError>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    // The reader went away (`| head`): nothing more to say to anyone.
                    return ExitCode::SUCCESS;
                }
            }
            if signals::is_stop(&e) {
                note!("{e}");
                return ExitCode::from(signals::RESUMABLE_EXIT as u8);
            }
            let msg = format!("{e:#}").replace('\n', " ");
            note!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let show = !cli.quiet;
    match cli.cmd {
        Cmd::Run {
            config,
            sets,
            device,
            out,
            redo_changed,
            halt_after,
        } => cmd_run(config, sets, device, out, show, redo_changed, halt_after),
        Cmd::Reflow {
            run_dir,
            sets,
            redo_changed,
        } => cmd_reflow(run_dir, sets, show, redo_changed),
        Cmd::Sweep {
            sweep: file,
            jobs,
            shard,
            sets,
            out,
            redo_changed,
            max_runs,
            halt_after,
        } => {
            let opts = RunOptions {
                show,
                on_change: on_change(redo_changed),
                halt_after,
            };
            cmd_sweep(file, jobs, shard, sets, out, max_runs, opts)
        }
        Cmd::Eval {
            run_dir,
            sets,
            redo_changed,
        } => cmd_eval(run_dir, sets, redo_changed),
        Cmd::Plot {
            run_dir,
            what,
            sets,
        } => cmd_plot(run_dir, what, sets),
        Cmd::Classifier {
            data,
            out,
            steps,
            batch,
            lr,
            seed,
        } => cmd_classifier(data, out, steps, batch, lr, seed),
        Cmd::Bench {
            device,
            batch,
            steps,
            points,
            sample_steps,
        } => cmd_bench(device, batch, steps, points, sample_steps),
        Cmd::Merge {
            sweep_dir,
            max_runs,
        } => {
            let m = flowmatch_experiments::sweep_report::merge(&sweep_dir, max_runs)?;
            let planned = m.finished + m.missing.len();
            say!(
                "merged {} of {planned} runs into {}/summary.csv and summary.md",
                m.finished,
                sweep_dir.display()
            );
            if m.missing.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                note!(
                    "error: {} planned run(s) have no summary yet: {}",
                    m.missing.len(),
                    m.missing.join(", ")
                );
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn cmd_run(
    config: PathBuf,
    sets: Vec<String>,
    device: Option<String>,
    out: PathBuf,
    show: bool,
    redo_changed: bool,
    halt_after: Option<usize>,
) -> Result<ExitCode> {
    let mut sets = sets_of(&sets)?;
    if let Some(d) = device {
        sets.push(Override::new("device", toml::Value::String(d), "--device"));
    }
    let (cfg, plan) = Config::load(&ConfigSource {
        file: Some(&config),
        sets: &sets,
    })
    .map_err(|e| anyhow!(e.0))?;
    let exp = Experiment::build(&cfg, &plan)?;
    threads_for(&exp);
    let (dir, lock) = claim_run_dir(&out, &cfg.name)?;
    note!(
        "run {} on {} -> {}",
        cfg.name,
        exp.device_label,
        dir.display()
    );
    let opts = RunOptions {
        show,
        on_change: on_change(redo_changed),
        halt_after,
    };
    let s = reflow::run_experiment(&cfg, &exp, &lock, opts)?;
    say!(
        "{}: final_loss {:.4}  W2 {:.4} ({} {} steps, nfe {})  straightness {:.4}  S {:.4}{}",
        s.name,
        s.final_loss,
        s.w2,
        s.eval.solver,
        s.eval.solver_steps,
        s.nfe,
        s.straightness,
        s.rf_straightness,
        match &s.eval.image {
            Some(i) => format!(
                "  FID-like {:.2} ({} classes; real digits score {:.2})",
                i.fid,
                i.classes_present,
                i.fid_real.unwrap_or(f64::NAN)
            ),
            None => String::new(),
        } + &nll_text(&s.eval)
    );
    print_table(&s.eval.table)?;
    if let Some(rows) = &s.reflow {
        say!("{}", reflow::table_markdown(rows).trim_end());
    }
    say!("wrote {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_reflow(run_dir: PathBuf, sets: Vec<String>, show: bool, redo: bool) -> Result<ExitCode> {
    let mut sets = sets_of(&sets)?;
    // A run that asked for no reflow gets one iteration unless --set says how many; the
    // value goes through the config's checks like any other.
    let stored = Config::read_resolved(&RunPaths { dir: run_dir.clone() }.config()).ok();
    let asked = sets.iter().any(|o| o.key == "reflow.iterations");
    if !asked && stored.is_some_and(|c| c.reflow.iterations == 0 && c.reflow.distill_k == 0) {
        sets.insert(
            0,
            Override::new(
                "reflow.iterations",
                toml::Value::Integer(1),
                "flowmatch reflow (one iteration unless --set reflow.iterations=K)",
            ),
        );
    }
    let (_run_lock, model, cfg, exp) = open_run(&run_dir, &sets)?;
    if !exp.reflow.is_reflow() {
        return Err(anyhow!(
            "reflow.iterations: flowmatch reflow needs at least 1 iteration (or reflow.distill_k), got 0"
        ));
    }
    let (cfg, checked) = with_reflow_eval(&cfg, &exp);
    let dev = checked.device.clone();
    let parent = run_dir.join("reflow");
    let lock = RunLock::acquire(&parent)?;
    let opts = RunOptions {
        show,
        on_change: on_change(redo),
        halt_after: None,
    };
    let s = match reflow::open_parent(lock.dir(), &cfg, opts)? {
        Some(done) => {
            note!(
                "{} already holds this reflow, finished; showing its table",
                parent.display()
            );
            done
        }
        None => {
            note!(
                "reflow {}: {} iteration(s) -> {}",
                cfg.name,
                cfg.reflow.iterations,
                parent.display()
            );
            let first = eval::evaluate(&model, &cfg, &checked, &checked.solver, &dev)?;
            reflow::chain(&cfg, &checked, model, &first, lock.dir(), opts)?
        }
    };
    say!(
        "{}",
        reflow::table_markdown(s.reflow.as_deref().unwrap_or(&[])).trim_end()
    );
    say!("wrote {}", parent.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_sweep(
    file: PathBuf,
    jobs: Option<usize>,
    shard: Option<String>,
    sets: Vec<String>,
    out: PathBuf,
    max_runs: usize,
    opts: RunOptions,
) -> Result<ExitCode> {
    let sets = sets_of(&sets)?;
    let shard = match shard {
        Some(s) => sweep::parse_shard(&s).map_err(|e| anyhow!(e))?,
        None => (0, 1),
    };
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if jobs == 0 {
        return Err(anyhow!("--jobs must be at least 1"));
    }
    let plan = sweep::plan(&file, &sets, max_runs).map_err(|e| {
        if signals::stop_requested() {
            anyhow::Error::new(signals::Interrupted {
                what: format!("planning sweep {}", file.display()),
            })
        } else {
            anyhow!(e.0)
        }
    })?;
    note!(
        "sweep {}: {} runs, shard {}/{}, up to {} at a time",
        plan.name,
        plan.runs.len(),
        shard.0,
        shard.1,
        jobs.min(plan.runs.len())
    );
    let rep = sweep::execute(&plan, &out, jobs, shard, opts)?;
    say!(
        "sweep {}: {} ran, {} already finished, {} running elsewhere, {} failed{}",
        plan.name,
        rep.ran,
        rep.skipped,
        rep.busy.len(),
        rep.failed.len(),
        if rep.stopped.is_empty() {
            String::new()
        } else {
            format!(", {} stopped", rep.stopped.len())
        }
    );
    for (name, err) in &rep.failed {
        note!("error: run {name}: {err}");
    }
    if !rep.stopped.is_empty() {
        note!(
            "stopped on request (SIGTERM or Ctrl-C) with checkpoints written: {}; run the same command again to continue",
            rep.stopped.join(", ")
        );
        return Ok(ExitCode::from(signals::RESUMABLE_EXIT as u8));
    }
    if !rep.busy.is_empty() {
        note!(
            "note: another process is writing {}; merge when it is done: flowmatch merge {}",
            rep.busy.join(", "),
            rep.dir.display()
        );
    } else if shard.1 == 1 {
        say!("wrote {}/summary.csv and summary.md", rep.dir.display());
    } else {
        say!(
            "shard done; when all shards are: flowmatch merge {}",
            rep.dir.display()
        );
    }
    Ok(if rep.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// An eval file: the evaluation and the resolved config it was made with.
#[derive(serde::Serialize)]
struct EvalFile<'a> {
    #[serde(flatten)]
    eval: &'a Evaluation,
    /// The resolved config (TOML), to tell whether a later eval of the same name differs.
    config: String,
}

fn cmd_eval(run_dir: PathBuf, sets: Vec<String>, redo: bool) -> Result<ExitCode> {
    let sets = sets_of(&sets)?;
    let (_lock, model, cfg, checked) = open_run(&run_dir, &sets)?;
    let dev = checked.device.clone();
    let out = run_dir.join(format!(
        "eval-{}-{}.json",
        checked.solver.label(),
        checked.solver.steps
    ));
    if out.is_file() && !redo {
        // The same name made with other settings is kept unless asked.
        let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)
            .with_context(|| format!("reading {}", out.display()))?;
        let diffs = match old.get("config").and_then(|c| c.as_str()) {
            Some(text) => Config::from_resolved_toml(text)
                .map_err(|e| anyhow!("{}: {}", out.display(), e.0))?
                .differences(&cfg),
            None => vec!["(its settings were not recorded)".to_string()],
        };
        if !diffs.is_empty() {
            return Err(anyhow!(
                "{} was made with other settings: {}; rerun with --redo-changed to overwrite it",
                out.display(),
                flowmatch_experiments::config::describe_differences(&diffs)
            ));
        }
    }
    let ev = eval::evaluate(&model, &cfg, &checked, &checked.solver, &dev)?;
    write_json(
        &out,
        &EvalFile {
            eval: &ev,
            config: cfg.to_toml(),
        },
    )?;
    say!(
        "{} {} steps: W2 {:.4}  MMD {:.3e}  straightness {:.4}  S {:.4}  nfe {}{}",
        ev.solver,
        ev.solver_steps,
        ev.w2,
        ev.mmd,
        ev.straightness,
        ev.rf_straightness,
        ev.nfe,
        match &ev.image {
            Some(i) => format!("  FID-like {:.2}", i.fid),
            None => String::new(),
        } + &nll_text(&ev)
    );
    print_table(&ev.table)?;
    say!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// `plot SWEEP --what samples[:K]`: `samples_nfeK.png` (K = 1 unless given), one panel per
/// setting and flow of the sweep, each the samples of K Euler steps (a span model's K-step
/// sampler) from the eval source sample, for the first replicate (seed) of each setting.
fn sweep_samples(dir: &std::path::Path, what: &[String]) -> Result<PathBuf> {
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
    let limit = Config::default().limits.memory_gb;
    let need = flowmatch_experiments::limits::grid_bytes(k);
    if need > limit * 1e9 {
        return Err(anyhow!(
            "--what {w}: {k} Euler steps would need about {} of memory for the time grid, over limits.memory_gb = {limit}",
            flowmatch_experiments::limits::human(need)
        ));
    }
    let plan =
        flowmatch_experiments::sweep_report::PlanFile::read(dir, sweep::DEFAULT_MAX_RUNS)?;
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
        let run_dir = dir.join(run);
        if !run_dir.join("summary.json").is_file() {
            continue;
        }
        let setting = values[..n_axes.min(values.len())].join(" ");
        let flows: Vec<(String, PathBuf)> =
            match std::fs::read_to_string(run_dir.join("reflow.json")) {
                Ok(text) => {
                    let rows: Vec<flowmatch_experiments::report::IterationRow> =
                        serde_json::from_str(&text).with_context(|| {
                            format!("reading {}/reflow.json", run_dir.display())
                        })?;
                    rows.iter()
                        .map(|r| {
                            (
                                format!("{setting} {}", r.flow),
                                run_dir.join(reflow::folder_of(&r.flow)),
                            )
                        })
                        .collect()
                }
                Err(_) => vec![(setting, run_dir.clone())],
            };
        for (title, d) in flows {
            let (_lock, model, cfg, checked) = open_run(&d, &[])?;
            let (x0, r) =
                flowmatch_experiments::eval::EvalSet::samples(&cfg, &checked, &checked.device)?;
            real.get_or_insert(r);
            let x = solve(&model, &x0, &SolverSpec::new(Method::Euler, k), false)?.x;
            panels.push((format!("{title} ({k} NFE)"), x));
        }
    }
    let Some(real) = real else {
        return Err(anyhow!("{}: no finished run to draw", dir.display()));
    };
    let path = dir.join(format!("samples_nfe{k}.png"));
    flowmatch_experiments::logging::atomically(&path, |tmp| {
        plot::sample_panels(tmp, &real, &panels)
    })?;
    Ok(path)
}

fn cmd_plot(run_dir: PathBuf, what: Vec<String>, sets: Vec<String>) -> Result<ExitCode> {
    let sets = sets_of(&sets)?;
    if run_dir.join("plan.json").is_file() {
        if !sets.is_empty() {
            return Err(anyhow!(
                "--set applies to run folders; {} is a sweep folder",
                run_dir.display()
            ));
        }
        if what.iter().any(|w| w.starts_with("samples")) {
            let path = sweep_samples(&run_dir, &what)?;
            say!("wrote {}", path.display());
            return Ok(ExitCode::SUCCESS);
        }
        let path = flowmatch_experiments::sweep_report::redraw(&run_dir, &what)?;
        say!("wrote {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let figures: Vec<plot::Figure> = if what.is_empty() {
        plot::Figure::ALL.to_vec()
    } else {
        what.iter()
            .map(|w| plot::Figure::parse(w))
            .collect::<Result<_>>()?
    };
    let reflow_rows = run_dir.join("reflow.json");
    // A reflow parent is finished when its own summary is there (written after the chain).
    let _parent_lock = if reflow_rows.is_file() {
        Some(open_finished(&run_dir)?)
    } else {
        None
    };
    let (cfg_dir, rows): (
        PathBuf,
        Option<Vec<flowmatch_experiments::report::IterationRow>>,
    ) = if reflow_rows.is_file() {
        let text = std::fs::read_to_string(&reflow_rows)
            .with_context(|| format!("reading {}", reflow_rows.display()))?;
        let rows = serde_json::from_str(&text)
            .with_context(|| format!("reading {}", reflow_rows.display()))?;
        (run_dir.join("rf1"), Some(rows))
    } else {
        (run_dir.clone(), None)
    };
    let (_lock, model, cfg, checked) = open_run(&cfg_dir, &sets)?;
    let (dim, dev) = (checked.dim(), checked.device.clone());
    let mut written = plot::plot_run(&model, &cfg, &checked, &cfg_dir, &dev, &figures)?;
    if let Some(rows) = rows {
        // The last flow of the chain lives in the folder named after its row.
        let last_dir = rows
            .last()
            .map(|r| run_dir.join(reflow::folder_of(&r.flow)));
        let last = match last_dir {
            Some(d) if d.join("model.safetensors").is_file() => {
                checked
                    .model
                    .load(dim, &d.join("model.safetensors"), &dev)?
            }
            _ => model.duplicate()?,
        };
        reflow::reflow_figures(&cfg, &checked, &model, &last, &rows, &run_dir)?;
        written.push(run_dir.join("reflow.png"));
        written.push(run_dir.join("fm_vs_reflow.gif"));
    }
    if written.is_empty() {
        return Err(anyhow!("nothing to draw: {} is not 2D", run_dir.display()));
    }
    for w in &written {
        say!("wrote {}", w.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_classifier(
    data: String,
    out: PathBuf,
    steps: usize,
    batch: usize,
    lr: f64,
    seed: u64,
) -> Result<ExitCode> {
    if steps == 0 || batch == 0 || !(lr > 0.0 && lr.is_finite()) {
        return Err(anyhow!("classifier: steps, batch and lr must be positive"));
    }
    let mnist = std::sync::Arc::new(flowmatch_data::Mnist::load(&data)?);
    let device = candle_core::Device::Cpu;
    let started = std::time::Instant::now();
    let (clf, acc) = flowmatch_experiments::images::train_classifier(
        mnist.clone(),
        steps,
        batch,
        lr,
        seed,
        &device,
    )?;
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    checkpoint::save_params(&clf.params, &out)?;
    let report = serde_json::json!({
        "data": mnist.origin, "train_digits": mnist.len(), "test_digits": mnist.test_labels.len(),
        "steps": steps, "batch": batch, "lr": lr, "seed": seed, "test_accuracy": acc,
        "features": flowmatch_models::Classifier::FEATURES,
    });
    write_json(&out.with_extension("json"), &report)?;
    say!(
        "classifier: test accuracy {:.2}% on {} digits after {steps} steps ({:.1} s) -> {}",
        100.0 * acc,
        mnist.test_labels.len(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_bench(
    device: String,
    batch: usize,
    steps: usize,
    points: usize,
    sample_steps: usize,
) -> Result<ExitCode> {
    let req = device::parse_device(&device).map_err(|e| anyhow!("--device: {e}"))?;
    let (dev, said) = device::open(req).map_err(|e| anyhow!(e))?;
    let spec = bench::BenchSpec {
        batch,
        steps,
        points,
        sample_steps,
    };
    say!("bench on {said}");
    let report = bench::run(&spec, &dev)?;
    for line in report.lines(&spec) {
        say!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `  NLL 2.31 nats (1.67 bits/dim)` when the evaluation has one.
fn nll_text(ev: &flowmatch_experiments::report::Evaluation) -> String {
    match &ev.nll {
        Some(n) => format!("  NLL {:.4} nats ({:.4} bits/dim)", n.nats, n.bits_per_dim),
        None => String::new(),
    }
}

fn print_table(rows: &[TableRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let fid = rows.iter().any(|r| r.fid.is_some());
    say!(
        "{:<14} {:>6} {:>6} {:>9} {:>10}{}",
        "solver",
        "steps",
        "nfe",
        "W2",
        "MMD",
        if fid {
            format!(" {:>9}", "FID-like")
        } else {
            String::new()
        }
    );
    for r in rows {
        say!(
            "{:<14} {:>6} {:>6} {:>9.4} {:>10.3e}{}",
            r.solver,
            r.steps,
            r.nfe,
            r.w2,
            r.mmd,
            match r.fid {
                Some(f) => format!(" {f:>9.2}"),
                None => String::new(),
            }
        );
    }
    Ok(())
}
