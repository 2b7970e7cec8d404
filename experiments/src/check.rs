//! The config, checked once: each section's `check()` (linfa-style) turns its typed values into
//! the library's specs or names the offending key, and [`Config::check`] assembles the
//! [`Plan`]. No I/O happens here: data and devices are opened when the plan is built into an
//! [`crate::experiment::Experiment`].

use crate::config::{
    check_name, Config, ConfigError, ConfigSource, DataConfig, EvalConfig, LimitsConfig,
    LoggingConfig, LossConfig, ModelConfig, ReflowConfig, SolverConfig, TableMethod, TrainConfig,
    COUPLING_KEYS,
};
use crate::device::DeviceRequest;
use flowmatch_data::Distribution;
use flowmatch_losses::{
    validate_ema, validate_label_drop, AffinePath, CouplingSpec, LabelDraw, LossError, LrSchedule,
    Objective, ObjectiveOptions, OptimConfig, Schedule, TimeOptions, TimeSampler,
};
use flowmatch_models::{ModelError, ModelOptions, ModelSpec};
use flowmatch_reflow::{ReflowMode, ReflowSpec};
use flowmatch_solvers::{Divergence, NoiseSchedule, SdeScore, SolverError, SolverSpec, Tolerances};
use std::path::PathBuf;
use std::sync::Arc;

/// A failed check: the key and what is wrong with its value.
pub type Bad = (&'static str, String);

/// One side of the data: a built-in distribution, or MNIST (loaded when the plan is built).
#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    Shape(Distribution),
    Mnist,
}

impl DataSpec {
    /// Dimension of a sample.
    pub fn dim(&self) -> usize {
        match self {
            Self::Shape(d) => flowmatch_data::Sampler::dim(d),
            Self::Mnist => flowmatch_data::mnist::PIXELS,
        }
    }

    /// The classes its samples fall into (0: no labels).
    pub fn classes(&self) -> usize {
        match self {
            Self::Shape(d) => flowmatch_data::Sampler::classes(d),
            Self::Mnist => 10,
        }
    }
}

/// Everything a run needs from its config, checked; built into an experiment once. Nothing
/// downstream reads the config: the plan carries every setting, and the config it was checked
/// from stays inside as the run's record ([`Plan::config_toml`], [`Plan::fingerprint`]) and
/// as the base of derived plans ([`Plan::derive`]).
#[derive(Debug, Clone)]
pub struct Plan {
    /// The run's name (its folder's name).
    pub name: String,
    /// The device asked for (opened when the plan is built).
    pub device: DeviceRequest,
    /// TF32 matrix products where the device is a GPU.
    pub tf32: bool,
    /// The MNIST folder (read when the plan is built, for MNIST sides only).
    pub data_dir: PathBuf,
    /// The data sides' names as the summary records them.
    pub source_name: String,
    pub target_name: String,
    pub source: DataSpec,
    pub target: DataSpec,
    pub model: ModelSpec,
    pub path: AffinePath,
    pub coupling: CouplingSpec,
    pub time: TimeSampler,
    /// The headline solver.
    pub solver: SolverSpec,
    /// The eval table's methods (× `eval.steps`).
    pub table: Vec<TableMethod>,
    /// The classifier file of the FID-like score, when set.
    pub classifier: Option<PathBuf>,
    pub reflow: ReflowSpec,
    /// What the model regresses on (the model has a span input when it needs one).
    pub objective: Objective,
    /// The likelihood evaluation, when there is one.
    pub nll: Option<NllSpec>,
    /// The opt-in metrics the evaluation measures (`eval.metrics`).
    pub metrics: Vec<&'static crate::metrics::Metric>,
    /// The stochastic rows of the eval table, their step count and where their score comes
    /// from.
    pub sde: Vec<NoiseSchedule>,
    pub sde_score: Option<SdeScore>,
    pub sde_steps: usize,
    /// The source's standard deviation when it is an isotropic Gaussian (the likelihood and
    /// the stochastic sampler's score need its density).
    pub source_std: Option<f64>,
    pub train: TrainPlan,
    pub eval: EvalPlan,
    pub logging: LogPlan,
    /// A conditional model's training labels (their count and drop rate), its headline
    /// guidance scale and the other scales the evaluation scores.
    pub labels: Option<LabelDraw>,
    pub guidance: f64,
    pub guidance_rows: Vec<f64>,
    /// The config this plan was checked from: written as the run's `config.toml` and compared
    /// on resume, never read for a setting.
    config: Arc<Config>,
}

