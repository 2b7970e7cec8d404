//! The train stage: the trainer built from the plan (or a reflow student's setup), a fresh
//! start or a checkpoint's state, and the loop with its hooks (logging, progress scores,
//! checkpoints, stop requests, the caller's per-step hook).

use crate::checkpoint::{self, ResumeInfo, RngState};
use crate::eval::{log_progress, EvalSet};
use crate::experiment::Experiment;
use crate::folder::{Prepared, RunOptions, RunPaths};
use crate::logging::{write_atomic, RunLog};
use crate::report::{ProgressRow, RunCoupling};
use crate::run::{Setup, Trained};
use crate::signals::{self, Stopped};
use anyhow::{anyhow, Result};
use candle_core::Tensor;
use flowmatch_data::{rng_from_seed, Rng};
use flowmatch_losses::{read_losses, LossError, LrSchedule, Trainer};
use indicatif::ProgressBar;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// The trainer of the plan (or of `setup`'s model, coupling and time sampler) and its
/// learning-rate schedule.
fn build_trainer(checked: &Experiment, setup: Setup) -> Result<(Trainer, LrSchedule)> {
    let t = &checked.train;
    let model = match setup.model {
        Some(m) => m,
        None => checked
            .model
            .build(checked.dim(), t.seed, &checked.device)?,
    };
    let coupling = setup.coupling.unwrap_or_else(|| {
        checked.coupling.build(
            checked.source.clone(),
            checked.target.clone(),
            checked.labels,
        )
    });
    let trainer = Trainer::new(
        model,
        checked.coupling.path(checked.path),
        coupling,
        setup.time.unwrap_or(checked.time),
        t.batch_size,
        t.optim,
    )?
    .with_objective(checked.objective)?
    .with_lr_schedule(t.schedule)?
    .with_ema(t.ema)?
    .with_prefetch(t.prefetch);
    Ok((trainer, t.schedule))
}

/// Restores `trainer` from the run's resume file, which must come from this model (shapes)
/// and this config (fingerprint); returns the counters stored beside the tensors.
fn restore(checked: &Experiment, paths: &RunPaths, trainer: &mut Trainer) -> Result<ResumeInfo> {
    let (state, info) = checkpoint::load_resume(&paths.resume(), &checked.device)?;
    if info.step > checked.train.steps {
        return Err(anyhow!(
            "{}: the checkpoint is at step {}, past train.steps = {}",
            paths.resume().display(),
            info.step,
            checked.train.steps
        ));
    }
    trainer.restore(&state).map_err(|e| {
        let msg = match e {
            LossError::Invalid(m) => format!("it holds the training state of another model: {m}"),
            other => other.to_string(),
        };
        anyhow!(
            "{}: {msg}; remove it to start the run afresh",
            paths.resume().display()
        )
    })?;
    // After the shapes (a file of another model says which tensor differs).
    let fingerprint = checked.fingerprint();
    if info.config.as_deref() != Some(fingerprint.as_str()) {
        return Err(anyhow!(
            "{} was written by a run of another config (fingerprint {}, this config's {fingerprint}); remove it to start the run afresh",
            paths.resume().display(),
            info.config.as_deref().unwrap_or("none")
        ));
    }
    Ok(info)
}

/// The loop's state between steps.
struct Loop<'a> {
    checked: &'a Experiment,
    paths: RunPaths,
    pb: &'a ProgressBar,
    trainer: Trainer,
    schedule: LrSchedule,
    rng: Rng,
    /// The losses read so far (the last 100 make `final_loss`).
    recent: Vec<f32>,
    /// On an accelerator: the losses not read yet, of the steps up to the current one. They
    /// are read in one transfer when logged, checkpointed or at the end, so that steps do not
    /// wait for the host; on the CPU each step's loss is read (and checked) at once.
    pending: Vec<Tensor>,
    progress: Vec<ProgressRow>,
    log: RunLog,
    /// The step this process started after.
    start: usize,
    last_ckpt: Option<usize>,
    score_secs: f64,
}

