//! The experiment config: defaults < TOML file < `FLOWMATCH_…` environment < `--set key=value`,
//! parsed once with figment + serde straight into the library's types (unknown keys and names
//! are errors), then checked once, section by section, into a plan ([`crate::check`]).

use crate::device::DeviceRequest;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use flowmatch_losses::{
    CouplingKind, CouplingOptions, LrDecay, ObjectiveKind, OtDraw, OtSolver, Schedule, TimeKind,
};
use flowmatch_models::{activation::Activation, ModelKind};
use flowmatch_reflow::{ReflowInit, ReflowMode};
use flowmatch_solvers::{Method, NoiseSchedule};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole experiment: what to train, how, and how to evaluate it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Run name (default: the config file's stem).
    pub name: String,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: DeviceRequest,
    /// TF32 matrix products on CUDA (opt-in: off, a run's numbers stay f32-exact). Written
    /// into the resolved config only when on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub train: TrainConfig,
    pub solver: SolverConfig,
    pub eval: EvalConfig,
    pub logging: LoggingConfig,
    pub reflow: ReflowConfig,
    pub limits: LimitsConfig,
}

/// `[limits]`: what a run may ask for before it starts, so that a typo such as
/// `train.batch_size = 1000000000` fails at once instead of exhausting the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory a run may need (the estimate of [`crate::limits::estimate`]), in GB.
    pub memory_gb: f64,
    /// Most reflow iterations (each one trains a model).
    pub reflow_iterations: usize,
}

/// `[data]`: the source and target distributions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub source: String,
    pub target: String,
    /// Overrides the source's scale parameter (see flowmatch-data).
    pub source_scale: Option<f64>,
    /// Overrides the target's scale parameter.
    pub target_scale: Option<f64>,
    /// Data dimension (only `gaussian-nd` is not 2D; MNIST sets 784 itself).
    pub dim: usize,
    /// Folder of the MNIST IDX files for `mnist` (or `hub` to download them).
    pub dir: String,
}

/// `[model]`: the velocity field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `velocity-net` (blog), `velocity-mlp` (lesson), `unet` or `unet-lesson`.
    pub kind: ModelKind,
    pub hidden: usize,
    /// Hidden layers (velocity-mlp only).
    pub layers: usize,
    /// Channels at the three resolutions in multiples of `hidden` (unet only).
    pub mults: [usize; 3],
    /// Self-attention at the lowest resolution (unet only).
    pub attention: bool,
    /// `gelu`, `silu` or `relu` (default: the seed's choice for the kind).
    pub activation: Option<Activation>,
    /// Class labels the model is conditioned on (0: unconditional); the target's class count.
    pub classes: usize,
    /// A score head beside the velocity (velocity-net, velocity-mlp), trained on the
    /// Schrödinger bridge's score and used by the stochastic sampler (SF²M).
    pub score: bool,
}

/// The config key of each [`CouplingOptions`] field (named in a coupling's errors).
pub const COUPLING_KEYS: &[(&str, &str)] = &[
    ("ot_solver", "loss.ot_solver"),
    ("ot_within_class", "loss.ot_within_class"),
    ("ot_reg", "loss.ot_reg"),
    ("ot_draw", "loss.ot_draw"),
    ("ot_tol", "loss.ot_tol"),
    ("ot_max_iter", "loss.ot_max_iter"),
    ("sigma", "loss.sigma"),
];

impl LossConfig {
    /// The coupling's settings (its keys: [`COUPLING_KEYS`]).
    pub fn coupling_options(&self) -> CouplingOptions {
        CouplingOptions {
            ot_solver: self.ot_solver,
            ot_within_class: self.ot_within_class,
            ot_reg: self.ot_reg,
            ot_draw: self.ot_draw,
            ot_tol: self.ot_tol,
            ot_max_iter: self.ot_max_iter,
            sigma: self.sigma,
        }
    }
}

