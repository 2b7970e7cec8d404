//! `flowmatch`: train, evaluate and sweep flow-matching experiments.

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use flowmatch_experiments::config::{parse_set, Config, ConfigSource, Override};
use flowmatch_experiments::experiment::Experiment;
use flowmatch_experiments::folder::{claim_run_dir, OnChange, RunOptions};
use flowmatch_experiments::logging::write_json;
use flowmatch_experiments::report::{class_lines, nll_text, table_lines};
use flowmatch_experiments::{
    bench, checkpoint, device, eval, plot, reflow, runtime, signals, sweep,
};
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
    Run(RunArgs),
    /// Run the cartesian product of a sweep file.
    Sweep(SweepArgs),
    /// Re-evaluate a saved run with other solvers / steps (--set solver.method=rk4 …).
    Eval(EvalArgs),
    /// Reflow a finished run: train k-rectified flows with it as the first teacher
    /// (--set reflow.iterations=K, reflow.mode=offline, …); writes RUN_DIR/reflow/.
    Reflow(ReflowArgs),
    /// Draw a run folder's figures again (or only some: --what distributions,flow), or a
    /// sweep folder's sweep.png (--what picks its metrics: w2_euler_5,mmd …).
    Plot(PlotArgs),
    /// Train the small MNIST classifier behind the FID-like score (eval.classifier).
    Classifier(ClassifierArgs),
    /// GPU benchmark: the blog's training step at a large batch, and sampling many points
    /// (defaults: batch 65,536 and 1M points, as for a GPU; prints steps/s and points/s).
    Bench(BenchArgs),
    /// Rebuild summary.csv / summary.md of a sweep folder (e.g. after sharded runs).
    Merge(MergeArgs),
}

#[derive(clap::Args)]
struct RunArgs {
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
}

#[derive(clap::Args)]
struct SweepArgs {
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
}

/// A finished run folder and the keys set over its config (`eval`, `reflow`).
#[derive(clap::Args)]
struct RunDirArgs {
    /// A run folder written by `flowmatch run`.
    run_dir: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    dir: RunDirArgs,
    /// Overwrite an eval file of this solver and step count made with other settings.
    #[arg(long)]
    redo_changed: bool,
}

#[derive(clap::Args)]
struct ReflowArgs {
    #[command(flatten)]
    dir: RunDirArgs,
    /// RUN_DIR/reflow holds a reflow of other settings: discard it and reflow again.
    #[arg(long)]
    redo_changed: bool,
}

#[derive(clap::Args)]
struct PlotArgs {
    /// A run folder, a reflow parent folder (with reflow.json) or a sweep folder.
    run_dir: PathBuf,
    /// Figures: distributions, trajectories, flow_field, steps_grid, flow (default: all);
    /// for a sweep folder, metric columns of summary.csv (default: straightness,
    /// w2_euler_1, w2_euler_100).
    #[arg(long, value_delimiter = ',')]
    what: Vec<String>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::Args)]
