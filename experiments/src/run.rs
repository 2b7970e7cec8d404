//! One run: config → build → train → checkpoint → evaluate → run folder.

use crate::checkpoint::{self, ResumeInfo, RngState, RESUME_FILE};
use crate::config::{describe_differences, Checked, Config, TableMethod};
use crate::device;
use crate::logging::{is_temp_name, remove_event_files, write_atomic, write_json, RunLog};
use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use flowmatch_data::{rng_from_seed, Sampler};
use flowmatch_losses::{Coupling, Independent, LossError, MinibatchOt, OptimConfig, Trainer};
use flowmatch_metrics as metrics;
use flowmatch_models::{Model, VelocityField};
use flowmatch_solvers::{solve, SolverSpec};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// One row of the evaluation table: a solver at a step count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRow {
    pub solver: String,
    pub steps: usize,
    pub nfe: usize,
    pub w2: f64,
    pub mmd: f64,
    /// FID-like score (images with a classifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid: Option<f64>,
}

/// Metrics of one solver against fresh target samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The headline solver, e.g. `euler` at 100 steps.
    pub solver: String,
    pub solver_steps: usize,
    pub nfe: usize,
    /// Exact W2 between generated and real samples.
    pub w2: f64,
    /// RBF-MMD² (bandwidth: median distance of the real sample).
    pub mmd: f64,
    pub energy_distance: f64,
    /// Lesson's straightness |x1 - x0| / path length (1 = straight).
    pub straightness: f64,
    /// Liu et al.'s S (0 = straight).
    pub rf_straightness: f64,
    /// Tong et al.'s normalized path energy.
    pub normalized_path_energy: f64,
    /// W2 between the source and target samples (the cost of transport itself).
    pub w2_source_target: f64,
    /// Solver × steps.
    pub table: Vec<TableRow>,
    /// FID-like score and class spread of the headline samples (images with a classifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::images::ImageScores>,
}

/// The headline solver's scores at one point of training (`eval.every`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressRow {
    pub step: usize,
    pub w2: f64,
    pub mmd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid: Option<f64>,
}

/// What every evaluation of a run compares against: source samples and real samples drawn
/// from `eval.seed` (the same for every run of a sweep), the MMD bandwidth of the real ones,
/// and the FID scorer with the real digits embedded (images with a classifier).
pub struct EvalSet {
    x0: Tensor,
    real: Tensor,
    bandwidth: f64,
    scorer: Option<crate::images::FidScorer>,
}

impl EvalSet {
    /// Draws the samples (`x0` on `device`, the real ones on the CPU) and loads the scorer.
    pub fn draw(cfg: &Config, checked: &Checked, device: &Device) -> Result<Self> {
        let mut rng = rng_from_seed(cfg.eval.seed);
        let x0 = checked.source.sample(cfg.eval.samples, &mut rng, device)?;
        let real = checked
            .target
            .sample(cfg.eval.samples, &mut rng, &Device::Cpu)?;
        let scorer = match &checked.classifier {
            Some(p) => Some(crate::images::FidScorer::new(p, &real)?),
            None => None,
        };
        Ok(Self {
            bandwidth: metrics::median_bandwidth(&real)?,
            x0,
            real,
            scorer,
        })
    }

    /// The FID-like score of generated samples, when there is a scorer.
    fn fid(&self, gen: &Tensor) -> Result<Option<f64>> {
        match &self.scorer {
            Some(s) => Ok(Some(s.score(gen)?.fid)),
            None => Ok(None),
        }
    }
}

impl EvalSet {
    /// The headline solver's scores of `field` on these samples, at training step `step`.
    fn progress(
        &self,
        field: &dyn VelocityField,
        solver: &SolverSpec,
        step: usize,
    ) -> Result<ProgressRow> {
        let gen = solve(field, &self.x0, solver, false)?
            .x
            .to_device(&Device::Cpu)?;
        Ok(ProgressRow {
            step,
            w2: metrics::w2(&gen, &self.real)?,
            mmd: metrics::mmd_rbf(&gen, &self.real, Some(self.bandwidth))?,
            fid: self.fid(&gen)?,
        })
    }
}

