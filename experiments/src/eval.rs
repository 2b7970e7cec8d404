//! Evaluation: the samples every evaluation of a run compares against, and the metrics of a
//! model under the headline solver and every entry of the eval table.

use crate::check::NllSpec;
use crate::config::{Config, TableMethod};
use crate::experiment::Experiment;
use crate::logging::RunLog;
use crate::report::{Evaluation, Nll, ProgressRow, Solver, TableRow};
use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use flowmatch_data::rng_from_seed;
use flowmatch_metrics as metrics;
use flowmatch_models::{Guided, VelocityField};
use flowmatch_solvers::{log_likelihood, sample_sde, solve, Divergence, SolverSpec};
use serde_json::json;

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
    /// The evaluation's source samples (on `device`) and real samples (on the CPU), drawn in
    /// that order from `eval.seed`: the same for every evaluation of a run (and for the
    /// samples figure of `flowmatch plot SWEEP --what samples`).
    pub fn samples(checked: &Experiment, device: &Device) -> Result<(Tensor, Tensor)> {
        let (n, seed) = (checked.eval.samples, checked.eval.seed);
        let mut rng = rng_from_seed(seed);
        let x0 = checked.source.sample(n, &mut rng, device)?;
        let real = checked.target.sample(n, &mut rng, &Device::Cpu)?;
        Ok((x0, real))
    }

    /// Draws the samples ([`Self::samples`]) and loads the scorer.
    pub fn draw(checked: &Experiment, device: &Device) -> Result<Self> {
        let (x0, real) = Self::samples(checked, device)?;
        let scorer = match &checked.classifier {
            Some(p) => {
                // A second real sample of the same size, from its own seed (the draws above
                // stay as they were).
                let mut rng = rng_from_seed(checked.eval.seed ^ 0xf1d_4ea1);
                let other = checked
                    .target
                    .sample(checked.eval.samples, &mut rng, &Device::Cpu)?;
                Some(crate::images::FidScorer::new(p, &real, &other)?)
            }
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
    pub fn progress(
        &self,
        field: &dyn VelocityField,
        solver: &SolverSpec,
        guidance: f64,
        step: usize,
    ) -> Result<ProgressRow> {
        let gen = solve(
            sampling_field(field, guidance).as_ref(),
            &self.x0,
            solver,
            false,
        )?
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

/// The field the solvers integrate: a conditional model guided at scale `w` towards labels
/// balanced over its classes (row `i` asks for class `i mod K`); any other field as it is.
pub fn sampling_field<'a>(field: &'a dyn VelocityField, w: f64) -> Box<dyn VelocityField + 'a> {
    if field.classes() > 0 {
        Box::new(Guided::balanced(field, w))
    } else {
        Box::new(field)
    }
}

/// The class scores of a conditional model on a labelled 2-D target, where the rule that
/// generated the data decides a point's class: the headline samples' class accuracy and
/// per-class W2 (averaged over the classes), the class accuracy at 1 Euler step, and W2 and
/// class accuracy at each of `eval.guidance`'s scales. For digits, the FID classifier decides,
/// and per-class FID-like (with its real-digit floor) takes per-class W2's place. Empty
/// otherwise.
fn class_scores(
    checked: &Experiment,
    model: &dyn VelocityField,
    gen: &Tensor,
    entries: &[Entry],
    set: &EvalSet,
    solver: &SolverSpec,
) -> Result<std::collections::BTreeMap<String, f64>> {
    let mut out = std::collections::BTreeMap::new();
    let Some(labels) = checked.labels else {
        return Ok(out);
    };
    let k = labels.classes;
    // Who decides a sample's class: the generating rule (2-D), or the FID classifier.
    let shape = match &checked.plan.target {
        crate::check::DataSpec::Shape(d) => Some(d),
        crate::check::DataSpec::Mnist => None,
    };
    let classes_of = |x: &Tensor| -> Result<Vec<Option<u32>>> {
        match (shape, &set.scorer) {
            (Some(d), _) => Ok(x.to_vec2::<f32>()?.iter().map(|p| d.class_of(p)).collect()),
            (None, Some(s)) => Ok(s.predict(x)?.into_iter().map(Some).collect()),
            (None, None) => Ok(vec![None; x.dim(0)?]),
        }
    };
    if shape.is_none() && set.scorer.is_none() {
        return Ok(out);
    }
    let accuracy = |x: &Tensor| -> Result<f64> {
        let c = classes_of(x)?;
        let hit = c
            .iter()
            .enumerate()
            .filter(|(i, c)| **c == Some((i % k) as u32));
        Ok(hit.count() as f64 / c.len().max(1) as f64)
    };
    // Per-class W2 (2-D): the samples asked for class c against the real points of class c,
    // averaged over the classes.
    let real_class = classes_of(&set.real)?;
    let pick = |x: &Tensor, keep: &dyn Fn(usize) -> bool| -> Result<Tensor> {
        let idx: Vec<u32> = (0..x.dim(0)?)
            .filter(|&i| keep(i))
            .map(|i| i as u32)
            .collect();
        Ok(x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?)
    };
    let class_w2 = |x: &Tensor| -> Result<Option<f64>> {
        let mut w2s = vec![];
        for c in (0..k as u32).filter(|_| shape.is_some()) {
            let g = pick(x, &|i| i % k == c as usize)?;
            let r = pick(&set.real, &|i| real_class[i] == Some(c))?;
            // Exact W2 pairs equal counts: the first min(|g|, |r|) of each.
            let m = g.dim(0)?.min(r.dim(0)?);
            if m > 0 {
                w2s.push(metrics::w2(&g.narrow(0, 0, m)?, &r.narrow(0, 0, m)?)?);
            }
        }
        Ok((!w2s.is_empty()).then(|| w2s.iter().sum::<f64>() / w2s.len() as f64))
    };
    // Per-class FID-like (images): the same per class, in the classifier's features.
    let class_fid = |x: &Tensor| -> Result<Option<f64>> {
        match &set.scorer {
            Some(s) if shape.is_none() => s.class_fid(x, &|i| (i % k) as u32),
            _ => Ok(None),
        }
    };
    out.insert("class_accuracy".into(), accuracy(gen)?);
    if let Some(w) = class_w2(gen)? {
        out.insert("class_w2".into(), w);
    }
    if let Some(f) = class_fid(gen)? {
        out.insert("class_fid".into(), f);
    }
    if let Some(f) = set.scorer.as_ref().and_then(|s| s.class_fid_real()) {
        out.insert("class_fid_real".into(), f);
    }
    if let Some(e) = entries.iter().find(|e| e.0 == Solver::EULER && e.1 == 1) {
        out.insert("class_accuracy_euler_1".into(), accuracy(&e.3)?);
        if let Some(w) = class_w2(&e.3)? {
            out.insert("class_w2_euler_1".into(), w);
        }
    }
    for &w in &checked.guidance_rows {
        crate::signals::check("evaluation (guidance)")?;
        let g = Guided::balanced(model, w);
        let x = solve(&g, &set.x0, solver, false)?
            .x
            .to_device(&Device::Cpu)?;
        out.insert(format!("w2_guidance_{w}"), metrics::w2(&x, &set.real)?);
        out.insert(format!("class_accuracy_guidance_{w}"), accuracy(&x)?);
        if let Some(fid) = set.fid(&x)? {
            out.insert(format!("fid_guidance_{w}"), fid);
        }
        if let Some(f) = class_fid(&x)? {
            out.insert(format!("class_fid_guidance_{w}"), f);
        }
    }
    Ok(out)
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
    for (name, v) in &ev.extra {
        log.scalar(&format!("eval/{name}"), *v, step);
    }
    Ok(())
}

/// Evaluates `field` with the headline `solver` and every table entry, on fresh samples drawn
/// from `eval.seed` (the same samples for every run of a sweep).
pub fn evaluate(
    field: &dyn VelocityField,
    checked: &Experiment,
    solver: &SolverSpec,
    device: &Device,
) -> Result<Evaluation> {
    evaluate_on(&EvalSet::draw(checked, device)?, field, checked, solver)
}

/// [`evaluate`] on samples already drawn.
pub fn evaluate_on(
    set: &EvalSet,
    field: &dyn VelocityField,
    checked: &Experiment,
    solver: &SolverSpec,
) -> Result<Evaluation> {
    let ev = &checked.eval;
    let (x0, real, bw) = (&set.x0, &set.real, set.bandwidth);
    let stop = || crate::signals::check("evaluation");
    stop()?;
    let model = field;
    let guided = sampling_field(field, checked.guidance);
    let field = guided.as_ref();
    let sol = solve(field, x0, solver, true)?;
    let traj: Vec<Tensor> = sol.trajectory.clone().unwrap_or_default();
    let gen = sol.x.to_device(&Device::Cpu)?;
    // Every table entry's samples first; then their exact W2, each solve warm-started from
    // the last one against the same real sample (metrics::Reference).
    let mut entries: Vec<Entry> = vec![];
    for TableMethod { method, warped } in &checked.table {
        for &steps in &ev.steps {
            let mut spec = SolverSpec::new(*method, steps);
            spec.tol = solver.tol;
            if *warped {
                spec = spec.warped(ev.warp_s);
            }
            // The headline solver's own entry: its samples are already there.
            if spec == *solver {
                entries.push((Solver::from(&spec), steps, sol.nfe, gen.clone()));
                continue;
            }
            stop()?;
            let s = solve(field, x0, &spec, false)?;
            entries.push((
                Solver::from(&spec),
                steps,
                s.nfe,
                s.x.to_device(&Device::Cpu)?,
            ));
        }
    }
    // Stochastic rows: Euler–Maruyama from the same source samples, noise from eval.seed.
    if let Some(score) = checked.sde_score {
        let mut rng = rng_from_seed(ev.seed ^ SDE_SEED);
        for g in &checked.sde {
            stop()?;
            let x = sample_sde(field, x0, checked.sde_steps, *g, score, &mut rng)?;
            let n = checked.sde_steps;
            entries.push((Solver::Sde(*g), n, n, x.to_device(&Device::Cpu)?));
        }
    }
    stop()?;
    let (w2_gen, w2_st, w2_table, reference) = exact_w2(&entries, &gen, x0, real)?;
    let mut mmd = reference;
    let mut table = vec![];
    for ((label, steps, nfe, g), w2) in entries.iter().zip(w2_table) {
        table.push(TableRow {
            solver: *label,
            steps: *steps,
            nfe: *nfe,
            w2,
            mmd: mmd.mmd(g, bw)?,
            fid: set.fid(g)?,
        });
    }
    // The opt-in metrics of the registry, on the headline samples.
    let mut extra = class_scores(checked, model, &gen, &entries, set, solver)?;
    for m in &checked.metrics {
        if let Some(measure) = m.measure {
            stop()?;
            extra.insert(m.name.to_string(), measure(&gen, real)?);
        }
    }
    Ok(Evaluation {
        extra,
        solver: Solver::from(solver),
        solver_steps: solver.steps,
        nfe: sol.nfe,
        w2: w2_gen,
        mmd: mmd.mmd(&gen, bw)?,
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
        nll: match (&checked.nll, checked.source_std) {
            // A conditional model's likelihood is its unconditional flow's (w = 0).
            (Some(spec), Some(std)) => Some(negative_log_likelihood(
                sampling_field(model, 0.0).as_ref(),
                real,
                x0.device(),
                spec,
                std,
                ev.seed,
            )?),
            _ => None,
        },
    })
}

/// An eval file: the evaluation and the resolved config it was made with.
#[derive(serde::Serialize)]
struct EvalFile<'a> {
    #[serde(flatten)]
    eval: &'a Evaluation,
    /// The resolved config (TOML), to tell whether a later eval of the same name differs.
    config: String,
}