/// `[loss]`: probability path, coupling and time sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// `linear`, `cosine` or `vp`.
    pub path: Schedule,
    /// `independent`, `ot`, `sinkhorn` or `schrodinger-bridge`.
    pub coupling: CouplingKind,
    /// The assignment solver of `ot`: `jv` (ours) or `pathfinding` (Kuhn–Munkres).
    pub ot_solver: OtSolver,
    /// Label-aware OT: the assignment within each class (conditional models).
    pub ot_within_class: bool,
    /// `sinkhorn`: the entropic regularisation ε, relative to the batch's mean cost.
    pub ot_reg: f64,
    /// `sinkhorn`, `schrodinger-bridge`: pairs drawn from the plan `with-replacement`
    /// (TorchCFM) or by `rows` (one target per source point).
    pub ot_draw: OtDraw,
    /// Sinkhorn's stopping marginal error (L1) and its iteration cap.
    pub ot_tol: f64,
    pub ot_max_iter: usize,
    /// `schrodinger-bridge`: the bridge's noise σ (pairs from the plan at ε = 2σ²).
    pub sigma: f64,
    /// The probability that a training label is replaced by "no label" (classifier-free
    /// guidance); default 0.1 for a conditional model.
    pub label_drop: Option<f64>,
    pub sigma_min: f64,
    /// `uniform`, `warped` or `logit-normal`.
    pub time: TimeKind,
    /// Warp slope for `time = "warped"`.
    pub time_warp_s: f64,
    pub logit_mean: f64,
    pub logit_std: f64,
    /// `cfm` (regress the flow's velocity), `meanflow` or `shortcut` (a model with a span
    /// input, sampled in a few Euler steps).
    pub objective: ObjectiveKind,
    /// MeanFlow: fraction of pairs with a span `h > 0` (the rest are flow matching).
    pub meanflow_fraction: f64,
    /// MeanFlow: power `p` of the adaptive loss weight `1/(‖Δ‖² + 10⁻³)^p` (0 = squared error).
    pub meanflow_p: f64,
    /// Shortcut models: fraction of each batch on the self-consistency target.
    pub shortcut_bootstrap: f64,
    /// Shortcut models: the finest step count `M` (a power of two).
    pub shortcut_steps: usize,
}

/// `[train]`: optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// `constant`, `cosine` or `linear`: the rate after the warm-up, decaying to zero at the
    /// last step for the last two.
    pub lr_decay: LrDecay,
    /// Steps of linear warm-up to `lr` (0 = none).
    pub warmup: usize,
    pub weight_decay: f64,
    pub seed: u64,
    /// Save `model.safetensors` every this many steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Exponential moving average of the weights, decay in [0, 1) (0 = none): checkpoints
    /// and evaluations then use the averaged weights.
    pub ema: f64,
    /// Pair the next batch (OT assignment, reflow teacher) on a second thread while the
    /// current step trains, on CPU. Same numbers either way.
    pub prefetch: bool,
}

/// `[solver]`: the sampler used for the headline metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverConfig {
    /// `euler`, `midpoint`, `heun`, `rk4` or `dopri5`.
    pub method: Method,
    pub steps: usize,
    /// Time-grid warp `s ∈ [0, 1.5]`; absent = uniform grid.
    pub warp_s: Option<f64>,
    pub rtol: f64,
    pub atol: f64,
    /// Classifier-free guidance scale of a conditional model (0: unconditional, 1: plain
    /// conditional).
    pub guidance: f64,
}

/// `[eval]`: the evaluation after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Generated and real samples compared (W2 is exact: O(n³)).
    pub samples: usize,
    /// Step counts of the table.
    pub steps: Vec<usize>,
    /// Methods of the table (`rk4-warp` = RK4 on the grid warped with `warp_s`).
    pub methods: Vec<TableMethod>,
    /// Warp slope used by warped table entries.
    pub warp_s: f64,
    /// Seed of the evaluation samples (independent of training).
    pub seed: u64,
    /// MNIST classifier (`flowmatch classifier`) for the FID-like score; empty = none.
    pub classifier: String,
    /// Evaluate the headline solver (W2, MMD, FID) every this many training steps, to follow
    /// training (0 = only at the end).
    pub every: usize,
    /// Real samples whose negative log-likelihood is computed (Gaussian sources only; 0 =
    /// none). Default: 1000 for 2-D data, none for images (each point costs a backward pass
    /// per solver evaluation).
    pub nll_samples: Option<usize>,
    /// The solver of the likelihood ODE (integrated backwards).
    pub nll_method: Method,
    pub nll_steps: usize,
    /// Hutchinson probes per point in more than 16 dimensions (the divergence is exact below).
    pub nll_probes: usize,
    /// Noise scales γ of stochastic (Euler–Maruyama) rows in the eval table (empty = none).
    pub sde_gammas: Vec<f64>,
    /// `constant` (g = γ) or `decaying` (g = γ·(1 − t)).
    pub sde_schedule: SdeSchedule,
    /// Euler–Maruyama steps of the stochastic rows.
    pub sde_steps: usize,
    /// Opt-in metrics of the registry measured on the headline samples (`nn_accuracy`).
    pub metrics: Vec<String>,
    /// Guidance scales scored besides `solver.guidance` (conditional models).
    pub guidance: Vec<f64>,
}

