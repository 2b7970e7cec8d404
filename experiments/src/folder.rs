//! Run folders: where a run's files go, who owns the folder, and what an existing folder holds
//! (a finished run to reuse, a killed one to continue, another config to refuse or redo).

use crate::check::Plan;
use crate::checkpoint::RESUME_FILE;
use crate::config::{describe_differences, Config};
use crate::experiment::Experiment;
use crate::logging::{is_temp_name, remove_event_files};
use crate::report::{IterationRow, Summary};
use anyhow::{anyhow, Context, Result};
use candle_core::Device;
use flowmatch_data::Sampler;
use flowmatch_models::Model;
use std::path::{Path, PathBuf};

/// Where a run's files go, and the reads of a run folder's records.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    /// The files of the run folder `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// `summary.json`, read.
    pub fn read_summary(&self) -> Result<Summary> {
        read_json(&self.summary())
    }
    /// `reflow.json` (a reflow parent's table), read; `None` when the folder has none.
    pub fn read_reflow_rows(&self) -> Result<Option<Vec<IterationRow>>> {
        let p = self.dir.join("reflow.json");
        if !p.is_file() {
            return Ok(None);
        }
        read_json(&p).map(Some)
    }
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
    /// Whether the summary exists (written last, atomically). A run is finished when it does
    /// and no process holds the folder's lock ([`open_finished`] checks both).
    pub fn finished(&self) -> bool {
        self.summary().is_file()
    }
}

/// A JSON file of a run folder, read; the error names it.
fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", p.display()))
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
    /// Called after every training step with its number, after its checkpoint (the
    /// binary's hidden `--halt-after` exits there, as if killed, to test resumption).
    pub after_step: Option<fn(usize)>,
}

/// What a run folder holds, checked against the config about to run there.
pub enum Prepared {
    /// Nothing to reuse: start at step 1.
    Fresh,
    /// A killed run of this config: continue from its checkpoint.
    Resume,
    /// A finished run of this config.
    Finished,
}

/// Checks what `dir` holds against `plan`'s config and makes it ready: a run of another config is an
/// error naming the key (or, with [`OnChange::Redo`], is removed); leftovers of a run that
/// cannot be resumed are removed. The caller holds the folder's lock.
pub fn prepare(dir: &Path, plan: &Plan, on_change: OnChange) -> Result<Prepared> {
    let paths = RunPaths::new(dir);
    crate::lock::refuse_link(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if paths.config().is_file() {
        let old = Config::read_resolved(&paths.config()).map_err(|e| anyhow!(e.0))?;
        let diffs = old.differences(plan.config());
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
pub fn load_finished(
    dir: &Path,
    checked: &Experiment,
    device: &Device,
) -> Result<(Summary, Model)> {
    let paths = RunPaths::new(dir);
    let summary = paths.read_summary()?;
    let model = checked
        .model
        .load(checked.source.dim(), &paths.model(), device)?;
    Ok((summary, model))
}

/// Claims the folder `out/name` for a run: a finished run of the same config there is reused,
/// a killed one continued, and one of another config refused (see [`prepare`]); a folder that
/// another live process is writing, or a symbolic link, is an error.
pub fn claim_run_dir(out: &Path, name: &str) -> Result<(PathBuf, crate::lock::RunLock)> {
    let dir = out.join(name);
    let lock = crate::lock::RunLock::acquire(&dir)?;
    Ok((dir, lock))
}

/// Opens a finished run folder for reading (`eval`, `plot`, `reflow`): holds its lock, so
/// that no other process writes it meanwhile, and refuses a folder without `summary.json` (a
/// run still training elsewhere, or killed) with a one-line error that says so.
pub fn open_finished(dir: &Path) -> Result<crate::lock::RunLock> {
    if !dir.is_dir() {
        return Err(anyhow!(
            "{} is not a run folder (no such folder)",
            dir.display()
        ));
    }
    let paths = RunPaths::new(dir);
    if !paths.config().is_file() && !paths.model().is_file() {
        return Err(anyhow!(
            "{} has no model.safetensors (not a run folder?)",
            dir.display()
        ));
    }
    let lock = crate::lock::RunLock::acquire(dir).map_err(|e| match e {
        crate::lock::LockError::Busy { holder, .. } => anyhow!(
            "{} is not finished: another flowmatch process ({holder}) is still writing it; wait for it to finish",
            dir.display()
        ),
        other => other.into(),
    })?;
    if !paths.finished() {
        return Err(anyhow!(
            "{} is not a finished run: it has no summary.json (it was killed or failed before the end); rerun its command to finish it",
            dir.display()
        ));
    }
    Ok(lock)
}

/// A finished run folder opened for reading: its lock (held while the value lives), model,
/// config (with the caller's overrides) and experiment.
pub struct OpenRun {
    pub lock: crate::lock::RunLock,
    pub model: Model,
    pub exp: Experiment,
}

/// A finished run folder's model and config (with `--set` overrides), loaded and checked,
/// with the folder's lock held: an error when the run is not finished (see [`open_finished`]),
/// when the folder holds no model, or a model with non-finite weights.
pub fn open_run(dir: &Path, sets: &[crate::config::Override]) -> Result<OpenRun> {
    let lock = open_finished(dir)?;
    let model_path = RunPaths::new(dir).model();
    if !model_path.is_file() {
        return Err(anyhow!(
            "{} has no model.safetensors (not a run folder?)",
            dir.display()
        ));
    }
    let plan = Config::load(&crate::config::ConfigSource {
        file: Some(&dir.join("config.toml")),
        sets,
    })
    .map_err(|e| anyhow!(e.0))?;
    let exp = Experiment::build(&plan)?;
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
    Ok(OpenRun { lock, model, exp })
}