/// `flowmatch eval RUN_DIR`: evaluates a finished run (its lock held meanwhile) with its
/// config and `sets` into `RUN_DIR/eval-SOLVER-STEPS.json`; a file of that name made with
/// other settings is kept unless `redo`. Returns the evaluation and the file.
pub fn eval_file(
    run_dir: &std::path::Path,
    sets: &[crate::config::Override],
    redo: bool,
) -> Result<(Evaluation, std::path::PathBuf)> {
    let run = crate::folder::open_run(run_dir, sets)?;
    let (_lock, model, checked) = (run.lock, run.model, run.exp);
    let dev = checked.device.clone();
    let out = run_dir.join(format!(
        "eval-{}-{}.json",
        checked.solver.label(),
        checked.solver.steps
    ));
    if out.is_file() && !redo {
        // The same name made with other settings is kept unless asked.
        let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)
            .with_context(|| format!("reading {}", out.display()))?;
        let diffs = match old.get("config").and_then(|c| c.as_str()) {
            Some(text) => Config::from_resolved_toml(text)
                .map_err(|e| anyhow!("{}: {}", out.display(), e.0))?
                .differences(checked.config()),
            None => vec!["(its settings were not recorded)".to_string()],
        };
        if !diffs.is_empty() {
            return Err(anyhow!(
                "{} was made with other settings: {}; rerun with --redo-changed to overwrite it",
                out.display(),
                crate::config::describe_differences(&diffs)
            ));
        }
    }
    let ev = evaluate(&model, &checked, &checked.solver, &dev)?;
    crate::logging::write_json(
        &out,
        &EvalFile {
            eval: &ev,
            config: checked.config_toml(),
        },
    )?;
    Ok((ev, out))
}

