//! An experiment, built once from its checked [`Plan`]: the samplers (MNIST read once per
//! process), the device, the model spec, the coupling, and the train and eval settings. Runs,
//! reflow stages and sweep runs read it; nothing in it is checked or loaded again.

use crate::check::{DataSpec, Plan};
use crate::device;
use anyhow::{anyhow, Result};
use candle_core::Device;
use flowmatch_data::{Mnist, MnistSampler, Sampler};
use flowmatch_reflow::Stage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
fn mnist(dir: &Path) -> Result<Arc<Mnist>> {
    static READ: OnceLock<Mutex<HashMap<PathBuf, Arc<Mnist>>>> = OnceLock::new();
    let mut read = READ
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| anyhow!("the MNIST cache is poisoned"))?;
    if let Some(m) = read.get(dir) {
        return Ok(m.clone());
    }
    let m = Arc::new(Mnist::load(&dir.to_string_lossy()).map_err(|e| anyhow!("data.dir: {e}"))?);
    read.insert(dir.to_path_buf(), m.clone());
    Ok(m)
}

impl Experiment {
    /// Reads the data and opens the device of a checked `plan`.
    pub fn build(plan: &Plan) -> Result<Experiment> {
        let (device, device_label) =
            device::open_with(plan.device, plan.tf32).map_err(|e| anyhow!(e))?;
        let mnist = if plan.images() {
            Some(mnist(&plan.data_dir)?)
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

    /// This experiment's data and device under a plan derived from its own (a reflow stage,
    /// the reflow table's evaluation).
    pub fn with_plan(&self, plan: Plan) -> Experiment {
        Experiment {
            plan,
            ..self.clone()
        }
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

/// The experiment with the evaluation the reflow table needs ([`Plan::with_reflow_eval`]);
/// the data and device stay as they were built.
pub fn with_reflow_eval(exp: &Experiment) -> Result<Experiment> {
    Ok(exp.with_plan(exp.plan.with_reflow_eval(&REFLOW_STEPS)?))
}