struct ClassifierArgs {
    /// Folder of the MNIST IDX files (scripts/fetch-mnist.sh), or `hub`.
    #[arg(long, default_value = "data/mnist")]
    data: String,
    /// Where to save the weights (a JSON with the test accuracy goes beside them).
    #[arg(long, default_value = "results/mnist_full_classifier.safetensors")]
    out: PathBuf,
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct BenchArgs {
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
    /// TF32 matrix products on a GPU (the config's `tf32`).
    #[arg(long)]
    tf32: bool,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// A sweep folder.
    sweep_dir: PathBuf,
    /// Refuse plans of more runs than this (as `sweep --max-runs`).
    #[arg(long, default_value_t = sweep::DEFAULT_MAX_RUNS)]
    max_runs: usize,
}

fn sets_of(raw: &[String]) -> Result<Vec<Override>> {
    raw.iter()
        .map(|s| parse_set(s).map_err(|e| anyhow!(e.0)))
        .collect()
}

/// The step after which the hidden `--halt-after` test hook exits (0: never).
static HALT_AFTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The per-step hook of `--halt-after N`: exits abruptly (75) right after step N, as if
/// killed, so that tests can check that a rerun resumes.
fn halt_hook(halt_after: Option<usize>) -> Option<fn(usize)> {
    let n = halt_after?;
    HALT_AFTER.store(n, std::sync::atomic::Ordering::Relaxed);
    Some(|step| {
        if step == HALT_AFTER.load(std::sync::atomic::Ordering::Relaxed) {
            std::process::exit(signals::RESUMABLE_EXIT);
        }
    })
}

fn on_change(redo: bool) -> OnChange {
    if redo {
        OnChange::Redo
    } else {
        OnChange::Refuse
    }
}

fn main() -> ExitCode {
    runtime::init();
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
        Cmd::Run(a) => cmd_run(a, show),
        Cmd::Reflow(a) => cmd_reflow(a, show),
        Cmd::Sweep(a) => cmd_sweep(a, show),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Plot(a) => cmd_plot(a),
        Cmd::Classifier(a) => cmd_classifier(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Merge(a) => cmd_merge(a),
    }
}

fn cmd_merge(a: MergeArgs) -> Result<ExitCode> {
    let m = flowmatch_experiments::sweep_report::merge(&a.sweep_dir, a.max_runs)?;
    let planned = m.finished + m.missing.len();
    say!(
        "merged {} of {planned} runs into {}/summary.csv and summary.md",
        m.finished,
        a.sweep_dir.display()
    );
    if m.missing.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    note!(
        "error: {} planned run(s) have no summary yet: {}",
        m.missing.len(),
        m.missing.join(", ")
    );
    Ok(ExitCode::FAILURE)
}

fn cmd_run(a: RunArgs, show: bool) -> Result<ExitCode> {
    let mut sets = sets_of(&a.sets)?;
    if let Some(d) = a.device {
        sets.push(Override::new("device", toml::Value::String(d), "--device"));
    }
    let plan = Config::load(&ConfigSource {
        file: Some(&a.config),
        sets: &sets,
    })
    .map_err(|e| anyhow!(e.0))?;
    let exp = Experiment::build(&plan)?;
    runtime::threads_for(&exp);
    let (dir, lock) = claim_run_dir(&a.out, &plan.name)?;
    note!(
        "run {} on {} -> {}",
        plan.name,
        exp.device_label,
        dir.display()
    );
    let opts = RunOptions {
        show,
        on_change: on_change(a.redo_changed),
        after_step: halt_hook(a.halt_after),
    };
    let s = reflow::run_experiment(&exp, &lock, opts)?;
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
    for line in table_lines(&s.eval.table) {
        say!("{line}");
    }
    for line in class_lines(&s.eval, &exp.guidance_rows) {
        say!("{line}");
    }
    if let Some(rows) = &s.reflow {
        say!("{}", reflow::table_markdown(rows).trim_end());
    }
    say!("wrote {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_reflow(a: ReflowArgs, show: bool) -> Result<ExitCode> {
    let sets = sets_of(&a.dir.sets)?;
    let opts = RunOptions {
        show,
        on_change: on_change(a.redo_changed),
        after_step: None,
    };
    let (s, parent) = reflow::reflow_finished(&a.dir.run_dir, sets, opts)?;
    say!(
        "{}",
        reflow::table_markdown(s.reflow.as_deref().unwrap_or(&[])).trim_end()
    );
    say!("wrote {}", parent.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_sweep(a: SweepArgs, show: bool) -> Result<ExitCode> {
    let opts = RunOptions {
        show,
        on_change: on_change(a.redo_changed),
        after_step: halt_hook(a.halt_after),
    };
    let (file, sets) = (&a.sweep, sets_of(&a.sets)?);
    let shard = match a.shard {
        Some(s) => sweep::parse_shard(&s).map_err(|e| anyhow!(e))?,
        None => (0, 1),
    };
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if jobs == 0 {
        return Err(anyhow!("--jobs must be at least 1"));
    }
    let plan = sweep::plan(file, &sets, a.max_runs).map_err(|e| {
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
    let rep = sweep::execute(&plan, &a.out, jobs, shard, opts)?;
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

fn cmd_eval(a: EvalArgs) -> Result<ExitCode> {
    let sets = sets_of(&a.dir.sets)?;
    let (ev, out) = eval::eval_file(&a.dir.run_dir, &sets, a.redo_changed)?;
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
    for line in table_lines(&ev.table) {
        say!("{line}");
    }
    for line in class_lines(&ev, &[]) {
        say!("{line}");
    }
    say!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_plot(a: PlotArgs) -> Result<ExitCode> {
    let (run_dir, what, sets) = (a.run_dir, a.what, sets_of(&a.sets)?);
    if run_dir.join("plan.json").is_file() {
        if !sets.is_empty() {
            return Err(anyhow!(
                "--set applies to run folders; {} is a sweep folder",
                run_dir.display()
            ));
        }
        if what.iter().any(|w| w.starts_with("samples")) {
            let path = flowmatch_experiments::sweep_plot::samples_figure(&run_dir, &what)?;
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
    let written = plot::redraw_run(&run_dir, &figures, &sets)?;
    if written.is_empty() {
        return Err(anyhow!("nothing to draw: {} is not 2D", run_dir.display()));
    }
    for w in &written {
        say!("wrote {}", w.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_classifier(a: ClassifierArgs) -> Result<ExitCode> {
    let ClassifierArgs {
        data,
        out,
        steps,
        batch,
        lr,
        seed,
    } = a;
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

fn cmd_bench(a: BenchArgs) -> Result<ExitCode> {
    let req = device::parse_device(&a.device).map_err(|e| anyhow!("--device: {e}"))?;
    let (dev, said) = device::open_with(req, a.tf32).map_err(|e| anyhow!(e))?;
    let spec = bench::BenchSpec {
        batch: a.batch,
        steps: a.steps,
        points: a.points,
        sample_steps: a.sample_steps,
    };
    say!("bench on {said}");
    let report = bench::run(&spec, &dev)?;
    for line in report.lines(&spec) {
        say!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}
