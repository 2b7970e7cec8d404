//! The one training step of flow matching, generic over path, coupling and time sampler.

use crate::adamw::AdamState;
use crate::ema::Ema;
use crate::lr::LrSchedule;
use crate::prefetch::Prefetcher;
use crate::FusedAdamW;
use crate::{Coupling, LossError, Objective, ProbabilityPath, TimeSampler};
use candle_core::Tensor;
use candle_nn::{Optimizer, ParamsAdamW};
use flowmatch_data::Rng;
use flowmatch_models::{label_tensor, Labeled, Model};
use std::collections::HashMap;

/// Optimiser settings (AdamW; `weight_decay = 0` is the seeds' Adam).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
}

impl OptimConfig {
    /// Checks a positive, finite learning rate and a non-negative weight decay.
    pub fn validate(&self) -> Result<(), LossError> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(LossError::setting(
                "lr",
                format!("must be a positive number, got {}", self.lr),
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(LossError::setting(
                "weight_decay",
                format!("must be ≥ 0, got {}", self.weight_decay),
            ));
        }
        Ok(())
    }
}

/// Checks a weight average's decay: in [0, 1) (0 = no average).
pub fn validate_ema(decay: f64) -> Result<(), LossError> {
    if (0.0..1.0).contains(&decay) {
        Ok(())
    } else {
        Err(LossError::setting(
            "ema",
            format!("decay must be in [0, 1), got {decay}"),
        ))
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// A model being trained: draws a batch from its coupling, a time per pair, forms the path
/// sample and takes one AdamW step on its objective (CFM unless [`Trainer::with_objective`]).
pub struct Trainer {
    model: Model,
    opt: FusedAdamW,
    /// The base learning rate and its schedule over the training.
    lr: f64,
    schedule: LrSchedule,
    path: Box<dyn ProbabilityPath>,
    coupling: Box<dyn Coupling>,
    time: TimeSampler,
    objective: Objective,
    batch: usize,
    steps_done: usize,
    ema: Option<Ema>,
    /// The worker pairing the next batch: with `with_prefetch(true)`, on CPU, for couplings
    /// with a pairing stage.
    prefetch: Option<Prefetcher>,
    /// With prefetch: the RNG as it stood before the next batch was drawn, i.e. as a serial
    /// run holds it after this step (what a checkpoint saves).
    serial_rng: Option<Rng>,
}

/// Everything a [`Trainer`] needs to continue exactly where it stopped, as named tensors
/// (`live/NAME`, `ema/NAME`, `adam_m/NAME`, `adam_v/NAME`) and two counters. The RNG is the
/// caller's: save [`Trainer::rng_to_save`].
#[derive(Debug)]
pub struct TrainerState {
    /// Optimisation steps taken.
    pub steps_done: usize,
    /// The optimiser's step count.
    pub adam_step: usize,
    /// Weights, weight average and moments by name.
    pub tensors: Vec<(String, Tensor)>,
}

impl Trainer {
    /// Sets up training of `model` with batches of `batch` pairs.
    pub fn new(
        model: Model,
        path: Box<dyn ProbabilityPath>,
        coupling: Box<dyn Coupling>,
        time: TimeSampler,
        batch: usize,
        optim: OptimConfig,
    ) -> Result<Self, LossError> {
        if batch == 0 {
            return Err(LossError::Invalid("batch size must be at least 1".into()));
        }
        if !(optim.lr > 0.0 && optim.lr.is_finite()) {
            return Err(LossError::Invalid(format!(
                "learning rate must be > 0, got {}",
                optim.lr
            )));
        }
        time.validate()?;
        let params = ParamsAdamW {
            lr: optim.lr,
            beta1: optim.beta1,
            beta2: optim.beta2,
            eps: optim.eps,
            weight_decay: optim.weight_decay,
        };
        let opt = FusedAdamW::new(model.params.vars(), params)?;
        Ok(Self {
            model,
            opt,
            lr: optim.lr,
            schedule: LrSchedule::CONSTANT,
            path,
            coupling,
            time,
            objective: Objective::Cfm,
            batch,
            steps_done: 0,
            ema: None,
            prefetch: None,
            serial_rng: None,
        })
    }

    /// Keeps an exponential moving average of the weights with `decay` ∈ (0, 1) (0 = none);
    /// [`Self::model`] and [`Self::into_model`] then give the averaged model.
    pub fn with_ema(mut self, decay: f64) -> Result<Self, LossError> {
        validate_ema(decay)?;
        self.ema = if decay > 0.0 {
            Some(Ema {
                decay,
                model: self.model.duplicate()?,
            })
        } else {
            None
        };
        Ok(self)
    }

    /// Moves the learning rate along `schedule` (warm-up, then constant or decaying to zero).
    pub fn with_lr_schedule(mut self, schedule: LrSchedule) -> Result<Self, LossError> {
        schedule.validate()?;
        self.schedule = schedule;
        Ok(self)
    }

    /// Trains on `objective`; MeanFlow and shortcut models need a model with a span input.
    pub fn with_objective(mut self, objective: Objective) -> Result<Self, LossError> {
        objective.validate()?;
        if objective.needs_span() && !self.model.spec.span() {
            return Err(LossError::Invalid(format!(
                "the {} objective needs a model with a span input",
                objective.name()
            )));
        }
        self.objective = objective;
        Ok(self)
    }

    /// Whether a worker thread pairs the next batch while this one trains ([`Self::with_prefetch`]).
    pub fn prefetches(&self) -> bool {
        self.prefetch.is_some()
    }

    /// Pairs the next batch on a second thread while the current step trains, for couplings
    /// with a pairing stage (OT, reflow's teacher) on CPU; otherwise a no-op. The random draws
    /// stay on the training thread in the same order, so the numbers are the same as without.
    pub fn with_prefetch(mut self, on: bool) -> Self {
        let cpu = self.model.params.device().is_cpu();
        self.prefetch = match self.coupling.pairing() {
            Some(pairing) if on && cpu => Some(Prefetcher::new(pairing)),
            _ => None,
        };
        self
    }

    /// One optimisation step; returns the loss before the update. A non-finite loss is an
    /// error and leaves the weights untouched.
    pub fn step(&mut self, rng: &mut Rng) -> Result<f32, LossError> {
        let loss = self.loss(rng)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(LossError::NonFiniteLoss(value, self.steps_done + 1));
        }
        self.update(&loss)?;
        Ok(value)
    }

    /// One optimisation step that does not read the loss back: returns it as a detached
    /// scalar on the model's device, so that a GPU runs on without waiting for the host.
    /// Read such losses in batches with [`read_losses`], which checks them: a non-finite loss
    /// shows there, after the update it fed. On the CPU the weights are the same bits as
    /// [`Self::step`]'s (tested).
    pub fn step_deferred(&mut self, rng: &mut Rng) -> Result<Tensor, LossError> {
        let loss = self.loss(rng)?;
        self.update(&loss)?;
        Ok(loss.detach())
    }

    /// This step's batch, times and path sample, and the objective's loss on them.
    fn loss(&mut self, rng: &mut Rng) -> Result<Tensor, LossError> {
        let device = self.model.params.device().clone();
        let ready = self.prefetch.as_mut().and_then(Prefetcher::take);
        let (x0, x1, y) = match ready {
            Some(pairs) => pairs?,
            None => self.coupling.sample_labeled(self.batch, rng, &device)?,
        };
        let draws = self.objective.draw(self.batch, &self.time, rng);
        let p = self.path.sample(&x0, &x1, &draws.t, rng)?;
        // This step's random draws are done: the next batch's come now, in the order a serial
        // run takes them, and its pairing runs beside this step's forward and backward pass.
        if let Some(worker) = self.prefetch.as_mut() {
            self.serial_rng = Some(rng.clone());
            worker.start(self.coupling.draw(self.batch, rng, &device)?)?;
        }
        Ok(match y {
            // A conditional model regresses on its labels' velocity.
            Some(y) => {
                let field = Labeled::new(&self.model, label_tensor(&y, &device)?);
                self.objective.loss(&field, &p, &draws)?
            }
            None => self.objective.loss(&self.model, &p, &draws)?,
        })
    }

    /// The optimiser's step on `loss` at this step's learning rate, then the weight average.
    fn update(&mut self, loss: &Tensor) -> Result<(), LossError> {
        self.opt
            .set_learning_rate(self.lr * self.schedule.factor(self.steps_done));
        self.opt.backward_step(loss)?;
        if let Some(ema) = &self.ema {
            ema.update(&self.model)?;
        }
        self.steps_done += 1;
        Ok(())
    }

    /// The learning rate of the last step taken (the base rate before the first).
    pub fn lr(&self) -> f64 {
        self.opt.learning_rate()
    }

    /// The coupling's warning about the batches paired so far ([`Coupling::report`]).
    pub fn coupling_report(&self) -> Option<String> {
        self.coupling.report()
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// The model being trained (its weight average, with EMA).
    pub fn model(&self) -> &Model {
        self.ema.as_ref().map_or(&self.model, |e| &e.model)
    }

    /// The RNG to checkpoint after a step: `rng` as a serial run would hold it. With
    /// prefetch, `rng` has already drawn the next batch; a resumed run draws it again.
    pub fn rng_to_save(&self, rng: &Rng) -> Rng {
        match (&self.prefetch, &self.serial_rng) {
            (Some(_), Some(before)) => before.clone(),
            _ => rng.clone(),
        }
    }

    /// A copy of the training state (weights, weight average, optimiser, step count).
    pub fn state(&self) -> Result<TrainerState, LossError> {
        let mut tensors = vec![];
        let live = self.model.params.named_vars();
        for (name, var) in &live {
            tensors.push((format!("live/{name}"), var.as_tensor().copy()?));
        }
        if let Some(ema) = &self.ema {
            for (name, var) in ema.model.params.named_vars() {
                tensors.push((format!("ema/{name}"), var.as_tensor().copy()?));
            }
        }
        let adam = self.opt.state()?;
        for ((name, _), (m, v)) in live.iter().zip(adam.moments) {
            tensors.push((format!("adam_m/{name}"), m));
            tensors.push((format!("adam_v/{name}"), v));
        }
        Ok(TrainerState {
            steps_done: self.steps_done,
            adam_step: adam.step_t,
            tensors,
        })
    }

    /// Puts back a state taken by [`Self::state`] from a trainer of the same model (and the
    /// same EMA setting); an error names what does not fit.
    pub fn restore(&mut self, state: &TrainerState) -> Result<(), LossError> {
        let by_name: HashMap<&str, &Tensor> =
            state.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let get = |key: String| -> Result<&Tensor, LossError> {
            by_name
                .get(key.as_str())
                .copied()
                .ok_or_else(|| LossError::Invalid(format!("training state has no '{key}'")))
        };
        let set = |var: &candle_core::Var, t: &Tensor, key: &str| -> Result<(), LossError> {
            if t.dims() != var.dims() {
                return Err(LossError::Invalid(format!(
                    "training state '{key}' has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
            Ok(())
        };
        let live = self.model.params.named_vars();
        let mut moments = vec![];
        for (name, var) in &live {
            set(var, get(format!("live/{name}"))?, name)?;
            moments.push((
                get(format!("adam_m/{name}"))?.clone(),
                get(format!("adam_v/{name}"))?.clone(),
            ));
        }
        if let Some(ema) = &self.ema {
            for (name, var) in ema.model.params.named_vars() {
                set(&var, get(format!("ema/{name}"))?, &name)?;
            }
        } else if state.tensors.iter().any(|(n, _)| n.starts_with("ema/")) {
            return Err(LossError::Invalid(
                "training state holds a weight average but this run keeps none".into(),
            ));
        }
        self.opt.restore(&AdamState {
            step_t: state.adam_step,
            moments,
        })?;
        self.steps_done = state.steps_done;
        self.serial_rng = None;
        Ok(())
    }

    /// Ends training and hands back the model (its weight average, with EMA).
    pub fn into_model(self) -> Model {
        match self.ema {
            Some(e) => e.model,
            None => self.model,
        }
    }
}

/// Reads the losses of [`Trainer::step_deferred`], of consecutive steps from `first_step` on,
/// in one transfer: their values in order, or the first non-finite one as
/// [`LossError::NonFiniteLoss`] with its step.
pub fn read_losses(losses: &[Tensor], first_step: usize) -> Result<Vec<f32>, LossError> {
    if losses.is_empty() {
        return Ok(vec![]);
    }
    let values = Tensor::stack(losses, 0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(LossError::NonFiniteLoss(values[i], first_step + i)),
        None => Ok(values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AffinePath, Independent, MinibatchOt, Objective, Schedule};
    use candle_core::Device;
    use flowmatch_data::{rng_from_seed, Distribution, Sampler};
    use flowmatch_metrics::w2;
    use flowmatch_models::{activation::Activation, ModelSpec};
    use flowmatch_solvers::{solve, Method, SolverSpec};
    use std::sync::Arc;

    /// W2 between `steps` Euler steps of `model` from 400 Gaussian points and 400 moons.
    fn w2_at_euler(model: &Model, steps: usize, seed: u64) -> f64 {
        let mut rng = rng_from_seed(seed);
        let n = 400;
        let x0 = Distribution::from_name("gaussian")
            .unwrap()
            .sample(n, &mut rng, &Device::Cpu)
            .unwrap();
        let real = Distribution::from_name("moons")
            .unwrap()
            .sample(n, &mut rng, &Device::Cpu)
            .unwrap();
        let gen = solve(model, &x0, &SolverSpec::new(Method::Euler, steps), false)
            .unwrap()
            .x;
        w2(&gen, &real).unwrap()
    }

    fn trainer(ot: bool) -> Trainer {
        trainer_sigma(ot, 0.0)
    }

    #[test]
    fn a_conditional_model_trains_with_every_objective() {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let m: Arc<dyn Sampler> = Arc::new(Distribution::from_name("8gaussians").unwrap());
        let objectives = [
            Objective::Cfm,
            Objective::MeanFlow {
                span_fraction: 0.25,
                adaptive_p: 1.0,
            },
            Objective::Shortcut {
                bootstrap_fraction: 0.25,
                max_steps: 8,
            },
        ];
        for objective in objectives {
            let labels = crate::LabelDraw {
                classes: 8,
                drop: 0.1,
            };
            let coupling =
                crate::CouplingSpec::Independent.build(g.clone(), m.clone(), Some(labels));
            let model = ModelSpec::VelocityMlp {
                hidden: 32,
                layers: 2,
                activation: Activation::Silu,
                span: objective.needs_span(),
                score: false,
                classes: 8,
            }
            .build(2, 0, &Device::Cpu)
            .unwrap();
            let path = Box::new(AffinePath::new(Schedule::Linear, 0.0).unwrap());
            let mut t = Trainer::new(
                model,
                path,
                coupling,
                TimeSampler::Uniform,
                64,
                OptimConfig::default(),
            )
            .unwrap()
            .with_objective(objective)
            .unwrap();
            let mut rng = rng_from_seed(0);
            for _ in 0..3 {
                let loss = t.step(&mut rng).unwrap();
                assert!(loss.is_finite(), "{objective:?}");
            }
        }
    }

    fn trainer_sigma(ot: bool, sigma: f64) -> Trainer {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let m: Arc<dyn Sampler> = Arc::new(Distribution::from_name("moons").unwrap());
        let coupling: Box<dyn Coupling> = if ot {
            Box::new(MinibatchOt::new(g, m))
        } else {
            Box::new(Independent::new(g, m))
        };
        let model = ModelSpec::VelocityMlp {
            hidden: 64,
            layers: 2,
            activation: Activation::Silu,
            span: false,
            score: false,
            classes: 0,
        }
        .build(2, 0, &Device::Cpu)
        .unwrap();
        let path = Box::new(AffinePath::new(Schedule::Linear, sigma).unwrap());
        let optim = OptimConfig {
            lr: 3e-3,
            ..Default::default()
        };
        Trainer::new(model, path, coupling, TimeSampler::Uniform, 256, optim).unwrap()
    }

    #[test]
    fn short_training_on_gaussian_to_moons_halves_w2() {
        for ot in [false, true] {
            let mut tr = trainer(ot);
            let before = w2_at_euler(tr.model(), 100, 11);
            let mut rng = rng_from_seed(5);
            let mut losses = vec![];
            for _ in 0..600 {
                losses.push(tr.step(&mut rng).unwrap());
            }
            let after = w2_at_euler(tr.model(), 100, 11);
            assert!(after < 0.5 * before, "ot={ot}: W2 {before} -> {after}");
            let head: f32 = losses[..50].iter().sum::<f32>() / 50.0;
            let tail: f32 = losses[550..].iter().sum::<f32>() / 50.0;
            assert!(tail < head, "ot={ot}: loss {head} -> {tail}");
        }
    }

    #[test]
    fn the_schedule_sets_each_steps_learning_rate() {
        let schedule = crate::LrSchedule {
            decay: crate::LrDecay::Cosine,
            warmup: 2,
            total: 10,
        };
        let mut tr = trainer(false).with_lr_schedule(schedule).unwrap();
        let mut rng = rng_from_seed(1);
        let mut rates = vec![];
        for _ in 0..10 {
            tr.step(&mut rng).unwrap();
            rates.push(tr.lr());
        }
        let base = 3e-3;
        assert!((rates[0] - 0.5 * base).abs() < 1e-15, "{rates:?}");
        assert!((rates[1] - base).abs() < 1e-15 && (rates[2] - base).abs() < 1e-15);
        assert!(rates.windows(2).skip(2).all(|w| w[1] < w[0]), "{rates:?}");
        assert!(rates[9] < 0.05 * base, "{rates:?}");
        let constant = trainer(false);
        assert_eq!(constant.lr(), base);
    }

    #[test]
    fn meanflow_and_shortcut_trainings_cut_the_one_step_w2() {
        // One Euler step of size 1 is the model's jump u(x0, 0, 1): a short training must
        // bring it far closer to the moons than I-CFM's one step, which lands on the mean.
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let m: Arc<dyn Sampler> = Arc::new(Distribution::from_name("moons").unwrap());
        let run = |objective: Objective| {
            let spec = ModelSpec::VelocityMlp {
                hidden: 64,
                layers: 2,
                activation: Activation::Silu,
                span: objective.needs_span(),
                score: false,
                classes: 0,
            };
            let model = spec.build(2, 0, &Device::Cpu).unwrap();
            let path = Box::new(AffinePath::new(Schedule::Linear, 0.0).unwrap());
            let optim = OptimConfig {
                lr: 3e-3,
                ..Default::default()
            };
            let coupling = Box::new(Independent::new(g.clone(), m.clone()));
            let mut tr = Trainer::new(model, path, coupling, TimeSampler::Uniform, 256, optim)
                .unwrap()
                .with_objective(objective)
                .unwrap();
            let mut rng = rng_from_seed(5);
            for _ in 0..800 {
                tr.step(&mut rng).unwrap();
            }
            w2_at_euler(tr.model(), 1, 11)
        };
        let cfm = run(Objective::Cfm);
        let meanflow = run(Objective::MeanFlow {
            span_fraction: 0.5,
            adaptive_p: 1.0,
        });
        let shortcut = run(Objective::Shortcut {
            bootstrap_fraction: 0.25,
            max_steps: 32,
        });
        assert!(
            meanflow < 0.75 * cfm,
            "MeanFlow 1-step W2 {meanflow} vs I-CFM {cfm}"
        );
        assert!(
            shortcut < 0.75 * cfm,
            "shortcut 1-step W2 {shortcut} vs I-CFM {cfm}"
        );
        // A flow model cannot train on an objective that needs the span input.
        assert!(small_flow_trainer(8)
            .unwrap()
            .with_objective(Objective::Shortcut {
                bootstrap_fraction: 0.25,
                max_steps: 8
            })
            .is_err());
    }

    #[test]
    fn same_seed_gives_identical_losses_with_or_without_prefetch() {
        // σ > 0: the path draws noise too, after the times, before the next batch.
        let run = |prefetch: bool| {
            let mut tr = trainer_sigma(true, 0.1).with_prefetch(prefetch);
            let mut rng = rng_from_seed(9);
            (0..8)
                .map(|_| tr.step(&mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        let serial = run(false);
        assert_eq!(serial, run(false));
        assert_eq!(serial, run(true));
        // With prefetch, a step leaves the next batch pairing on the other thread; the
        // independent coupling has nothing to pair.
        let mut rng = rng_from_seed(10);
        let mut tr = trainer_sigma(true, 0.1).with_prefetch(true);
        tr.step(&mut rng).unwrap();
        assert!(tr.prefetch.as_ref().is_some_and(Prefetcher::pending));
        let mut tr = trainer_sigma(false, 0.1).with_prefetch(true);
        tr.step(&mut rng).unwrap();
        assert!(!tr.prefetch.as_ref().is_some_and(Prefetcher::pending));
    }

    #[test]
    fn deferred_steps_give_the_same_bits_and_read_their_losses_in_one_go() {
        // OT, path noise and EMA: the deferred step takes the same draws and updates.
        let make = || trainer_sigma(true, 0.1).with_ema(0.9).unwrap();
        let (mut plain, mut deferred) = (make(), make());
        let (mut r1, mut r2) = (rng_from_seed(5), rng_from_seed(5));
        let want: Vec<f32> = (0..6).map(|_| plain.step(&mut r1).unwrap()).collect();
        let pending: Vec<Tensor> = (0..6)
            .map(|_| deferred.step_deferred(&mut r2).unwrap())
            .collect();
        assert_eq!(read_losses(&pending, 1).unwrap(), want);
        assert_eq!(deferred.steps_done(), 6);
        assert_eq!(flat_weights(plain.model()), flat_weights(deferred.model()));
        assert!(read_losses(&[], 1).unwrap().is_empty());
        // A non-finite loss is named with its step.
        let dev = Device::Cpu;
        let bad = [
            Tensor::new(1.5f32, &dev).unwrap(),
            Tensor::new(f32::NAN, &dev).unwrap(),
            Tensor::new(f32::INFINITY, &dev).unwrap(),
        ];
        match read_losses(&bad, 7) {
            Err(LossError::NonFiniteLoss(v, 8)) => assert!(v.is_nan()),
            other => panic!("expected the NaN of step 8, got {other:?}"),
        }
    }

    fn flat_weights(m: &Model) -> Vec<f32> {
        m.params
            .vars()
            .iter()
            .flat_map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_trainer_restored_from_its_state_continues_with_the_same_numbers() {
        // OT with the next batch prefetched, path noise and EMA: every piece of state counts.
        for (ot, prefetch, ema) in [(true, true, 0.9), (false, false, 0.0), (true, false, 0.5)] {
            let make = || {
                trainer_sigma(ot, 0.1)
                    .with_ema(ema)
                    .unwrap()
                    .with_prefetch(prefetch)
            };
            let mut whole = make();
            let mut rng = rng_from_seed(3);
            let all: Vec<f32> = (0..10).map(|_| whole.step(&mut rng).unwrap()).collect();

            let mut first = make();
            let mut rng = rng_from_seed(3);
            for _ in 0..4 {
                first.step(&mut rng).unwrap();
            }
            let state = first.state().unwrap();
            let mut rng = first.rng_to_save(&rng);
            drop(first);
            let mut second = make();
            second.restore(&state).unwrap();
            let rest: Vec<f32> = (0..6).map(|_| second.step(&mut rng).unwrap()).collect();
            let case = format!("ot={ot} prefetch={prefetch} ema={ema}");
            assert_eq!(&all[4..], &rest[..], "{case}");
            assert_eq!(second.steps_done(), 10, "{case}");
            assert_eq!(
                flat_weights(whole.model()),
                flat_weights(second.model()),
                "{case}"
            );
            // A state without the weight average does not fit a trainer that keeps one.
            if ema > 0.0 {
                let mut plain = trainer_sigma(ot, 0.1);
                assert!(plain.restore(&state).is_err());
            }
        }
    }

    #[test]
    fn ema_follows_its_recursion_over_the_plain_run() {
        let flat = flat_weights;
        let mut plain = trainer(false);
        let mut avg = trainer(false).with_ema(0.8).unwrap();
        let mut expected = flat(plain.model());
        let (mut r1, mut r2) = (rng_from_seed(4), rng_from_seed(4));
        for _ in 0..3 {
            // Same seed, same batches: the live weights of `avg` are those of `plain`.
            assert_eq!(plain.step(&mut r1).unwrap(), avg.step(&mut r2).unwrap());
            for (e, w) in expected.iter_mut().zip(flat(plain.model())) {
                *e = 0.8 * *e + 0.2 * w;
            }
            let got = flat(avg.model());
            let d = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-6, "EMA off its recursion by {d}");
            assert_ne!(got, flat(plain.model()));
        }
        assert!(trainer(false).with_ema(1.0).is_err());
        assert!(trainer(false).with_ema(-0.1).is_err());
    }

    /// A small flow (no span input) on Gaussian → Gaussian with batches of `batch`.
    fn small_flow_trainer(batch: usize) -> Result<Trainer, LossError> {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let model = ModelSpec::VelocityNet {
            hidden: 8,
            activation: Activation::Gelu,
            span: false,
            score: false,
            classes: 0,
        }
        .build(2, 0, &Device::Cpu)
        .unwrap();
        let path = Box::new(AffinePath::new(Schedule::Linear, 0.0).unwrap());
        Trainer::new(
            model,
            path,
            Box::new(Independent::new(g.clone(), g)),
            TimeSampler::Uniform,
            batch,
            OptimConfig::default(),
        )
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(matches!(small_flow_trainer(0), Err(LossError::Invalid(_))));
    }
}
