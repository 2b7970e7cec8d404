//! An experiment, built once from its checked [`Plan`]: the samplers (MNIST read once per
//! process), the device, the model spec, the coupling, and the train and eval settings. Runs,
//! reflow stages and sweep runs read it; nothing in it is checked or loaded again.

use crate::check::{DataSpec, Plan};
use crate::config::{Config, TableMethod};
use crate::device;
use anyhow::{anyhow, Result};
use candle_core::Device;
use flowmatch_data::{Mnist, MnistSampler, Sampler};
use flowmatch_reflow::Stage;
use flowmatch_solvers::Method;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What a run trains and evaluates, ready to use: the checked plan (its model, path,
/// coupling, solvers, reflow chain … read through `Deref`) with its data and device.
#[derive(Clone)]
pub struct Experiment {
    pub plan: Plan,
    pub source: Arc<dyn Sampler>,
    pub target: Arc<dyn Sampler>,
    /// The MNIST digits when MNIST is the source or the target.
    pub mnist: Option<Arc<Mnist>>,
    pub device: Device,
    /// How the device was chosen, in words (`cpu`, `cuda:0 (auto: GPU found)`).
    pub device_label: String,
}

impl std::ops::Deref for Experiment {
    type Target = Plan;
    fn deref(&self) -> &Plan {
        &self.plan
    }
}

/// The MNIST folders read so far in this process (a sweep reads each once).
fn mnist(dir: &str) -> Result<Arc<Mnist>> {
    static READ: OnceLock<Mutex<HashMap<String, Arc<Mnist>>>> = OnceLock::new();
    let mut read = READ
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| anyhow!("the MNIST cache is poisoned"))?;
    if let Some(m) = read.get(dir) {
        return Ok(m.clone());
    }
    let m = Arc::new(Mnist::load(dir).map_err(|e| anyhow!("data.dir: {e}"))?);
    read.insert(dir.to_string(), m.clone());
    Ok(m)
}

impl Experiment {
    /// Reads the data and opens the device of a checked `plan` of `cfg`.
    pub fn build(cfg: &Config, plan: &Plan) -> Result<Experiment> {
        let (device, device_label) = device::open(cfg.device).map_err(|e| anyhow!(e))?;
        let mnist = if plan.images() {
            Some(mnist(&cfg.data.dir)?)
        } else {
            None
        };
        let sampler = |side: &DataSpec| -> Arc<dyn Sampler> {
            match (side, &mnist) {
                (DataSpec::Shape(d), _) => Arc::new(d.clone()),
                (DataSpec::Mnist, Some(m)) => Arc::new(MnistSampler(m.clone())),
                (DataSpec::Mnist, None) => unreachable!("MNIST is read for every MNIST side"),
            }
        };
        Ok(Experiment {
            source: sampler(&plan.source),
            target: sampler(&plan.target),
            plan: plan.clone(),
            mnist,
            device,
            device_label,
        })
    }

    /// The data dimension.
    pub fn dim(&self) -> usize {
        self.source.dim()
    }

    /// The reflow chain's students, in order (none without `[reflow]`).
    pub fn stages(&self) -> Vec<Stage> {
        self.reflow.stages(self.time)
    }
}

/// Euler step counts of the reflow table.
pub const REFLOW_STEPS: [usize; 5] = [1, 2, 5, 10, 100];

/// The config and experiment with the evaluation the reflow table needs: headline Euler 100,
/// Euler rows at 1, 2, 5, 10, 100 steps (added to whatever the config already evaluates).
/// The changed config goes through the same check as any other, and its plan replaces the
/// experiment's (the data and device stay as they were built).
pub fn with_reflow_eval(cfg: &Config, exp: &Experiment) -> Result<(Config, Experiment)> {
    let euler = TableMethod {
        method: Method::Euler,
        warped: false,
    };
    let mut c = cfg.clone();
    c.solver.method = Method::Euler;
    c.solver.steps = 100;
    c.solver.warp_s = None;
    if !c.eval.methods.contains(&euler) {
        c.eval.methods.insert(0, euler);
    }
    for s in REFLOW_STEPS {
        if !c.eval.steps.contains(&s) {
            c.eval.steps.push(s);
        }
    }
    c.eval.steps.sort_unstable();
    let plan = c.check().map_err(|(key, msg)| {
        anyhow::anyhow!("{key}: {msg} (with the reflow table's evaluation)")
    })?;
    let mut e = exp.clone();
    e.plan = plan;
    Ok((c, e))
}