/// The shape of the noise scale `g(t)` of stochastic rows (`eval.sde_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SdeSchedule {
    Constant,
    Decaying,
}

impl SdeSchedule {
    /// The noise schedule with scale `gamma`.
    pub fn with(self, gamma: f64) -> NoiseSchedule {
        match self {
            Self::Constant => NoiseSchedule::Constant { gamma },
            Self::Decaying => NoiseSchedule::Decaying { gamma },
        }
    }
}

/// `[reflow]`: k-rectified flows trained after the base run (1-RF).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReflowConfig {
    /// Reflow iterations after the base run (0 = none): 1 gives 2-RF, 2 gives 3-RF, …
    pub iterations: usize,
    /// `online` (new teacher pairs every step) or `offline` (a fixed pair set).
    pub mode: ReflowMode,
    /// Size of the offline pair set.
    pub pairs: usize,
    /// The teacher's solver.
    pub teacher_method: Method,
    pub teacher_steps: usize,
    /// Warp of the teacher's time grid (absent = uniform).
    pub teacher_warp_s: Option<f64>,
    /// Student initialisation: `teacher` (copy its weights) or `scratch`.
    pub init: ReflowInit,
    /// Student training steps (default: `train.steps`).
    pub steps: Option<usize>,
    /// Student learning rate (default: `train.lr`).
    pub lr: Option<f64>,
    /// k of the k-step distillation of the last student (0 = none).
    pub distill_k: usize,
    pub distill_steps: usize,
    /// The guidance scale a conditional teacher samples its pairs at (default 1: plain
    /// conditional). Conditional models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// Log the loss every this many steps (metrics.jsonl and TensorBoard).
    pub every: usize,
    pub tensorboard: bool,
    /// Draw the run's figures (PNG, GIF) into its folder.
    pub plots: bool,
}

impl Default for Config {
    fn default() -> Self {
        // The settings' defaults are the libraries' (the papers' choices).
        let time = flowmatch_losses::TimeOptions::default();
        let objective = flowmatch_losses::ObjectiveOptions::default();
        let coupling = CouplingOptions::default();
        Self {
            name: String::new(),
            device: DeviceRequest::Cpu,
            tf32: false,
            data: DataConfig {
                source: "gaussian".into(),
                target: "moons".into(),
                source_scale: None,
                target_scale: None,
                dim: 2,
                dir: "data/mnist".into(),
            },
            model: ModelConfig {
                kind: ModelKind::VelocityMlp,
                hidden: 128,
                layers: 3,
                mults: flowmatch_models::UNET_MULTS,
                attention: false,
                activation: None,
                classes: 0,
                score: false,
            },
            loss: LossConfig {
                path: Schedule::Linear,
                coupling: CouplingKind::Independent,
                ot_solver: OtSolver::Jv,
                ot_within_class: false,
                ot_reg: coupling.ot_reg,
                ot_draw: coupling.ot_draw,
                ot_tol: coupling.ot_tol,
                ot_max_iter: coupling.ot_max_iter,
                sigma: coupling.sigma,
                label_drop: None,
                sigma_min: 0.0,
                time: TimeKind::Uniform,
                time_warp_s: time.s,
                logit_mean: time.mean,
                logit_std: time.std,
                objective: ObjectiveKind::Cfm,
                meanflow_fraction: objective.span_fraction,
                meanflow_p: objective.adaptive_p,
                shortcut_bootstrap: objective.bootstrap_fraction,
                shortcut_steps: objective.max_steps,
            },
            train: TrainConfig {
                steps: 5000,
                batch_size: 256,
                lr: 1e-3,
                lr_decay: LrDecay::Constant,
                warmup: 0,
                weight_decay: 0.0,
                seed: 0,
                checkpoint_every: 1000,
                ema: 0.0,
                prefetch: true,
            },
            solver: SolverConfig {
                method: Method::Euler,
                steps: 100,
                warp_s: None,
                rtol: 1e-5,
                atol: 1e-5,
                guidance: 1.0,
            },
            eval: EvalConfig {
                samples: 2000,
                steps: vec![1, 2, 5, 10, 50, 100],
                methods: vec![TableMethod {
                    method: Method::Euler,
                    warped: false,
                }],
                warp_s: 0.5,
                seed: 1_000_003,
                classifier: String::new(),
                every: 0,
                nll_samples: None,
                nll_method: Method::Rk4,
                nll_steps: 20,
                nll_probes: 1,
                sde_gammas: vec![],
                sde_schedule: SdeSchedule::Constant,
                sde_steps: 100,
                metrics: vec![],
                guidance: vec![],
            },
            logging: LoggingConfig {
                every: 10,
                tensorboard: true,
                plots: true,
            },
            reflow: ReflowConfig {
                iterations: 0,
                mode: ReflowMode::Online,
                pairs: 25_600,
                teacher_method: Method::Rk4,
                teacher_steps: 20,
                teacher_warp_s: Some(0.5),
                init: ReflowInit::Teacher,
                steps: None,
                lr: None,
                distill_k: 0,
                distill_steps: 1000,
                guidance: None,
            },
            limits: LimitsConfig {
                memory_gb: DEFAULT_MEMORY_GB,
                reflow_iterations: 100,
            },
        }
    }
}