impl<'a> Loop<'a> {
    /// A fresh start (the config written, empty logs) or the state of the checkpoint that
    /// `prepared` found, which must come from this config and model.
    fn open(
        checked: &'a Experiment,
        dir: &Path,
        pb: &'a ProgressBar,
        setup: Setup,
        prepared: Prepared,
    ) -> Result<Self> {
        let paths = RunPaths::new(dir);
        let (mut trainer, schedule) = build_trainer(checked, setup)?;
        let (t, tensorboard) = (&checked.train, checked.logging.tensorboard);
        let (log, rng, recent, progress, start) = if let Prepared::Resume = prepared {
            let info = restore(checked, &paths, &mut trainer)?;
            let start = info.step;
            eprintln!("{}: resuming after step {start}", checked.name);
            (
                RunLog::resume(dir, tensorboard, start, t.steps)?,
                info.rng.to_rng()?,
                info.recent_losses(),
                info.progress(),
                start,
            )
        } else {
            write_atomic(&paths.config(), checked.config_toml().as_bytes())?;
            (
                RunLog::create(dir, tensorboard)?,
                rng_from_seed(t.seed.wrapping_add(0x5eed_0000_0000)),
                Vec::with_capacity(t.steps.min(1 << 20)),
                vec![],
                0,
            )
        };
        Ok(Loop {
            checked,
            paths,
            pb,
            trainer,
            schedule,
            rng,
            recent,
            pending: vec![],
            progress,
            log,
            start,
            last_ckpt: (start > 0).then_some(start),
            score_secs: 0.0,
        })
    }

    /// One optimiser step: its loss read at once on the CPU, kept on the device elsewhere.
    fn step(&mut self, step: usize) -> Result<()> {
        if self.trainer.model().params.device().is_cpu() {
            let (trainer, rng) = (&mut self.trainer, &mut self.rng);
            // Not with a prefetching worker: the step waits for it, and a pool worker that
            // waits can hold the very loop the prefetcher's ops wait on (a deadlock).
            let loss = if trainer.prefetches() {
                trainer.step(rng)
            } else {
                crate::runtime::on_pool(|| trainer.step(rng))
            };
            let loss = self.checked_loss(step, loss.map(|l| vec![l]))?;
            self.recent.extend(loss);
        } else {
            self.pending
                .push(self.trainer.step_deferred(&mut self.rng)?);
        }
        Ok(())
    }

    /// The losses kept on the device (those of the steps up to `step`), read in one transfer
    /// and checked.
    fn read_pending(&mut self, step: usize) -> Result<()> {
        let read = read_losses(&self.pending, step + 1 - self.pending.len());
        let losses = self.checked_loss(step, read)?;
        self.recent.extend(losses);
        self.pending.clear();
        Ok(())
    }