/// An evaluation's sample: its sampler, steps, NFE and the points (on the CPU).
type Entry = (Solver, usize, usize, Tensor);

/// The exact W2 of the headline samples `gen`, of the source sample `x0` (the source-target
/// distance) and of every table entry against `real`, and the reference (for the MMDs).
fn exact_w2(
    entries: &[Entry],
    gen: &Tensor,
    x0: &Tensor,
    real: &Tensor,
) -> Result<(f64, f64, Vec<f64>, metrics::Reference)> {
    // Exact W2 on two threads, each a chain of warm-started solves. The sample of the fewest
    // steps is the hardest to pair (a cold solve of the lesson's 1-step sample takes as long
    // as the rest together) and far from the others: it goes alone. The other chain runs
    // from the headline down through the table's step counts to the source sample itself.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(entries[k].1));
    let fewest = order.pop();
    let x0_cpu = x0.to_device(&Device::Cpu)?;
    let reference = metrics::Reference::new(real)?;
    let chain = |samples: Vec<&Tensor>| -> Result<Vec<f64>> {
        let mut r = reference.clone();
        samples.into_iter().map(|g| Ok(r.w2(g)?)).collect()
    };
    let down: Vec<&Tensor> = std::iter::once(gen)
        .chain(order.iter().map(|&k| &entries[k].3))
        .chain(std::iter::once(&x0_cpu))
        .collect();
    let up: Vec<&Tensor> = fewest.iter().map(|&k| &entries[k].3).collect();
    // A second thread where the run has the machine to itself (a sweep's worker leaves the
    // other cores to the other runs); the values do not depend on it.
    let spare = std::thread::available_parallelism().map_or(1, |n| n.get()) > 1
        && rayon::current_thread_index().is_none();
    let (a, b) = if spare {
        std::thread::scope(|s| {
            let other = s.spawn(|| chain(up));
            let a = chain(down);
            (
                a,
                other
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("W2 thread panicked"))),
            )
        })
    } else {
        (chain(down), chain(up))
    };
    let (mut a, b) = (a?, b?);
    let w2_st = a.pop().unwrap_or(f64::NAN);
    let mut w2_table = vec![f64::NAN; entries.len()];
    for (&k, &w) in order.iter().chain(&fewest).zip(a[1..].iter().chain(&b)) {
        w2_table[k] = w;
    }
    Ok((a[0], w2_st, w2_table, reference))
}