/// `summary.json`: deterministic (no timings), one per finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub source: String,
    pub target: String,
    pub model: String,
    pub path: String,
    pub coupling: String,
    pub train_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Mean training loss over the last 100 steps.
    pub final_loss: f64,
    pub w2: f64,
    pub mmd: f64,
    pub straightness: f64,
    pub rf_straightness: f64,
    pub normalized_path_energy: f64,
    pub nfe: usize,
    pub eval: Evaluation,
    /// For reflow experiments: one row per k-rectified flow (1-RF first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflow: Option<Vec<crate::reflow::IterationRow>>,
    /// The headline solver's scores during training (`eval.every`), the last at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub progress: Vec<ProgressRow>,
}

/// What a run trains, when not built from the config alone (reflow students).
#[derive(Default)]
pub struct Setup {
    /// Initial model (default: built from `[model]` with `train.seed`).
    pub model: Option<Model>,
    /// Coupling (default: `loss.coupling`).
    pub coupling: Option<Box<dyn Coupling>>,
    /// Label of the coupling in the summary.
    pub coupling_label: Option<String>,
    /// Time sampler (default: `loss.time`).
    pub time: Option<flowmatch_losses::TimeSampler>,
}

/// Builds the coupling of a checked config.
pub fn build_coupling(checked: &Checked) -> Box<dyn Coupling> {
    let s: Arc<dyn Sampler> = checked.source.clone();
    let t: Arc<dyn Sampler> = checked.target.clone();
    if checked.ot {
        Box::new(MinibatchOt::new(s, t))
    } else {
        Box::new(Independent::new(s, t))
    }
}

/// Where a run's files go.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn summary(&self) -> PathBuf {
        self.dir.join("summary.json")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn resume(&self) -> PathBuf {
        self.dir.join(RESUME_FILE)
    }
    /// A run is finished exactly when its summary exists (written last, atomically).
    pub fn finished(&self) -> bool {
        self.summary().is_file()
    }
}

/// What to do with a folder that holds a run of another config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnChange {
    /// Stop with an error that names the folder and the key (the default: never mix runs).
    #[default]
    Refuse,
    /// Discard that run and run the new config in its place (`--redo-changed`).
    Redo,
}

/// How a run is carried out, beyond its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Progress bars on a terminal.
    pub show: bool,
    /// A folder that holds another config.
    pub on_change: OnChange,
    /// Test hook: exit abruptly (code [`HALT_EXIT`]) right after this training step, as if
    /// killed, to check that a rerun resumes.
    pub halt_after: Option<usize>,
}

/// The exit code of a run stopped by [`RunOptions::halt_after`].
pub const HALT_EXIT: i32 = 75;

/// What a run folder holds, checked against the config about to run there.
pub enum Prepared {
    /// Nothing to reuse: start at step 1.
    Fresh,
    /// A killed run of this config: continue from its checkpoint.
    Resume,
    /// A finished run of this config.
    Finished,
}