/// `limits.memory_gb` unless a config says otherwise.
pub const DEFAULT_MEMORY_GB: f64 = 16.0;

/// A config error: one line naming the key and where its value came from.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// One entry of the eval table: a method on a uniform or warped grid, written `rk4` or
/// `rk4-warp` (RK4 on the grid warped with `eval.warp_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TableMethod {
    pub method: Method,
    pub warped: bool,
}

impl TryFrom<String> for TableMethod {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (name, warped) = match s.strip_suffix("-warp") {
            Some(base) => (base, true),
            None => (s.as_str(), false),
        };
        Ok(Self {
            method: Method::from_name(name)?,
            warped,
        })
    }
}

impl From<TableMethod> for String {
    fn from(m: TableMethod) -> String {
        format!("{}{}", m.method.name(), if m.warped { "-warp" } else { "" })
    }
}

impl std::fmt::Display for TableMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from(*self))
    }
}

/// One `key = value` layered over the config file, with where it came from (`--set …`, a
/// sweep file's `[axes]`), which config errors name.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Dotted key, e.g. `train.steps`.
    pub key: String,
    pub value: toml::Value,
    /// Where the value came from, as errors print it.
    pub origin: String,
}

impl Override {
    /// An override from `origin`.
    pub fn new(key: &str, value: toml::Value, origin: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            value,
            origin: origin.into(),
        }
    }
}

impl Provider for Override {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.origin.clone())
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::default(&self.key, &self.value).data()
    }
}

/// The sections of a config, as `FLOWMATCH_SECTION__KEY` names them.
const SECTIONS: [&str; 9] = [
    "data", "model", "loss", "train", "solver", "eval", "logging", "reflow", "limits",
];

/// Checks that every `FLOWMATCH_…` variable is a config key, so that a misspelt one is an
/// error rather than silently ignored.
fn check_environment() -> Result<(), ConfigError> {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix("FLOWMATCH_") else {
            continue;
        };
        let ok = match rest.split_once("__") {
            None => rest == "DEVICE" || rest == "NAME",
            Some((section, key)) => {
                SECTIONS.contains(&section.to_ascii_lowercase().as_str()) && !key.is_empty()
            }
        };
        if !ok {
            return Err(ConfigError(format!(
                "environment variable {name} is not a config key: use FLOWMATCH_SECTION__KEY with two underscores (e.g. FLOWMATCH_TRAIN__STEPS; sections: {}), FLOWMATCH_DEVICE or FLOWMATCH_NAME",
                SECTIONS.join(", ")
            )));
        }
    }
    Ok(())
}

/// Checks a run or sweep name: it becomes a folder under `--out`, so it must be one plain
/// path component.
pub fn check_name(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.contains(['/', '\\'])
        || name.starts_with('.')
        || name.chars().any(char::is_control)
        || name.len() > 200;
    if bad {
        return Err(format!(
            "{name:?} is not a usable name (one folder name: not empty, no '/', no leading '.', no control characters, at most 200 bytes)"
        ));
    }
    Ok(())
}

/// Parses a `--set key=value`: the value as TOML (numbers, booleans, arrays), else a string.
pub fn parse_set(s: &str) -> Result<Override, ConfigError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| ConfigError(format!("--set '{s}': expected key=value")))?;
    let key = k.trim().to_string();
    if key.is_empty() {
        return Err(ConfigError(format!("--set '{s}': empty key")));
    }
    let v = v.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok(Override {
        key,
        value,
        origin: format!("--set {}", s.trim()),
    })
}

/// Where each value of a layered config came from.
pub struct Origins(Figment);