/// The training settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    pub steps: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub optim: OptimConfig,
    pub schedule: LrSchedule,
    /// The weight average's decay (0: none).
    pub ema: f64,
    pub prefetch: bool,
    /// Checkpoint every this many steps (0: only when stopped).
    pub checkpoint_every: usize,
}

/// What every evaluation of a run draws and solves: `samples` from `seed`, the table's step
/// counts and warp, and the progress cadence (`every` steps, 0 = none).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPlan {
    pub samples: usize,
    pub steps: Vec<usize>,
    pub warp_s: f64,
    pub seed: u64,
    pub every: usize,
}

/// How a run logs: the loss every `every` steps, TensorBoard events, figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogPlan {
    pub every: usize,
    pub tensorboard: bool,
    pub plots: bool,
}

/// The negative log-likelihood evaluation, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NllSpec {
    /// Real samples scored (at most `eval.samples`).
    pub samples: usize,
    /// The backward solve.
    pub solver: SolverSpec,
    pub divergence: Divergence,
}

impl Plan {
    /// Whether MNIST is the source or the target.
    pub fn images(&self) -> bool {
        self.source == DataSpec::Mnist || self.target == DataSpec::Mnist
    }

    /// The config this plan was checked from (compared with a folder's `config.toml`).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The resolved config, as the run's `config.toml` holds it.
    pub fn config_toml(&self) -> String {
        self.config.to_toml()
    }

    /// The config's fingerprint (stored in checkpoints, compared on resume).
    pub fn fingerprint(&self) -> String {
        self.config.fingerprint()
    }

    /// What a sweep's runs that train the same model share: the config without the name and
    /// the keys only the evaluation reads (`solver.*`, `eval.*`). None for a run that must
    /// train alone (a reflow chain, progress scores during training).
    pub fn training_key(&self) -> Option<String> {
        if self.reflow.is_reflow() || self.eval.every > 0 {
            return None;
        }
        let defaults = Config::default();
        let mut c = (*self.config).clone();
        c.name = String::new();
        c.solver = defaults.solver;
        c.eval = defaults.eval;
        Some(c.to_toml())
    }

    /// The plan with the evaluation the reflow table needs: headline Euler 100, Euler rows at
    /// `steps` (added to whatever the config already evaluates).
    pub fn with_reflow_eval(&self, steps: &[usize]) -> anyhow::Result<Plan> {
        let euler = TableMethod {
            method: flowmatch_solvers::Method::Euler,
            warped: false,
        };
        self.derive("with the reflow table's evaluation", |c| {
            c.solver.method = euler.method;
            c.solver.steps = 100;
            c.solver.warp_s = None;
            if !c.eval.methods.contains(&euler) {
                c.eval.methods.insert(0, euler);
            }
            for &s in steps {
                if !c.eval.steps.contains(&s) {
                    c.eval.steps.push(s);
                }
            }
            c.eval.steps.sort_unstable();
        })
    }

    /// The plan of one reflow student: this plan as that student trains it (its folder's
    /// name, steps, learning rate and seed; no reflow of its own).
    pub fn stage(&self, stage: &flowmatch_reflow::Stage) -> anyhow::Result<Plan> {
        let (lr, seed) = (
            self.reflow.lr,
            self.train.seed.wrapping_add(stage.index as u64),
        );
        self.derive(&format!("the reflow stage {}", stage.flow), |c| {
            c.name = stage.flow.folder();
            c.train.steps = stage.steps;
            c.train.lr = lr;
            c.train.seed = seed;
            c.reflow.iterations = 0;
            c.reflow.distill_k = 0;
        })
    }

    /// The plan of this config changed by `edit`, through the same check as any config; an
    /// error names the key and `what` the change was.
    fn derive(&self, what: &str, edit: impl FnOnce(&mut Config)) -> anyhow::Result<Plan> {
        let mut c = (*self.config).clone();
        edit(&mut c);
        c.check()
            .map_err(|(key, msg)| anyhow::anyhow!("{key}: {msg} ({what})"))
    }
}

