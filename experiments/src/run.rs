//! One run: config → build → train → checkpoint → evaluate → run folder.

use crate::checkpoint;
use crate::eval::{evaluate_on, log_evaluation, log_progress, EvalSet};
use crate::experiment::Experiment;
use crate::folder::{load_finished, prepare, Prepared, RunOptions, RunPaths};
use crate::logging::{write_atomic, write_json, RunLog};
use crate::report::{Evaluation, ProgressRow, RunCoupling, Summary};
use crate::signals;
use anyhow::{Context, Result};
use flowmatch_losses::Coupling;
use flowmatch_models::Model;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// What a run trains, when not built from the config alone (reflow students).
#[derive(Default)]
pub struct Setup {
    /// Initial model (default: built from `[model]` with `train.seed`).
    pub model: Option<Model>,
    /// Coupling (default: `loss.coupling`).
    pub coupling: Option<Box<dyn Coupling>>,
    /// Label of the coupling in the summary.
    pub coupling_label: Option<RunCoupling>,
    /// Time sampler (default: `loss.time`).
    pub time: Option<flowmatch_losses::TimeSampler>,
}

/// A progress bar for `n` steps, hidden when stderr is not a terminal or `show` is false.
pub fn progress_bar(n: u64, show: bool, prefix: &str) -> ProgressBar {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

/// Trains and evaluates one plan into `dir`, returning its summary.
pub fn run(
    checked: &Experiment,
    dir: &Path,
    pb: &ProgressBar,
    opts: RunOptions,
) -> Result<Summary> {
    Ok(run_with(checked, dir, pb, Setup::default(), opts)?.0)
}

/// [`run`] with an explicit initial model / coupling / time sampler; also returns the model.
/// A folder that holds this config finished is reused, a killed one continues from its
/// checkpoint (see [`prepare`]). The caller holds the folder's lock.
///
/// The flow is train stage → checkpoint → eval stage → run folder:
/// [`train_stage`](crate::train::train_stage) leaves a
/// trained model, [`eval_stage`] scores it, and `summary.json` is written last.
pub fn run_with(
    checked: &Experiment,
    dir: &Path,
    pb: &ProgressBar,
    setup: Setup,
    opts: RunOptions,
) -> Result<(Summary, Model)> {
    let prepared = prepare(dir, checked, opts.on_change)?;
    if let Prepared::Finished = prepared {
        pb.finish_and_clear();
        return load_finished(dir, checked, &checked.device);
    }
    // Everything the evaluation needs (samples, the classifier) is loaded before step 1, so a
    // bad file fails now rather than after the training.
    signals::check(&format!("{}: setup", checked.name))?;
    let set = EvalSet::draw(checked, &checked.device)?;
    signals::check(&format!("{}: setup", checked.name))?;
    let trained = crate::train::train_stage(checked, dir, pb, setup, opts, &set, prepared)?;
    finish_run(checked, dir, pb, &set, trained, None)
}

/// The eval stage and the run folder's last files: the evaluation on `set`, the summary,
/// the figures and `timing.json` (`trained_in`: the folder whose training this run reuses).
fn finish_run(
    checked: &Experiment,
    dir: &Path,
    pb: &ProgressBar,
    set: &EvalSet,
    mut trained: Trained,
    trained_in: Option<&str>,
) -> Result<(Summary, Model)> {
    pb.set_message("evaluating");
    let started = Instant::now();
    let ev = eval_stage(set, &mut trained, checked)?;
    let eval_secs = trained.score_secs + started.elapsed().as_secs_f64();
    let Trained {
        model,
        coupling_label,
        final_loss,
        progress,
        train_secs,
        start,
        mut log,
        ..
    } = trained;
    let (p, t) = (&checked.plan, &checked.train);
    let summary = Summary {
        name: p.name.clone(),
        source: p.source_name.clone(),
        target: p.target_name.clone(),
        model: p.model.kind().name().to_string(),
        path: p.path.schedule.name().to_string(),
        coupling: coupling_label,
        objective: checked
            .objective
            .needs_span()
            .then(|| checked.objective.name().to_string()),
        tf32: p.tf32 && checked.device.is_cuda(),
        train_steps: t.steps,
        batch_size: t.batch_size,
        lr: t.optim.lr,
        seed: t.seed,
        final_loss,
        w2: ev.w2,
        mmd: ev.mmd,
        straightness: ev.straightness,
        rf_straightness: ev.rf_straightness,
        normalized_path_energy: ev.normalized_path_energy,
        nfe: ev.nfe,
        eval: ev.clone(),
        reflow: None,
        progress,
    };
    signals::check(&format!("{}: evaluation", p.name))?;
    log_evaluation(&mut log, &ev, t.steps)?;
    if p.logging.plots {
        pb.set_message("plotting");
        // A figure that fails to draw costs a warning, never the run.
        if let Err(e) = crate::plot::plot_run(
            &model,
            checked,
            dir,
            &checked.device,
            &crate::plot::Figure::ALL,
        ) {
            eprintln!("warning: {}: figures not drawn: {e:#}", p.name);
        }
        signals::check(&format!("{}: figures", p.name))?;
    }
    log.close()?;
    write_json(
        &dir.join("timing.json"),
        &json!({
            "train_seconds": train_secs,
            "train_steps_per_second": (t.steps - start) as f64 / train_secs,
            "eval_seconds": eval_secs,
            "resumed_after_step": start,
            "trained_in": trained_in,
        }),
    )?;
    let paths = RunPaths::new(dir.to_path_buf());
    write_json(&paths.summary(), &summary)?;
    // Finished: the training state is no longer needed.
    let _ = std::fs::remove_file(paths.resume());
    pb.finish_and_clear();
    Ok((summary, model))
}

/// Evaluates, in `dir`, the model that the finished run in `trained_dir` trained with the
/// same training settings (a sweep variant that differs only in `solver.*` / `eval.*`): the
/// folder gets its own config, evaluation, figures and summary, and the training's loss
/// records and weights. The summary is the one training again would give (tested). The
/// caller holds `dir`'s lock; `eval.every` must be 0 (progress scores need the training).
pub fn evaluate_trained(
    checked: &Experiment,
    dir: &Path,
    trained_dir: &Path,
    pb: &ProgressBar,
    opts: RunOptions,
) -> Result<Summary> {
    if let Prepared::Finished = prepare(dir, checked, opts.on_change)? {
        pb.finish_and_clear();
        return Ok(load_finished(dir, checked, &checked.device)?.0);
    }
    let (base, model) = load_finished(trained_dir, checked, &checked.device)?;
    let set = EvalSet::draw(checked, &checked.device)?;
    let paths = RunPaths::new(dir.to_path_buf());
    write_atomic(&paths.config(), checked.config_toml().as_bytes())?;
    checkpoint::save_model(&model, &paths.model())?;
    // The training's records (not its evaluation), then TensorBoard replays them.
    let theirs = std::fs::read_to_string(trained_dir.join("metrics.jsonl"))
        .with_context(|| format!("reading {}/metrics.jsonl", trained_dir.display()))?;
    let mine: String = theirs
        .lines()
        .filter(|l| !l.contains("\"eval\""))
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(&dir.join("metrics.jsonl"), mine.as_bytes())?;
    let steps = checked.train.steps;
    let log = RunLog::resume(dir, checked.logging.tensorboard, steps, steps)?;
    let trained = Trained {
        model,
        coupling_label: base.coupling,
        final_loss: base.final_loss,
        progress: vec![],
        train_secs: 0.0,
        score_secs: 0.0,
        start: steps,
        log,
    };
    let name = trained_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(finish_run(checked, dir, pb, &set, trained, Some(&name))?.0)
}

/// What the train stage leaves for the eval stage and the run folder.
pub struct Trained {
    /// The trained model (its weight average, with EMA), saved as `model.safetensors`.
    pub model: Model,
    /// The coupling's name in the summary.
    pub coupling_label: RunCoupling,
    /// Mean training loss over the last 100 steps.
    pub final_loss: f64,
    /// The progress scores (`eval.every`).
    pub progress: Vec<ProgressRow>,
    /// Seconds spent training, and scoring progress, in this process.
    pub train_secs: f64,
    pub score_secs: f64,
    /// The step this process started after (0, or a checkpoint's).
    pub start: usize,
    /// The run's logs, still open.
    pub log: RunLog,
}

/// Scores a trained model with the headline solver and the eval table on `set`; with
/// `eval.every`, its headline scores close the progress curve.
pub fn eval_stage(
    set: &EvalSet,
    trained: &mut Trained,
    checked: &Experiment,
) -> Result<Evaluation> {
    let ev = evaluate_on(set, &trained.model, checked, &checked.solver)?;
    if checked.eval.every > 0 {
        // The final evaluation used the same samples and solver: its scores close the curve.
        trained.progress.push(ProgressRow {
            step: checked.train.steps,
            w2: ev.w2,
            mmd: ev.mmd,
            fid: ev.image.as_ref().map(|i| i.fid),
        });
        log_progress(
            &mut trained.log,
            trained.progress.last().expect("just pushed"),
        )?;
    }
    Ok(ev)
}