impl Origins {
    /// ` (from SOURCE)` for `key`: the file, the environment variable, the `--set`, the sweep
    /// file, or ` (the default)`.
    pub fn of(&self, key: &str) -> String {
        match self.0.find_metadata(key) {
            Some(m) => match &m.source {
                // Built-in defaults (and the name taken from the file's stem).
                Some(figment::Source::Code(_)) => " (the default)".to_string(),
                Some(s) => format!(" (from {s})"),
                None if m.name.contains("environment") => format!(" (from {})", env_var(key)),
                None => format!(" (from {})", m.name),
            },
            None => String::new(),
        }
    }
}

/// Where a config comes from: a file (optional), the environment and overrides.
pub struct ConfigSource<'a> {
    pub file: Option<&'a Path>,
    pub sets: &'a [Override],
}

impl Config {
    /// Layers defaults < file < `FLOWMATCH_SECTION__KEY` env vars < `--set` into typed
    /// sections, with where each value came from (for [`Config::load`], which also checks).
    pub fn layered(src: &ConfigSource) -> Result<(Config, Origins), ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = src.file {
            let kind = match std::fs::metadata(path) {
                Err(_) => Some("does not exist"),
                Ok(m) if m.is_dir() => Some("is a folder, not a TOML file"),
                Ok(m) if !m.is_file() => Some("is not a regular file"),
                Ok(_) => None,
            };
            if let Some(kind) = kind {
                return Err(ConfigError(format!(
                    "config file {} {kind}",
                    path.display()
                )));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
            if let Err(e) = text.parse::<toml::Table>() {
                let msg = e.message().trim().replace('\n', " ");
                let line = e.span().map(|s| text[..s.start].lines().count().max(1));
                return Err(ConfigError(match line {
                    Some(l) => format!("{}:{l}: TOML syntax error: {msg}", path.display()),
                    None => format!("{}: TOML syntax error: {msg}", path.display()),
                }));
            }
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            fig = fig
                .merge(Serialized::default("name", stem))
                .merge(Toml::file(path));
        }
        // FLOWMATCH_SECTION__KEY, FLOWMATCH_DEVICE and FLOWMATCH_NAME; anything else is refused.
        check_environment()?;
        fig = fig.merge(Env::prefixed("FLOWMATCH_").split("__"));
        for o in src.sets {
            fig = fig.merge(o.clone());
        }
        let cfg: Config = fig.extract().map_err(|e| ConfigError(figment_error(e)))?;
        Ok((cfg, Origins(fig)))
    }

    /// The resolved config as TOML (written into every run folder).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads a resolved config that a run folder holds (`config.toml`); keys it lacks take
    /// their defaults. No validation: it is only compared with [`Self::differences`].
    pub fn read_resolved(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Self::from_resolved_toml(&text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// [`Self::read_resolved`] from the TOML text itself.
    pub fn from_resolved_toml(text: &str) -> Result<Config, ConfigError> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError(figment_error(e)))
    }

    /// Where `self` and `other` differ, one `key: A → B` per key, in file order; keys that
    /// cannot change a run's numbers (see [`NEUTRAL_KEYS`]) are left out.
    pub fn differences(&self, other: &Config) -> Vec<String> {
        let (a, b) = (flatten(self), flatten(other));
        let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
        let mut keys: Vec<&String> = a.iter().map(|(k, _)| k).collect();
        keys.extend(
            b.iter()
                .map(|(k, _)| k)
                .filter(|k| !a.iter().any(|(ka, _)| ka == *k)),
        );
        keys.into_iter()
            .filter(|k| !NEUTRAL_KEYS.contains(&k.as_str()))
            .filter_map(|k| {
                let va = a.iter().find(|(x, _)| x == k).map(|(_, v)| v);
                let vb = b.iter().find(|(x, _)| x == k).map(|(_, v)| v);
                (va != vb).then(|| format!("{k}: {} → {}", show(va), show(vb)))
            })
            .collect()
    }
}

impl Config {
    /// A stable hash (FNV-1a, hex) of every key that can change a run's numbers (all but
    /// [`NEUTRAL_KEYS`]): ties a resume file to the config that wrote it.
    pub fn fingerprint(&self) -> String {
        let text: String = flatten(self)
            .into_iter()
            .filter(|(k, _)| !NEUTRAL_KEYS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        format!("{:016x}", fnv1a(&text))
    }
}

/// FNV-1a, a stable 64-bit hash (folder-name suffixes, fingerprints).
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Keys whose value never changes a run's numbers, so a resumed or reused run may differ in
/// them: the prefetch thread, the figures, TensorBoard and the size limits.
pub const NEUTRAL_KEYS: [&str; 5] = [
    "train.prefetch",
    "logging.plots",
    "logging.tensorboard",
    "limits.memory_gb",
    "limits.reflow_iterations",
];

/// A config as `(dotted key, value)` pairs in file order.
fn flatten(cfg: &Config) -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = vec![];
    if let Ok(v) = toml::Value::try_from(cfg) {
        walk("", &v, &mut out);
    }
    out
}