/// The time-grid warp `s` must lie in [0, 1.5] (the blog's range).
fn check_warp(key: &'static str, s: f64) -> Result<(), Bad> {
    flowmatch_solvers::grid_check_warp(s).map_err(|e| (key, e.to_string()))
}

/// A library's out-of-range field as the key it comes from: `keys` maps the spec's field
/// names to config keys (the rule stays in the library; `other` takes any other error).
fn key_of(keys: &[(&str, &'static str)], other: &'static str, field: &str, msg: String) -> Bad {
    let key = keys
        .iter()
        .find(|(f, _)| *f == field)
        .map_or(other, |k| k.1);
    (key, msg)
}

/// [`key_of`] for the losses crate's errors.
fn loss_key(keys: &[(&str, &'static str)], other: &'static str, e: LossError) -> Bad {
    match e {
        LossError::Setting { field, msg } => key_of(keys, other, field, msg),
        e => (other, e.to_string()),
    }
}

/// The learning-rate schedule of a training of `steps` steps (`steps_key`): its warm-up must
/// end before the training does.
fn check_schedule(t: &TrainConfig, steps_key: &str, steps: usize) -> Result<LrSchedule, Bad> {
    let schedule = LrSchedule {
        decay: t.lr_decay,
        warmup: t.warmup,
        total: steps,
    };
    schedule.validate().map_err(|e| {
        let (key, msg) = loss_key(&[("warmup", "train.warmup")], "train.lr_decay", e);
        (key, format!("{msg}, set by {steps_key}"))
    })?;
    Ok(schedule)
}

/// The optimiser of a training at learning rate `lr` (`lr_key`).
fn check_optim(t: &TrainConfig, lr_key: &'static str, lr: f64) -> Result<OptimConfig, Bad> {
    let optim = OptimConfig {
        lr,
        weight_decay: t.weight_decay,
        ..Default::default()
    };
    let keys = [("lr", lr_key), ("weight_decay", "train.weight_decay")];
    optim.validate().map_err(|e| loss_key(&keys, lr_key, e))?;
    Ok(optim)
}

/// A count of at least one.
fn check_count(key: &'static str, n: usize) -> Result<(), Bad> {
    if n == 0 {
        Err((key, "must be at least 1".into()))
    } else {
        Ok(())
    }
}

/// The most entries a list of the eval table may have (each entry is one more solve).
pub const MAX_LIST: usize = 64;

/// A list of the eval table of at most [`MAX_LIST`] entries.
fn check_list_len(key: &'static str, n: usize, what: &str) -> Result<(), Bad> {
    if n > MAX_LIST {
        return Err((
            key,
            format!("{n} {what}; at most {MAX_LIST} (each entry is one more solve)"),
        ));
    }
    Ok(())
}

/// The first value that appears twice in `items`.
pub(crate) fn first_repeat<T: PartialEq>(items: &[T]) -> Option<&T> {
    items
        .iter()
        .enumerate()
        .find(|(i, x)| items[..*i].contains(x))
        .map(|(_, x)| x)
}

impl DataConfig {
    /// The two sides, of one dimension.
    pub fn check(&self) -> Result<(DataSpec, DataSpec), Bad> {
        let images = self.source == "mnist" || self.target == "mnist";
        let dim = if images {
            flowmatch_data::mnist::PIXELS
        } else {
            self.dim
        };
        let side = |key: &'static str, scale_key: &'static str, name: &str, scale| {
            if name == "mnist" {
                return Ok(DataSpec::Mnist);
            }
            // A Gaussian source for images or N-D data is the standard normal of its dimension.
            let (name, scale) = if name == "gaussian" && dim != 2 {
                ("gaussian-nd", None)
            } else {
                (name, scale)
            };
            let mut d = Distribution::from_name(name).map_err(|e| (key, e.to_string()))?;
            if let Some(s) = scale {
                d = d.with_scale(s).map_err(|e| (scale_key, e.to_string()))?;
            }
            Ok(DataSpec::Shape(
                d.with_dim(dim).map_err(|e| ("data.dim", e.to_string()))?,
            ))
        };
        let source = side(
            "data.source",
            "data.source_scale",
            &self.source,
            self.source_scale,
        )?;
        let target = side(
            "data.target",
            "data.target_scale",
            &self.target,
            self.target_scale,
        )?;
        if source.dim() != target.dim() {
            return Err((
                "data.dim",
                format!("source has {} dims, target {}", source.dim(), target.dim()),
            ));
        }
        Ok((source, target))
    }
}

impl ModelConfig {
    /// The model for `dim`-dimensional data.
    pub fn check(&self, dim: usize) -> Result<ModelSpec, Bad> {
        // The U-Net's own settings are refused on the models that would ignore them.
        if self.kind != flowmatch_models::ModelKind::UNet {
            let set = [
                ("model.mults", self.mults != flowmatch_models::UNET_MULTS),
                ("model.attention", self.attention),
            ];
            if let Some((key, _)) = set.into_iter().find(|(_, on)| *on) {
                let kind = self.kind.name();
                return Err((
                    key,
                    format!("applies to model.kind = \"unet\" only, not {kind:?}"),
                ));
            }
        }
        let model = ModelSpec::of(
            self.kind,
            ModelOptions {
                hidden: self.hidden,
                layers: self.layers,
                mults: self.mults,
                attention: self.attention,
                activation: self.activation,
                classes: self.classes,
                score: self.score,
            },
        );
        if model.is_image() {
            flowmatch_models::image_shape(dim).map_err(|e| ("model.kind", e.to_string()))?;
        }
        model.validate().map_err(|e| match e {
            ModelError::Setting { field, msg } => {
                let keys = [
                    ("hidden", "model.hidden"),
                    ("layers", "model.layers"),
                    ("mults", "model.mults"),
                    ("classes", "model.classes"),
                ];
                key_of(&keys, "model.kind", field, msg)
            }
            e => ("model.kind", e.to_string()),
        })?;
        Ok(model)
    }
}

impl LossConfig {
    /// The path, the coupling and the time sampler.
    pub fn check(&self) -> Result<(AffinePath, CouplingSpec, TimeSampler), Bad> {
        let path = AffinePath::new(self.path, self.sigma_min)
            .map_err(|e| loss_key(&[], "loss.sigma_min", e))?;
        let options = TimeOptions {
            s: self.time_warp_s,
            mean: self.logit_mean,
            std: self.logit_std,
        };
        let time = TimeSampler::of(self.time, options);
        let keys = [
            ("s", "loss.time_warp_s"),
            ("mean", "loss.logit_mean"),
            ("std", "loss.logit_std"),
        ];
        time.validate()
            .map_err(|e| loss_key(&keys, "loss.time", e))?;
        let coupling = CouplingSpec::of(self.coupling, self.coupling_options());
        coupling
            .validate()
            .map_err(|e| loss_key(COUPLING_KEYS, "loss.coupling", e))?;
        if let CouplingSpec::SchrodingerBridge { .. } = coupling {
            // The bridge is its own path around the linear one.
            if self.path != Schedule::Linear {
                return Err((
                    "loss.path",
                    "loss.coupling = \"schrodinger-bridge\" trains on the Brownian bridge around the linear path; set loss.path = \"linear\"".into(),
                ));
            }
            if self.sigma_min != 0.0 {
                return Err((
                    "loss.sigma_min",
                    "loss.coupling = \"schrodinger-bridge\" has its own noise, loss.sigma; leave loss.sigma_min at 0".into(),
                ));
            }
        }
        Ok((path, coupling, time))
    }
}

impl TrainConfig {
    /// Steps, batch, learning rate, weight average and decay in range.
    pub fn check(&self) -> Result<TrainPlan, Bad> {
        check_count("train.steps", self.steps)?;
        check_count("train.batch_size", self.batch_size)?;
        let optim = check_optim(self, "train.lr", self.lr)?;
        let schedule = check_schedule(self, "train.steps", self.steps)?;
        validate_ema(self.ema).map_err(|e| loss_key(&[], "train.ema", e))?;
        Ok(TrainPlan {
            steps: self.steps,
            batch_size: self.batch_size,
            seed: self.seed,
            optim,
            schedule,
            ema: self.ema,
            prefetch: self.prefetch,
            checkpoint_every: self.checkpoint_every,
        })
    }
}

impl LoggingConfig {
    /// The logging cadence (at least every step).
    pub fn check(&self) -> Result<LogPlan, Bad> {
        check_count("logging.every", self.every)?;
        Ok(LogPlan {
            every: self.every,
            tensorboard: self.tensorboard,
            plots: self.plots,
        })
    }
}

impl SolverConfig {
    /// The headline solver.
    pub fn check(&self) -> Result<SolverSpec, Bad> {
        let spec = SolverSpec {
            method: self.method,
            steps: self.steps,
            warp_s: self.warp_s,
            tol: Tolerances {
                rtol: self.rtol,
                atol: self.atol,
            },
            reverse: false,
        };
        spec.validate().map_err(|e| match e {
            SolverError::Setting { field, msg } => {
                let keys = [
                    ("steps", "solver.steps"),
                    ("warp_s", "solver.warp_s"),
                    ("rtol", "solver.rtol"),
                    ("atol", "solver.atol"),
                ];
                key_of(&keys, "solver.method", field, msg)
            }
            e => ("solver.method", e.to_string()),
        })?;
        Ok(spec)
    }
}

impl EvalConfig {
    /// The table's methods and the classifier file (its contents are read when the plan is
    /// built, before training).
    pub fn check(&self) -> Result<(Vec<TableMethod>, Option<PathBuf>, EvalPlan), Bad> {
        if self.samples < 2 {
            return Err(("eval.samples", "must be at least 2".into()));
        }
        if self.steps.is_empty() || self.steps.contains(&0) {
            return Err((
                "eval.steps",
                "must be a non-empty list of step counts ≥ 1".into(),
            ));
        }
        if let Some(d) = first_repeat(&self.steps) {
            return Err(("eval.steps", format!("{d} is listed twice")));
        }
        check_list_len("eval.steps", self.steps.len(), "step counts")?;
        check_warp("eval.warp_s", self.warp_s)?;
        if self.methods.is_empty() {
            return Err((
                "eval.methods",
                "must be a non-empty list of solvers (euler, midpoint, heun, rk4, dopri5, or NAME-warp)".into(),
            ));
        }
        if let Some(d) = first_repeat(&self.methods) {
            return Err(("eval.methods", format!("'{d}' is listed twice")));
        }
        let classifier = (!self.classifier.is_empty()).then(|| PathBuf::from(&self.classifier));
        let plan = EvalPlan {
            samples: self.samples,
            steps: self.steps.clone(),
            warp_s: self.warp_s,
            seed: self.seed,
            every: self.every,
        };
        Ok((self.methods.clone(), classifier, plan))
    }
}

impl LossConfig {
    /// The training objective.
    pub fn check_objective(&self) -> Result<Objective, Bad> {
        let objective = Objective::of(
            self.objective,
            ObjectiveOptions {
                span_fraction: self.meanflow_fraction,
                adaptive_p: self.meanflow_p,
                bootstrap_fraction: self.shortcut_bootstrap,
                max_steps: self.shortcut_steps,
            },
        );
        let keys = [
            ("span_fraction", "loss.meanflow_fraction"),
            ("adaptive_p", "loss.meanflow_p"),
            ("bootstrap_fraction", "loss.shortcut_bootstrap"),
            ("max_steps", "loss.shortcut_steps"),
        ];
        objective
            .validate()
            .map_err(|e| loss_key(&keys, "loss.objective", e))?;
        Ok(objective)
    }
}

impl EvalConfig {
    /// The opt-in metrics, each a measurable entry of the registry, once.
    pub fn check_metrics(&self) -> Result<Vec<&'static crate::metrics::Metric>, Bad> {
        if let Some(d) = first_repeat(&self.metrics) {
            return Err(("eval.metrics", format!("'{d}' is listed twice")));
        }
        self.metrics
            .iter()
            .map(|name| {
                crate::metrics::find(name)
                    .filter(|m| m.measure.is_some())
                    .ok_or_else(|| {
                        (
                            "eval.metrics",
                            format!(
                                "'{name}' is not a metric an evaluation can add; known: {}",
                                crate::metrics::measurable().join(", ")
                            ),
                        )
                    })
            })
            .collect()
    }

    /// The likelihood evaluation: on by default for 2-D data with a Gaussian source.
    pub fn check_nll(
        &self,
        dim: usize,
        source_std: Option<f64>,
        tol: Tolerances,
    ) -> Result<Option<NllSpec>, Bad> {
        let samples = self.nll_samples.unwrap_or(if dim <= 16 { 1000 } else { 0 });
        if samples == 0 {
            return Ok(None);
        }
        if source_std.is_none() {
            // Only a Gaussian source has the density the likelihood starts from.
            return match self.nll_samples {
                Some(_) => Err((
                    "eval.nll_samples",
                    "the likelihood needs a Gaussian source (data.source = gaussian or gaussian-nd); set it to 0".into(),
                )),
                None => Ok(None),
            };
        }
        check_count("eval.nll_steps", self.nll_steps)?;
        check_count("eval.nll_probes", self.nll_probes)?;
        let divergence = if dim <= 16 {
            Divergence::Exact
        } else {
            Divergence::Hutchinson {
                probes: self.nll_probes,
            }
        };
        Ok(Some(NllSpec {
            samples: samples.min(self.samples),
            solver: SolverSpec {
                tol,
                ..SolverSpec::new(self.nll_method, self.nll_steps)
            },
            divergence,
        }))
    }

    /// The stochastic rows.
    pub fn check_sde(&self, score: Option<SdeScore>) -> Result<Vec<NoiseSchedule>, Bad> {
        if !self.sde_gammas.is_empty() && score.is_none() {
            return Err((
                "eval.sde_gammas",
                "the stochastic sampler's score needs a Gaussian source (data.source = gaussian or gaussian-nd) or a score head (model.score)".into(),
            ));
        }
        check_list_len("eval.sde_gammas", self.sde_gammas.len(), "noise scales")?;
        if let Some(g) = first_repeat(&self.sde_gammas) {
            return Err(("eval.sde_gammas", format!("{g} is listed twice")));
        }
        let rows: Vec<NoiseSchedule> = self
            .sde_gammas
            .iter()
            .map(|&g| self.sde_schedule.with(g))
            .collect();
        for r in &rows {
            r.validate().map_err(|e| {
                let msg = e.to_string();
                let msg = msg.strip_prefix("invalid solver setting: ").unwrap_or(&msg);
                ("eval.sde_gammas", msg.to_string())
            })?;
        }
        if !rows.is_empty() {
            check_count("eval.sde_steps", self.sde_steps)?;
        }
        Ok(rows)
    }
}

impl ReflowConfig {
    /// The reflow chain; students default to the base run's steps and learning rate.
    pub fn check(
        &self,
        train: &TrainConfig,
        tol: Tolerances,
        limits: &LimitsConfig,
    ) -> Result<ReflowSpec, Bad> {
        check_count("reflow.teacher_steps", self.teacher_steps)?;
        if let Some(s) = self.teacher_warp_s {
            check_warp("reflow.teacher_warp_s", s)?;
        }
        if self.mode == ReflowMode::Offline {
            check_count("reflow.pairs", self.pairs)?;
        }
        if self.iterations > limits.reflow_iterations {
            return Err((
                "reflow.iterations",
                format!(
                    "{} is over limits.reflow_iterations = {} (each iteration trains a model); raise the limit with --set limits.reflow_iterations=N",
                    self.iterations, limits.reflow_iterations
                ),
            ));
        }
        let steps = self.steps.unwrap_or(train.steps);
        check_count("reflow.steps", steps)?;
        if self.iterations > 0 {
            check_schedule(train, "reflow.steps", steps)?;
        }
        let lr = self.lr.unwrap_or(train.lr);
        check_optim(train, "reflow.lr", lr)?;
        if self.distill_k > 0 {
            check_count("reflow.distill_steps", self.distill_steps)?;
        }
        Ok(ReflowSpec {
            iterations: self.iterations,
            mode: self.mode,
            pairs: self.pairs,
            teacher: SolverSpec {
                method: self.teacher_method,
                steps: self.teacher_steps,
                warp_s: self.teacher_warp_s,
                tol,
                reverse: false,
            },
            init: self.init,
            steps,
            lr,
            distill_k: self.distill_k,
            distill_steps: self.distill_steps,
            guidance: self.guidance.unwrap_or(1.0),
        })
    }
}

/// A guidance scale (`key`), by the library's rule.
fn check_guidance(key: &'static str, w: f64) -> Result<(), Bad> {
    flowmatch_models::validate_guidance(w).map_err(|e| match e {
        ModelError::Setting { msg, .. } => (key, msg),
        e => (key, e.to_string()),
    })
}

impl Config {
    /// Where the stochastic sampler's score comes from: the score head, which needs the
    /// Schrödinger bridge to train on (and a plain flow-matching MLP), or the velocity of a
    /// linear path from a Gaussian source. A bridge without a head has no score to sample with.
    fn check_score(
        &self,
        model: &ModelSpec,
        coupling: &CouplingSpec,
        source_std: Option<f64>,
    ) -> Result<Option<SdeScore>, Bad> {
        let bridge = match coupling {
            CouplingSpec::SchrodingerBridge { sigma, .. } => Some(*sigma),
            _ => None,
        };
        if !self.model.score {
            if bridge.is_some() && !self.eval.sde_gammas.is_empty() {
                return Err((
                    "eval.sde_gammas",
                    "a Schrödinger-bridge flow samples stochastically with its learned score; set model.score = true".into(),
                ));
            }
            return Ok(source_std.map(|source_std| SdeScore::FromVelocity { source_std }));
        }
        let Some(sigma) = bridge else {
            return Err((
                "model.score",
                "the score head trains on the Brownian bridge's noise; it needs loss.coupling = \"schrodinger-bridge\"".into(),
            ));
        };
        if !model.score() {
            return Err((
                "model.score",
                format!(
                    "applies to velocity-net and velocity-mlp, not {}",
                    model.kind().name()
                ),
            ));
        }
        if model.classes() > 0 || model.span() {
            return Err((
                "model.score",
                "applies to an unconditional flow-matching model (model.classes = 0, loss.objective = \"cfm\")".into(),
            ));
        }
        Ok(Some(SdeScore::Head { sigma }))
    }

    /// The conditioning of a model of `classes` labels on `target`: the training labels,
    /// the headline guidance scale and the evaluation's other scales. Every conditioning key
    /// is refused on an unconditional model, and `model.classes` must match the target's.
    fn check_conditioning(
        &self,
        target: &DataSpec,
        classes: usize,
        coupling: &CouplingSpec,
    ) -> Result<(Option<LabelDraw>, f64, Vec<f64>), Bad> {
        let ev = &self.eval;
        check_guidance("solver.guidance", self.solver.guidance)?;
        if let Some(w) = self.reflow.guidance {
            check_guidance("reflow.guidance", w)?;
        }
        check_list_len("eval.guidance", ev.guidance.len(), "guidance scales")?;
        for &w in &ev.guidance {
            check_guidance("eval.guidance", w)?;
        }
        if let Some(w) = first_repeat(&ev.guidance) {
            return Err(("eval.guidance", format!("{w} is listed twice")));
        }
        let within = matches!(
            coupling,
            CouplingSpec::Ot {
                within_class: true,
                ..
            }
        );
        if self.loss.ot_within_class && !within {
            return Err((
                "loss.ot_within_class",
                "applies to loss.coupling = \"ot\" only".into(),
            ));
        }
        if classes == 0 {
            let set = [
                ("solver.guidance", self.solver.guidance != 1.0),
                ("eval.guidance", !ev.guidance.is_empty()),
                ("loss.label_drop", self.loss.label_drop.is_some()),
                ("loss.ot_within_class", within),
                ("reflow.guidance", self.reflow.guidance.is_some()),
            ];
            return match set.into_iter().find(|(_, on)| *on) {
                Some((key, _)) => Err((
                    key,
                    "applies to a conditional model; set model.classes to the target's class count"
                        .into(),
                )),
                None => Ok((None, 1.0, vec![])),
            };
        }
        let have = target.classes();
        if have == 0 {
            return Err((
                "data.target",
                format!(
                    "'{}' has no class labels, so model.classes = {classes} has none to read (labelled targets: moons, moons-torchcfm, two-gaussians, 8gaussians, checkerboard, mnist)",
                    self.data.target
                ),
            ));
        }
        if have != classes {
            return Err((
                "model.classes",
                format!("'{}' has {have} classes, not {classes}", self.data.target),
            ));
        }
        let drop = self.loss.label_drop.unwrap_or(0.1);
        validate_label_drop(drop).map_err(|e| loss_key(&[], "loss.label_drop", e))?;
        let labels = LabelDraw { classes, drop };
        Ok((Some(labels), self.solver.guidance, ev.guidance.clone()))
    }
}

impl Config {
    /// Layers a config ([`Config::layered`]) and checks it once; an error is one line that
    /// names the key and where its value came from.
    pub fn load(src: &ConfigSource) -> Result<Plan, ConfigError> {
        let (cfg, origins) = Config::layered(src)?;
        cfg.check()
            .map_err(|(key, msg)| ConfigError(format!("{key}: {msg}{}", origins.of(key))))
    }

    /// Checks every section once and assembles the plan; the error names the offending key.
    pub fn check(&self) -> Result<Plan, Bad> {
        check_name(&self.name).map_err(|m| ("name", m))?;
        if self.tf32 && self.device == DeviceRequest::Cpu {
            return Err((
                "tf32",
                "TF32 is a mode of CUDA's matrix products; the device is cpu (set device = \"cuda\" or \"auto\")".into(),
            ));
        }
        let (source, target) = self.data.check()?;
        let model = self.model.check(source.dim())?;
        let (path, coupling, time) = self.loss.check()?;
        let objective = self.loss.check_objective()?;
        let model = model.with_span(objective.needs_span());
        let train = self.train.check()?;
        let solver = self.solver.check()?;
        let (table, classifier, eval) = self.eval.check()?;
        let source_std = match &source {
            DataSpec::Shape(d) => d.gaussian_std(),
            DataSpec::Mnist => None,
        };
        let nll = self.eval.check_nll(source.dim(), source_std, solver.tol)?;
        let sde_score = self.check_score(&model, &coupling, source_std)?;
        let sde = self.eval.check_sde(sde_score)?;
        let metrics = self.eval.check_metrics()?;
        let logging = self.logging.check()?;
        let lim = &self.limits;
        if !(lim.memory_gb > 0.0 && lim.memory_gb.is_finite()) {
            return Err((
                "limits.memory_gb",
                format!("must be a positive number, got {}", lim.memory_gb),
            ));
        }
        let reflow = self.reflow.check(&self.train, solver.tol, lim)?;
        if reflow.is_reflow() && matches!(coupling, CouplingSpec::SchrodingerBridge { .. }) {
            return Err((
                "reflow.iterations",
                "reflow's students train on straight paths between the teacher's pairs; it does not follow loss.coupling = \"schrodinger-bridge\" (reflow a run of another coupling)".into(),
            ));
        }
        let (labels, guidance, guidance_rows) =
            self.check_conditioning(&target, model.classes(), &coupling)?;
        let plan = Plan {
            name: self.name.clone(),
            device: self.device,
            tf32: self.tf32,
            data_dir: PathBuf::from(&self.data.dir),
            source_name: self.data.source.clone(),
            target_name: self.data.target.clone(),
            source,
            target,
            model,
            path,
            coupling,
            time,
            solver,
            table,
            classifier,
            reflow,
            objective,
            nll,
            metrics,
            sde,
            sde_score,
            sde_steps: self.eval.sde_steps,
            source_std,
            train,
            eval,
            logging,
            labels,
            guidance,
            guidance_rows,
            config: Arc::new(self.clone()),
        };
        if let Some(msg) = crate::limits::exact_ot_too_slow(&plan) {
            return Err(("train.batch_size", msg));
        }
        let need = crate::limits::estimate(&plan);
        if need.bytes > lim.memory_gb * 1e9 {
            return Err((
                need.key,
                format!(
                    "this run would need about {} of memory ({}), over limits.memory_gb = {}; lower it, or raise the limit with --set limits.memory_gb=N",
                    crate::limits::human(need.bytes),
                    need.what,
                    lim.memory_gb
                ),
            ));
        }
        Ok(plan)
    }
}