    /// Losses as read: a non-finite one ends the run with the last checkpoint named.
    fn checked_loss(&mut self, step: usize, read: Result<Vec<f32>, LossError>) -> Result<Vec<f32>> {
        match read {
            Ok(l) => Ok(l),
            Err(e @ LossError::NonFiniteLoss(..)) => {
                self.log
                    .record(&json!({"step": step, "error": e.to_string()}))?;
                let kept = match self.last_ckpt {
                    Some(s) => format!(
                        "kept the checkpoint of step {s} in {}",
                        self.paths.model().display()
                    ),
                    None => "no checkpoint had been written yet".to_string(),
                };
                Err(anyhow!("{e}; run stopped, {kept}"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Hook: the loss (and learning rate) every `logging.every` steps and at the last one.
    fn log_step(&mut self, step: usize) -> Result<()> {
        let last = self.checked.train.steps;
        self.pb.set_position(step as u64);
        if !step.is_multiple_of(self.checked.logging.every) && step != last {
            return Ok(());
        }
        self.read_pending(step)?;
        let loss = self.recent[self.recent.len() - 1];
        if self.schedule.is_constant() {
            self.log.record(&json!({"step": step, "loss": loss}))?;
        } else {
            let lr = self.trainer.lr();
            self.log
                .record(&json!({"step": step, "loss": loss, "lr": lr}))?;
            self.log.scalar("train/lr", lr, step);
        }
        self.log.scalar("train/loss", loss as f64, step);
        self.pb.set_message(format!("loss {loss:.4}"));
        Ok(())
    }

    /// Hook: the headline solver's scores every `eval.every` steps (the last step's come
    /// from the eval stage).
    fn score_progress(&mut self, step: usize, set: &EvalSet) -> Result<()> {
        let every = self.checked.eval.every;
        if every == 0 || !step.is_multiple_of(every) || step >= self.checked.train.steps {
            return Ok(());
        }
        self.pb.set_message("scoring");
        let t = Instant::now();
        let c = self.checked;
        let row = set.progress(self.trainer.model(), &c.solver, c.guidance, step)?;
        log_progress(&mut self.log, &row)?;
        self.progress.push(row);
        self.score_secs += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Hook: a checkpoint every `checkpoint_every` steps, after the last one (a run killed
    /// while it evaluates then does not train again), and when a stop is asked for.
    fn checkpoint(&mut self, step: usize, stop: bool) -> Result<()> {
        let (every, last) = (
            self.checked.train.checkpoint_every,
            self.checked.train.steps,
        );
        if !((every > 0 && (step.is_multiple_of(every) || step == last)) || stop) {
            return Ok(());
        }
        self.read_pending(step)?;
        checkpoint::save_model(self.trainer.model(), &self.paths.model())?;
        let state = self.trainer.state()?;
        let keep = self.recent.len().min(100);
        let info = ResumeInfo::new(
            self.checked.fingerprint(),
            step,
            state.adam_step,
            RngState::of(&self.trainer.rng_to_save(&self.rng)),
            &self.recent[self.recent.len() - keep..],
            &self.progress,
        );
        checkpoint::save_resume(&self.paths.resume(), &state, &info)?;
        self.last_ckpt = Some(step);
        Ok(())
    }
}

/// Trains the plan in `dir` from step 1, or from the checkpoint that `prepared` found: writes the
/// config, logs, progress scores and checkpoints, and the final `model.safetensors`.
pub fn train_stage(
    checked: &Experiment,
    dir: &Path,
    pb: &ProgressBar,
    setup: Setup,
    opts: RunOptions,
    set: &EvalSet,
    prepared: Prepared,
) -> Result<Trained> {
    let coupling_label = setup
        .coupling_label
        .unwrap_or(RunCoupling::Batch(checked.coupling));
    let mut l = Loop::open(checked, dir, pb, setup, prepared)?;
    let started = Instant::now();
    pb.set_length(checked.train.steps as u64);
    pb.set_position(l.start as u64);
    for step in l.start + 1..=checked.train.steps {
        l.step(step)?;
        l.log_step(step)?;
        l.score_progress(step, set)?;
        let stop = signals::stop_requested();
        l.checkpoint(step, stop)?;
        if stop {
            return Err(Stopped {
                run: checked.name.clone(),
                step,
            }
            .into());
        }
        if let Some(hook) = opts.after_step {
            hook(step);
        }
    }
    if let Some(w) = l.trainer.coupling_report() {
        // An entropic plan that stopped at its iteration cap: said once, and kept in the log.
        l.log.record(&json!({"warning": w}))?;
        pb.suspend(|| eprintln!("warning: {}: {w}", checked.name));
    }
    let train_secs = started.elapsed().as_secs_f64() - l.score_secs;
    let model = l.trainer.into_model();
    checkpoint::save_model(&model, &l.paths.model())?;
    let k = l.recent.len().min(100);
    let final_loss = l.recent[l.recent.len() - k..]
        .iter()
        .map(|&x| x as f64)
        .sum::<f64>()
        / k as f64;
    Ok(Trained {
        model,
        coupling_label,
        final_loss,
        progress: l.progress,
        train_secs,
        score_secs: l.score_secs,
        start: l.start,
        log: l.log,
    })
}