/// A one-line description of how a stored config differs from the planned one.
pub fn describe_differences(diffs: &[String]) -> String {
    match diffs {
        [] => String::new(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    }
}

/// The environment variable of a dotted key: `train.steps` → `FLOWMATCH_TRAIN__STEPS`.
/// A list element's index (`eval.sde_gammas.1`) is not part of the variable's name.
fn env_var(key: &str) -> String {
    let parts: Vec<&str> = key
        .split('.')
        .take_while(|p| !p.chars().all(|c| c.is_ascii_digit()))
        .collect();
    format!("FLOWMATCH_{}", parts.join("__").to_ascii_uppercase())
}

/// Flattens figment's error into one line: what is wrong, at which key, from which source.
fn figment_error(e: figment::Error) -> String {
    let e = e.into_iter().next().expect("figment errors are non-empty");
    let key = if e.path.is_empty() {
        String::new()
    } else {
        format!("{}: ", e.path.join("."))
    };
    let src = match &e.metadata {
        Some(m) => match &m.source {
            Some(figment::Source::Code(_)) => String::new(),
            Some(s) => format!(" (from {s})"),
            // The environment names the variable (FLOWMATCH_TRAIN__STEPS).
            None if m.name.contains("environment") && !e.path.is_empty() => {
                format!(" (from {})", env_var(&e.path.join(".")))
            }
            None => format!(" (from {})", m.name),
        },
        None => String::new(),
    };
    format!("{key}{}{src}", e.kind).replace('\n', " ")
}

/// Resolves `base` relative to the directory of `relative_to` unless it is absolute.
pub fn resolve_relative(base: &str, relative_to: &Path) -> PathBuf {
    let p = PathBuf::from(base);
    if p.is_absolute() {
        p
    } else {
        relative_to.parent().unwrap_or(Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Plan;

    fn load(text: &str, sets: &[&str]) -> Result<(Config, Plan), ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exp.toml");
        std::fs::write(&p, text).unwrap();
        let sets: Vec<_> = sets.iter().map(|s| parse_set(s).unwrap()).collect();
        let plan = Config::load(&ConfigSource {
            file: Some(&p),
            sets: &sets,
        })?;
        Ok((plan.config().clone(), plan))
    }

    #[test]
    fn tf32_is_opt_in_for_a_gpu_and_left_out_of_the_record_when_off() {
        let e = load("tf32 = true\n", &[]).err().unwrap().0;
        assert!(
            e.starts_with("tf32:") && e.contains("cpu") && e.contains("exp.toml"),
            "{e}"
        );
        let (cfg, plan) = load("device = \"auto\"\ntf32 = true\n", &[]).unwrap();
        assert!(cfg.tf32 && plan.tf32);
        assert!(plan.config_toml().contains("tf32 = true"));
        let (cfg, plan) = load("", &[]).unwrap();
        assert!(!cfg.tf32 && !plan.tf32);
        assert!(!plan.config_toml().contains("tf32"));
    }

    #[test]
    fn unet_settings_on_other_models_and_huge_inputs_are_refused() {
        for (set, key) in [
            ("model.attention=true", "model.attention"),
            ("model.mults=[1, 2, 4]", "model.mults"),
        ] {
            let e = load("", &[set]).err().unwrap().0;
            assert!(e.starts_with(key) && e.contains("unet"), "{e}");
            let e = load(
                "",
                &[
                    set,
                    "model.kind=unet-lesson",
                    "data.target=gaussian-nd",
                    "data.dim=784",
                ],
            )
            .err()
            .unwrap()
            .0;
            assert!(e.starts_with(key), "{e}");
        }
        let e = load("", &["data.target_scale=1e308"]).err().unwrap().0;
        assert!(
            e.starts_with("data.target_scale:") && e.contains("at most"),
            "{e}"
        );
        let many: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
        let e = load("", &[&format!("eval.steps=[{}]", many.join(","))])
            .err()
            .unwrap()
            .0;
        assert!(
            e.starts_with("eval.steps:") && e.contains("at most 64"),
            "{e}"
        );
    }

    #[test]
    fn a_list_element_names_its_variable_without_the_index() {
        assert_eq!(env_var("eval.sde_gammas.1"), "FLOWMATCH_EVAL__SDE_GAMMAS");
        assert_eq!(env_var("train.steps"), "FLOWMATCH_TRAIN__STEPS");
        assert_eq!(env_var("name"), "FLOWMATCH_NAME");
    }

    #[test]
    fn layering_file_then_set() {
        let (c, _) = load(
            "[train]\nsteps = 7\nlr = 0.01\n",
            &["train.steps=9", "data.target=spiral"],
        )
        .unwrap();
        assert_eq!(c.train.steps, 9);
        assert_eq!(c.train.lr, 0.01);
        assert_eq!(c.data.target, "spiral");
        assert_eq!(c.name, "exp");
        assert_eq!(c.train.batch_size, 256);
    }

    #[test]
    fn environment_layer_sits_between_file_and_set() {
        // Only this test touches these variables.
        // (Misspelt FLOWMATCH_ variables are errors: tested end to end, in their own process.)
        std::env::set_var("FLOWMATCH_EVAL__SAMPLES", "77");
        let (c, _) = load("[eval]\nsamples = 5\n", &[]).unwrap();
        assert_eq!(c.eval.samples, 77);
        let (c, _) = load("[eval]\nsamples = 5\n", &["eval.samples=9"]).unwrap();
        assert_eq!(c.eval.samples, 9);
        std::env::remove_var("FLOWMATCH_EVAL__SAMPLES");
    }

    #[test]
    fn errors_name_the_key_and_file() {
        let e = load("[train]\nstepz = 7\n", &[]).err().unwrap().0;
        assert!(e.contains("stepz") && e.contains("exp.toml"), "{e}");
        let e = load("[train]\nsteps = \"many\"\n", &[]).err().unwrap().0;
        assert!(e.contains("train.steps") && e.contains("exp.toml"), "{e}");
        let e = load("[solver]\nwarp_s = 1.7\n", &[]).err().unwrap().0;
        assert!(
            e.contains("solver.warp_s") && e.contains("1.7") && e.contains("exp.toml"),
            "{e}"
        );
        let e = load("", &["train.batch_size=0"]).err().unwrap().0;
        assert!(e.contains("train.batch_size"), "{e}");
        let e = load("[train]\nema = 1.0\n", &[]).err().unwrap().0;
        assert!(e.contains("train.ema") && e.contains("[0, 1)"), "{e}");
        let e = load("[train]\nsteps = 50\nwarmup = 50\n", &[])
            .err()
            .unwrap()
            .0;
        assert!(e.contains("train.warmup") && e.contains("exp.toml"), "{e}");
        let e = load("[train]\nlr_decay = \"exp\"\n", &[]).err().unwrap().0;
        assert!(e.contains("train.lr_decay") && e.contains("cosine"), "{e}");
        let e = load(
            "[train]\nwarmup = 300\n[reflow]\niterations = 1\nsteps = 200\n",
            &[],
        );
        let e = e.err().unwrap().0;
        assert!(
            e.contains("train.warmup") && e.contains("reflow.steps"),
            "{e}"
        );
        let e = load("[data]\ntarget = \"banana\"\n", &[]).err().unwrap().0;
        assert!(e.contains("data.target") && e.contains("banana"), "{e}");
        let e = load("[train\nsteps = 1", &[]).err().unwrap().0;
        assert!(e.contains("exp.toml:1") && e.contains("syntax"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn errors_name_the_right_key_and_its_real_source() {
        // A --set value is blamed on the --set, not on the file or a code location.
        let e = load("[data]\nsource = \"gaussian\"\n", &["data.source_scale=0"])
            .err()
            .unwrap()
            .0;
        assert!(
            e.starts_with("data.source_scale:") && e.contains("--set data.source_scale=0"),
            "{e}"
        );
        let e = load("", &["train.steps=abc"]).err().unwrap().0;
        assert!(
            e.contains("train.steps") && e.contains("--set train.steps=abc") && !e.contains(".rs"),
            "{e}"
        );
        let e = load("", &["solver.atol=0"]).err().unwrap().0;
        assert!(e.starts_with("solver.atol:"), "{e}");
        let e = load("[solver]\nrtol = -1.0\n", &[]).err().unwrap().0;
        assert!(
            e.starts_with("solver.rtol:") && e.contains("exp.toml"),
            "{e}"
        );
        let e = load("", &["loss.time=logit-normal", "loss.logit_mean=nan"])
            .err()
            .unwrap()
            .0;
        assert!(e.starts_with("loss.logit_mean:"), "{e}");
        let e = load("", &["loss.time=logit-normal", "loss.logit_std=0"])
            .err()
            .unwrap()
            .0;
        assert!(e.starts_with("loss.logit_std:"), "{e}");
        let e = load("", &["loss.time=warped", "loss.time_warp_s=3"])
            .err()
            .unwrap()
            .0;
        assert!(e.starts_with("loss.time_warp_s:"), "{e}");
        let unet = ["data.target=mnist", "model.kind=unet", "model.hidden=16"];
        let e = load("", &[&unet[..], &["model.mults=[1, 0, 2]"]].concat())
            .err()
            .unwrap()
            .0;
        assert!(
            e.starts_with("model.mults:") && e.contains("[1, 0, 2]"),
            "{e}"
        );
        let e = load("", &[&unet[..], &["model.mults=[1, 2]"]].concat())
            .err()
            .unwrap()
            .0;
        assert!(e.contains("model.mults"), "{e}");
        let (c, _) = load(
            "",
            &[&unet[..], &["model.mults=[1,2,4]", "model.attention=true"]].concat(),
        )
        .unwrap();
        assert_eq!((c.model.mults, c.model.attention), ([1, 2, 4], true));
    }

    #[test]
    fn eval_lists_must_be_non_empty_and_without_repeats() {
        let e = load("[eval]\nmethods = []\n", &[]).err().unwrap().0;
        assert!(
            e.starts_with("eval.methods:") && e.contains("non-empty"),
            "{e}"
        );
        let e = load("[eval]\nsteps = [1, 5, 5]\n", &[]).err().unwrap().0;
        assert!(
            e.starts_with("eval.steps:") && e.contains("5 is listed twice"),
            "{e}"
        );
        let e = load("[eval]\nmethods = [\"rk4\", \"rk4\"]\n", &[])
            .err()
            .unwrap()
            .0;
        assert!(e.starts_with("eval.methods:") && e.contains("twice"), "{e}");
    }

    #[test]
    fn names_must_be_one_plain_folder_name() {
        for bad in ["a/b", "../x", "", ".x", "a\nb"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"n".repeat(201)).is_err());
        assert!(check_name("lesson_moons-2").is_ok());
        let e = load("", &["name=a\tb"]).err().unwrap().0;
        assert!(e.starts_with("name:"), "{e}");
    }

    #[test]
    fn a_folder_or_a_device_is_not_a_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let load_path = |p: &Path| {
            Config::load(&ConfigSource {
                file: Some(p),
                sets: &[],
            })
            .err()
            .unwrap()
            .0
        };
        let e = load_path(dir.path());
        assert!(e.contains("is a folder"), "{e}");
        let e = load_path(Path::new("/dev/null"));
        assert!(e.contains("not a regular file"), "{e}");
        let e = load_path(&dir.path().join("nope.toml"));
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn absurd_sizes_fail_at_once_with_a_limit_to_raise() {
        let e = load("", &["train.batch_size=1000000000"]).err().unwrap().0;
        assert!(
            e.starts_with("train.batch_size:")
                && e.contains("limits.memory_gb")
                && e.contains("--set train.batch_size"),
            "{e}"
        );
        let e = load(
            "",
            &[
                "data.source=gaussian-nd",
                "data.target=gaussian-nd",
                "data.dim=100000000",
            ],
        )
        .err()
        .unwrap()
        .0;
        assert!(e.starts_with("data.dim:") && e.contains("TB"), "{e}");
        let e = load("", &["reflow.iterations=100000"]).err().unwrap().0;
        assert!(
            e.starts_with("reflow.iterations:") && e.contains("limits.reflow_iterations"),
            "{e}"
        );
        // The user can raise the limit.
        assert!(load("", &["eval.samples=40000"]).is_err());
        assert!(load("", &["eval.samples=40000", "limits.memory_gb=64"]).is_ok());
    }

    #[test]
    fn differences_name_changed_keys_and_ignore_neutral_ones() {
        let a = Config::default();
        let mut b = a.clone();
        assert!(a.differences(&b).is_empty());
        b.train.prefetch = false;
        b.logging.plots = false;
        assert!(a.differences(&b).is_empty());
        b.train.seed = 7;
        b.solver.warp_s = Some(0.5);
        let d = a.differences(&b);
        assert_eq!(d, vec!["train.seed: 0 → 7", "solver.warp_s: (unset) → 0.5"]);
        assert_eq!(describe_differences(&d), "train.seed: 0 → 7 (and 1 more)");
        // What a run folder stores reads back as the same config.
        let back = Config::from_resolved_toml(&b.to_toml()).unwrap();
        assert!(back.differences(&b).is_empty());
        assert_eq!(back, b);
    }
}