/// Checks what `dir` holds against `cfg` and makes it ready: a run of another config is an
/// error naming the key (or, with [`OnChange::Redo`], is removed); leftovers of a run that
/// cannot be resumed are removed. The caller holds the folder's lock.
pub fn prepare(dir: &Path, cfg: &Config, on_change: OnChange) -> Result<Prepared> {
    let paths = RunPaths {
        dir: dir.to_path_buf(),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if paths.config().is_file() {
        let old = Config::read_resolved(&paths.config()).map_err(|e| anyhow!(e.0))?;
        let diffs = old.differences(cfg);
        if diffs.is_empty() {
            if paths.finished() {
                return Ok(Prepared::Finished);
            }
            if paths.resume().is_file() {
                return Ok(Prepared::Resume);
            }
        } else if on_change == OnChange::Refuse {
            return Err(anyhow!(
                "{} holds a run of another config: {}; rerun with --redo-changed to discard it and run this config there",
                dir.display(),
                describe_differences(&diffs)
            ));
        } else {
            crate::lock::clear(dir)?;
            return Ok(Prepared::Fresh);
        }
    }
    // A start that never reached a checkpoint, or no config at all: its files are replaced.
    for stale in [
        "metrics.jsonl",
        "timing.json",
        "summary.json",
        "model.safetensors",
        RESUME_FILE,
    ] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    remove_event_files(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if is_temp_name(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(Prepared::Fresh)
}

/// The summary and model of a finished run folder.
pub fn load_finished(dir: &Path, checked: &Checked, device: &Device) -> Result<(Summary, Model)> {
    let paths = RunPaths {
        dir: dir.to_path_buf(),
    };
    let text = std::fs::read_to_string(paths.summary())
        .with_context(|| format!("reading {}", paths.summary().display()))?;
    let summary: Summary = serde_json::from_str(&text)
        .with_context(|| format!("reading {}", paths.summary().display()))?;
    let model = checked
        .model
        .load(checked.source.dim(), &paths.model(), device)?;
    Ok((summary, model))
}

/// Claims a folder for a new run under `out`: `out/name`, or `out/name-2`, … when a finished
/// run already holds the name. A killed run of the same name is continued; a folder that
/// another live process is writing is an error.
pub fn claim_run_dir(out: &Path, name: &str) -> Result<(PathBuf, crate::lock::RunLock)> {
    let mut k = 1;
    loop {
        let dir = if k == 1 {
            out.join(name)
        } else {
            out.join(format!("{name}-{k}"))
        };
        k += 1;
        if (RunPaths { dir: dir.clone() }).finished() {
            continue;
        }
        let lock = crate::lock::RunLock::acquire(&dir)?;
        // It may have finished while we waited for the lock.
        if (RunPaths { dir: dir.clone() }).finished() {
            continue;
        }
        return Ok((dir, lock));
    }
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

/// Trains and evaluates one config into `dir`, returning its summary.
pub fn run(
    cfg: &Config,
    checked: &Checked,
    dir: &Path,
    pb: &ProgressBar,
    opts: RunOptions,
) -> Result<Summary> {
    Ok(run_with(cfg, checked, dir, pb, Setup::default(), opts)?.0)
}

/// [`run`] with an explicit initial model / coupling / time sampler; also returns the model.
/// A folder that holds this config finished is reused, a killed one continues from its
/// checkpoint (see [`prepare`]). The caller holds the folder's lock.
pub fn run_with(
    cfg: &Config,
    checked: &Checked,
    dir: &Path,
    pb: &ProgressBar,
    setup: Setup,
    opts: RunOptions,
) -> Result<(Summary, Model)> {
    let (device, _) = device::open(device::parse_device(&cfg.device).map_err(|e| anyhow!(e))?)
        .map_err(|e| anyhow!(e))?;
    let paths = RunPaths {
        dir: dir.to_path_buf(),
    };
    let prepared = prepare(dir, cfg, opts.on_change)?;
    if let Prepared::Finished = prepared {
        pb.finish_and_clear();
        return load_finished(dir, checked, &device);
    }
    // Everything the evaluation needs (samples, the classifier) is loaded before step 1, so a
    // bad file fails now rather than after the training.
    let set = EvalSet::draw(cfg, checked, &device)?;

    let dim = checked.source.dim();
    let model = match setup.model {
        Some(m) => m,
        None => checked.model.build(dim, cfg.train.seed, &device)?,
    };
    let coupling_label = setup
        .coupling_label
        .unwrap_or_else(|| cfg.loss.coupling.clone());
    let coupling = setup.coupling.unwrap_or_else(|| build_coupling(checked));
    let optim = OptimConfig {
        lr: cfg.train.lr,
        weight_decay: cfg.train.weight_decay,
        ..Default::default()
    };
    let mut trainer = Trainer::new(
        model,
        Box::new(checked.path),
        coupling,
        setup.time.unwrap_or(checked.time),
        cfg.train.batch_size,
        optim,
    )?
    .with_ema(cfg.train.ema)?
    .with_prefetch(cfg.train.prefetch);
    let mut rng = rng_from_seed(cfg.train.seed.wrapping_add(0x5eed_0000_0000));
    let mut recent: Vec<f32> = Vec::with_capacity(cfg.train.steps.min(1 << 20));
    let mut progress: Vec<ProgressRow> = vec![];
    let mut start = 0;
    let mut log = if let Prepared::Resume = prepared {
        let (state, info) = checkpoint::load_resume(&paths.resume(), &device)?;
        if info.step > cfg.train.steps {
            return Err(anyhow!(
                "{}: the checkpoint is at step {}, past train.steps = {}",
                paths.resume().display(),
                info.step,
                cfg.train.steps
            ));
        }
        trainer
            .restore(&state)
            .map_err(|e| anyhow!("{}: {e}", paths.resume().display()))?;
        rng = info.rng.to_rng()?;
        recent = info.recent_losses();
        progress = info.progress();
        start = info.step;
        eprintln!("{}: resuming after step {start}", cfg.name);
        RunLog::resume(dir, cfg.logging.tensorboard, start)?
    } else {
        write_atomic(&paths.config(), cfg.to_toml().as_bytes())?;
        RunLog::create(dir, cfg.logging.tensorboard)?
    };
    let started = Instant::now();
    let mut last_ckpt: Option<usize> = (start > 0).then_some(start);
    let mut eval_secs = 0.0;
    pb.set_length(cfg.train.steps as u64);
    pb.set_position(start as u64);
    for step in start + 1..=cfg.train.steps {
        let loss = match trainer.step(&mut rng) {
            Ok(l) => l,
            Err(e @ LossError::NonFiniteLoss(..)) => {
                log.record(&json!({"step": step, "error": e.to_string()}))?;
                log.close()?;
                let kept = match last_ckpt {
                    Some(s) => format!(
                        "kept the checkpoint of step {s} in {}",
                        paths.model().display()
                    ),
                    None => "no checkpoint had been written yet".to_string(),
                };
                return Err(anyhow!("{e}; run stopped, {kept}"));
            }
            Err(e) => return Err(e.into()),
        };
        recent.push(loss);
        if step % cfg.logging.every == 0 || step == cfg.train.steps {
            log.record(&json!({"step": step, "loss": loss}))?;
            log.scalar("train/loss", loss as f64, step);
            pb.set_position(step as u64);
            pb.set_message(format!("loss {loss:.4}"));
        }
        if cfg.eval.every > 0 && step % cfg.eval.every == 0 && step < cfg.train.steps {
            pb.set_message("scoring");
            let t = Instant::now();
            progress.push(set.progress(trainer.model(), &checked.solver, step)?);
            log_progress(&mut log, progress.last().expect("just pushed"))?;
            eval_secs += t.elapsed().as_secs_f64();
        }
        if cfg.train.checkpoint_every > 0
            && step % cfg.train.checkpoint_every == 0
            && step < cfg.train.steps
        {
            checkpoint::save_model(trainer.model(), &paths.model())?;
            let state = trainer.state()?;
            let keep = recent.len().min(100);
            let info = ResumeInfo::new(
                step,
                state.adam_step,
                RngState::of(&trainer.rng_to_save(&rng)),
                &recent[recent.len() - keep..],
                &progress,
            );
            checkpoint::save_resume(&paths.resume(), &state, &info)?;
            last_ckpt = Some(step);
        }
        if opts.halt_after == Some(step) {
            std::process::exit(HALT_EXIT);
        }
    }
    let train_secs = started.elapsed().as_secs_f64() - eval_secs;
    let model = trainer.into_model();
    checkpoint::save_model(&model, &paths.model())?;

    pb.set_message("evaluating");
    let eval_started = Instant::now();
    let ev = evaluate_on(&set, &model, cfg, checked, &checked.solver)?;
    if cfg.eval.every > 0 {
        // The final evaluation used the same samples and solver: its scores close the curve.
        progress.push(ProgressRow {
            step: cfg.train.steps,
            w2: ev.w2,
            mmd: ev.mmd,
            fid: ev.image.as_ref().map(|i| i.fid),
        });
        log_progress(&mut log, progress.last().expect("just pushed"))?;
    }
    let eval_secs = eval_secs + eval_started.elapsed().as_secs_f64();
    let k = recent.len().min(100);
    let final_loss = recent[recent.len() - k..]
        .iter()
        .map(|&l| l as f64)
        .sum::<f64>()
        / k as f64;
    let summary = Summary {
        name: cfg.name.clone(),
        source: cfg.data.source.clone(),
        target: cfg.data.target.clone(),
        model: cfg.model.kind.clone(),
        path: cfg.loss.path.clone(),
        coupling: coupling_label,
        train_steps: cfg.train.steps,
        batch_size: cfg.train.batch_size,
        lr: cfg.train.lr,
        seed: cfg.train.seed,
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
    log_evaluation(&mut log, &ev, cfg.train.steps)?;
    if cfg.logging.plots {
        pb.set_message("plotting");
        // A figure that fails to draw costs a warning, never the run.
        if let Err(e) = crate::plot::plot_run(
            &model,
            cfg,
            checked,
            dir,
            &device,
            &crate::plot::Figure::ALL,
        ) {
            eprintln!("warning: {}: figures not drawn: {e:#}", cfg.name);
        }
    }
    log.close()?;
    write_json(
        &dir.join("timing.json"),
        &json!({
            "train_seconds": train_secs,
            "train_steps_per_second": (cfg.train.steps - start) as f64 / train_secs,
            "eval_seconds": eval_secs,
            "resumed_after_step": start,
        }),
    )?;
    write_json(&paths.summary(), &summary)?;
    // Finished: the training state is no longer needed.
    let _ = std::fs::remove_file(paths.resume());
    pb.finish_and_clear();
    Ok((summary, model))
}

/// Writes a progress score to metrics.jsonl and TensorBoard.
fn log_progress(log: &mut RunLog, row: &ProgressRow) -> Result<()> {
    log.record(&json!({"step": row.step, "progress": row}))?;
    log.scalar("progress/w2", row.w2, row.step);
    log.scalar("progress/mmd", row.mmd, row.step);
    if let Some(f) = row.fid {
        log.scalar("progress/fid", f, row.step);
    }
    Ok(())
}

/// Writes an evaluation to metrics.jsonl and TensorBoard at `step`.
pub fn log_evaluation(log: &mut RunLog, ev: &Evaluation, step: usize) -> Result<()> {
    log.record(&json!({"step": step, "eval": ev}))?;
    for (tag, v) in [
        ("eval/w2", ev.w2),
        ("eval/mmd", ev.mmd),
        ("eval/straightness", ev.straightness),
        ("eval/rf_straightness", ev.rf_straightness),
        ("eval/normalized_path_energy", ev.normalized_path_energy),
    ] {
        log.scalar(tag, v, step);
    }
    for row in &ev.table {
        log.scalar(
            &format!("eval_table/w2_{}_{}", row.solver, row.steps),
            row.w2,
            step,
        );
    }
    Ok(())
}

/// Evaluates `field` with the headline `solver` and every table entry, on fresh samples drawn
/// from `eval.seed` (the same samples for every run of a sweep).
pub fn evaluate(
    field: &dyn VelocityField,
    cfg: &Config,
    checked: &Checked,
    solver: &SolverSpec,
    device: &Device,
) -> Result<Evaluation> {
    evaluate_on(
        &EvalSet::draw(cfg, checked, device)?,
        field,
        cfg,
        checked,
        solver,
    )
}

/// [`evaluate`] on samples already drawn.
fn evaluate_on(
    set: &EvalSet,
    field: &dyn VelocityField,
    cfg: &Config,
    checked: &Checked,
    solver: &SolverSpec,
) -> Result<Evaluation> {
    let (x0, real, bw) = (&set.x0, &set.real, set.bandwidth);
    let sol = solve(field, x0, solver, true)?;
    let traj: Vec<Tensor> = sol.trajectory.clone().unwrap_or_default();
    let gen = sol.x.to_device(&Device::Cpu)?;
    let w2_st = metrics::w2(&x0.to_device(&Device::Cpu)?, real)?;
    let mut table = vec![];
    for TableMethod { method, warped } in &checked.table {
        for &steps in &cfg.eval.steps {
            let mut spec = SolverSpec::new(*method, steps);
            spec.tol = solver.tol;
            if *warped {
                spec = spec.warped(cfg.eval.warp_s);
            }
            let s = solve(field, x0, &spec, false)?;
            let g = s.x.to_device(&Device::Cpu)?;
            table.push(TableRow {
                solver: spec.label(),
                steps,
                nfe: s.nfe,
                w2: metrics::w2(&g, real)?,
                mmd: metrics::mmd_rbf(&g, real, Some(bw))?,
                fid: set.fid(&g)?,
            });
        }
    }
    Ok(Evaluation {
        solver: solver.label(),
        solver_steps: solver.steps,
        nfe: sol.nfe,
        w2: metrics::w2(&gen, real)?,
        mmd: metrics::mmd_rbf(&gen, real, Some(bw))?,
        energy_distance: metrics::energy_distance(&gen, real)?,
        straightness: metrics::straightness(&traj)?,
        rf_straightness: metrics::rf_straightness(&traj, &sol.times)?,
        normalized_path_energy: metrics::normalized_path_energy(&traj, &sol.times, w2_st * w2_st)?,
        w2_source_target: w2_st,
        table,
        image: match &set.scorer {
            Some(s) => Some(s.score(&gen)?),
            None => None,
        },
    })
}