/// Seeds of the stochastic rows' noise and the Hutchinson probes (with `eval.seed`).
const SDE_SEED: u64 = 0x5de0_0000_0000;
const NLL_SEED: u64 = 0x0111_0000_0000;

/// The mean `−log p₁` of the first `spec.samples` real samples under the model's flow.
fn negative_log_likelihood(
    field: &dyn VelocityField,
    real: &Tensor,
    device: &Device,
    spec: &NllSpec,
    source_std: f64,
    seed: u64,
) -> Result<Nll> {
    let x1 = real.narrow(0, 0, spec.samples)?;
    let mut rng = rng_from_seed(seed ^ NLL_SEED);
    // Chunks bound the memory of the backward passes (images); the probes are drawn in order.
    let chunk = if x1.dim(1)? <= 16 { spec.samples } else { 64 };
    let mut total = 0.0;
    let mut start = 0;
    while start < spec.samples {
        crate::signals::check("evaluation (likelihood)")?;
        let n = chunk.min(spec.samples - start);
        let x = x1.narrow(0, start, n)?.to_device(device)?;
        let ll = log_likelihood(
            field,
            &x,
            &spec.solver,
            spec.divergence,
            source_std,
            &mut rng,
        )?;
        total -= ll.sum_all()?.to_scalar::<f64>()?;
        start += n;
    }
    let nats = total / spec.samples as f64;
    let dim = x1.dim(1)? as f64;
    Ok(Nll {
        samples: spec.samples,
        nats,
        bits_per_dim: nats / (dim * std::f64::consts::LN_2),
        divergence: match spec.divergence {
            Divergence::Exact => "exact".into(),
            Divergence::Hutchinson { probes } => format!("hutchinson-{probes}"),
        },
        solver: Solver::from(&spec.solver),
        steps: spec.solver.steps,
    })
}

/// Writes a progress score to metrics.jsonl and TensorBoard.
pub fn log_progress(log: &mut RunLog, row: &ProgressRow) -> Result<()> {
    log.record(&json!({"step": row.step, "progress": row}))?;
    log.scalar("progress/w2", row.w2, row.step);
    log.scalar("progress/mmd", row.mmd, row.step);
    if let Some(f) = row.fid {
        log.scalar("progress/fid", f, row.step);
    }
    Ok(())
}
