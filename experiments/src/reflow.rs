//! k-rectified flows: the base run (1-RF) teaches a student (2-RF), which teaches the next, …
//! Each iteration is a run folder of its own; the parent gets the straightness table.

use crate::config::Config;
use crate::experiment::{with_reflow_eval, Experiment, REFLOW_STEPS};
use crate::folder::{load_finished, open_run, prepare, Prepared, RunOptions, RunPaths};
use crate::lock::RunLock;
use crate::logging::{atomically, write_atomic, write_json, RunLog};
use crate::report::{Evaluation, IterationRow, RunCoupling, Solver, StepW2, Summary};
use crate::run::{progress_bar, run, run_with, Setup};
use anyhow::{anyhow, Context, Result};
use flowmatch_data::Sampler;
use flowmatch_losses::Coupling;
use flowmatch_models::{Model, VelocityField};
use flowmatch_reflow::{Flow, PairSet, ReflowInit, ReflowMode, Stage, TeacherCoupling};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

/// The config a stage's folder records: the base config as that student trains it (its name,
/// steps, learning rate and seed; no reflow of its own).
fn stage_config(cfg: &Config, stage: &Stage, lr: f64) -> Config {
    let mut c = cfg.clone();
    c.name = stage.flow.folder();
    c.train.steps = stage.steps;
    c.train.lr = lr;
    c.train.seed = cfg.train.seed.wrapping_add(stage.index as u64);
    c.reflow.iterations = 0;
    c.reflow.distill_k = 0;
    c
}

/// The reflow-table row of an evaluation made with [`with_reflow_eval`].
pub fn row_of(flow: Flow, ev: &Evaluation) -> IterationRow {
    let w2_euler = REFLOW_STEPS
        .iter()
        .filter_map(|&s| ev.euler(s).map(|r| StepW2 { steps: s, w2: r.w2 }))
        .collect();
    IterationRow {
        flow,
        straightness: ev.straightness,
        rf_straightness: ev.rf_straightness,
        normalized_path_energy: ev.normalized_path_energy,
        w2_euler,
    }
}

/// Runs a config in the folder `lock` holds: a plain run, or the base run plus the reflow
/// chain when `[reflow]` asks for it. A killed experiment continues where it stopped.
pub fn run_experiment(
    cfg: &Config,
    checked: &Experiment,
    lock: &RunLock,
    opts: RunOptions,
) -> Result<Summary> {
    let dir = lock.dir();
    if !checked.reflow.is_reflow() {
        return run(
            cfg,
            checked,
            dir,
            &progress_bar(cfg.train.steps as u64, opts.show, &cfg.name),
            opts,
        );
    }
    if let Some(done) = open_parent(dir, cfg, opts)? {
        return Ok(done);
    }
    let (cfg1, checked1) = with_reflow_eval(cfg, checked)?;
    let pb = progress_bar(
        cfg.train.steps as u64,
        opts.show,
        &format!("{} 1-RF", cfg.name),
    );
    let (first, model) = run_with(
        &cfg1,
        &checked1,
        &dir.join("rf1"),
        &pb,
        Setup::default(),
        opts,
    )?;
    chain(&cfg1, &checked1, model, &first.eval, dir, opts)
}

/// `flowmatch reflow RUN_DIR`: reflows a finished run (its lock held meanwhile) into
/// `RUN_DIR/reflow/`, or reuses the finished reflow of the same settings there; returns the
/// parent's summary and folder. `sets` apply to the run's config; without a
/// `reflow.iterations` among them a run that asked for no reflow gets one iteration, through
/// the config's checks like any other value.
pub fn reflow_finished(
    run_dir: &Path,
    mut sets: Vec<crate::config::Override>,
    opts: RunOptions,
) -> Result<(Summary, std::path::PathBuf)> {
    let stored = Config::read_resolved(&RunPaths::new(run_dir).config()).ok();
    let asked = sets.iter().any(|o| o.key == "reflow.iterations");
    if !asked && stored.is_some_and(|c| c.reflow.iterations == 0 && c.reflow.distill_k == 0) {
        sets.insert(
            0,
            crate::config::Override::new(
                "reflow.iterations",
                toml::Value::Integer(1),
                "flowmatch reflow (one iteration unless --set reflow.iterations=K)",
            ),
        );
    }
    let run = open_run(&run_dir, &sets)?;
    let (_run_lock, model, cfg, exp) = (run.lock, run.model, run.cfg, run.exp);
    if !exp.reflow.is_reflow() {
        return Err(anyhow!(
            "reflow.iterations: flowmatch reflow needs at least 1 iteration (or reflow.distill_k), got 0"
        ));
    }
    let (cfg, checked) = with_reflow_eval(&cfg, &exp)?;
    let dev = checked.device.clone();
    let parent = run_dir.join("reflow");
    let lock = RunLock::acquire(&parent)?;
    let s = match open_parent(lock.dir(), &cfg, opts)? {
        Some(done) => {
            eprintln!(
                "{} already holds this reflow, finished; showing its table",
                parent.display()
            );
            done
        }
        None => {
            eprintln!(
                "reflow {}: {} iteration(s) -> {}",
                cfg.name,
                cfg.reflow.iterations,
                parent.display()
            );
            let first = crate::eval::evaluate(&model, &cfg, &checked, &checked.solver, &dev)?;
            chain(&cfg, &checked, model, &first, lock.dir(), opts)?
        }
    };
    Ok((s, parent))
}

/// Makes a reflow parent folder ready for `cfg` (see [`prepare`]) and records its config;
/// returns the summary when this config already finished there.
pub fn open_parent(parent: &Path, cfg: &Config, opts: RunOptions) -> Result<Option<Summary>> {
    match prepare(parent, cfg, opts.on_change)? {
        Prepared::Finished => Ok(Some(RunPaths::new(parent).read_summary()?)),
        Prepared::Fresh | Prepared::Resume => {
            write_atomic(&parent.join("config.toml"), cfg.to_toml().as_bytes())?;
            Ok(None)
        }
    }
}

/// Trains `reflow.iterations` students starting from `teacher` (already evaluated as
/// `first`), then the optional distillation, into `parent/rf2`, `parent/rf3`, …; writes the
/// table (`reflow.md`, `reflow.json`, TensorBoard curves over iterations) and
/// `parent/summary.json` (the last student's summary with the table).
pub fn chain(
    cfg: &Config,
    checked: &Experiment,
    teacher: Model,
    first: &Evaluation,
    parent: &Path,
    opts: RunOptions,
) -> Result<Summary> {
    let r = checked.reflow;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut log = RunLog::create(parent, cfg.logging.tensorboard)?;
    let mut rows = vec![row_of(Flow::Rectified(1), first)];
    log_row(&mut log, &rows[0], 1)?;
    write_table(parent, &rows)?;
    let mut teacher = Arc::new(teacher);
    let first_model = teacher.clone();
    let mut last: Option<Summary> = None;
    for stage in checked.stages() {
        let c = stage_config(cfg, &stage, r.lr);
        let stage_dir = parent.join(stage.flow.folder());
        // A stage that finished before a kill is reused, not retrained.
        let (summary, model) = match prepare(&stage_dir, &c, opts.on_change)? {
            Prepared::Finished => load_finished(&stage_dir, checked, &checked.device)?,
            Prepared::Fresh | Prepared::Resume => {
                train_student(cfg, &c, checked, &stage, &teacher, &stage_dir, opts)?
            }
        };
        let row = row_of(stage.flow, &summary.eval);
        log_row(&mut log, &row, rows.len() + 1)?;
        rows.push(row);
        write_table(parent, &rows)?;
        teacher = Arc::new(model);
        last = Some(summary);
    }
    log.close()?;
    if cfg.logging.plots {
        if let Err(e) = reflow_figures(cfg, checked, &first_model, &teacher, &rows, parent) {
            eprintln!("warning: {}: reflow figures not drawn: {e:#}", cfg.name);
        }
    }
    let mut s = last.ok_or_else(|| {
        anyhow!("reflow: nothing to do (reflow.iterations = 0 and no distillation)")
    })?;
    s.name = cfg.name.clone();
    s.reflow = Some(rows);
    write_json(&parent.join("summary.json"), &s)?;
    Ok(s)
}

/// Trains one student of the chain in `stage_dir` (its config `c`): from its teacher's
/// weights or from scratch, on pairs from `teacher` (online, or an offline set made here).
fn train_student(
    cfg: &Config,
    c: &Config,
    checked: &Experiment,
    stage: &Stage,
    teacher: &Arc<Model>,
    stage_dir: &Path,
    opts: RunOptions,
) -> Result<(Summary, Model)> {
    let Stage {
        index,
        ref flow,
        time,
        steps,
        distill,
        ..
    } = *stage;
    let (r, i) = (checked.reflow, index - 1);
    let device = teacher.params.device().clone();
    let source = checked.source.clone();
    let student = if r.init == ReflowInit::Teacher || distill {
        teacher.duplicate()?
    } else {
        checked
            .model
            .build(checked.source.dim(), c.train.seed, &device)?
    };
    let as_field: Arc<dyn VelocityField> = teacher.clone();
    crate::signals::check(&format!("{} {flow}: setup", cfg.name))?;
    let (coupling, label): (Box<dyn Coupling>, RunCoupling) = if r.mode == ReflowMode::Offline {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let set = pool.install(|| {
            PairSet::generate(
                checked.source.as_ref(),
                as_field.as_ref(),
                &r.teacher,
                r.pairs,
                256,
                c.train.seed,
                &device,
            )
        })?;
        crate::signals::check(&format!("{} {flow}: reflow pairs", cfg.name))?;
        (
            Box::new(set),
            RunCoupling::ReflowOffline {
                pairs: r.pairs,
                teacher: Solver::from(&r.teacher),
                steps: r.teacher.steps,
            },
        )
    } else {
        let tc = TeacherCoupling::new(source.clone(), as_field, r.teacher)?;
        (
            Box::new(tc),
            RunCoupling::ReflowOnline {
                teacher: Solver::from(&r.teacher),
                steps: r.teacher.steps,
            },
        )
    };
    write_json(
        &stage_dir.with_extension("teacher.json"),
        &json!({"flow": flow, "teacher": if i == 0 { "rf1".to_string() } else { format!("stage {i}") }, "coupling": label}),
    )
    .ok();
    let pb = progress_bar(steps as u64, opts.show, &format!("{} {flow}", cfg.name));
    let setup = Setup {
        model: Some(student),
        coupling: Some(coupling),
        coupling_label: Some(label),
        time: Some(time),
    };
    run_with(c, checked, stage_dir, &pb, setup, opts)
}

/// `reflow.png` (straightness and W2 across iterations) and `fm_vs_reflow.gif` (1-RF next to
/// the last flow, same starting points).
pub fn reflow_figures(
    cfg: &Config,
    checked: &Experiment,
    first: &Model,
    last: &Model,
    rows: &[IterationRow],
    parent: &Path,
) -> Result<()> {
    atomically(&parent.join("reflow.png"), |tmp| {
        crate::plot::reflow_curves(tmp, rows)
    })?;
    if checked.source.dim() == 2 {
        let device = first.params.device().clone();
        let mut rng = flowmatch_data::rng_from_seed(cfg.eval.seed ^ 0xf10e);
        let x0 = checked
            .source
            .sample(cfg.eval.samples.min(1000), &mut rng, &device)?;
        let euler50 = flowmatch_solvers::SolverSpec::new(flowmatch_solvers::Method::Euler, 50);
        let a = crate::plot::record(first, &x0, &euler50)?;
        let b = crate::plot::record(last, &x0, &euler50)?;
        let name = rows
            .last()
            .map_or("reflowed".to_string(), |r| r.flow.to_string());
        atomically(&parent.join("fm_vs_reflow.gif"), |tmp| {
            crate::plot::animation(tmp, &[("1-RF (flow matching)", &a), (&name, &b)], 51)
        })?;
    }
    Ok(())
}

fn log_row(log: &mut RunLog, row: &IterationRow, iteration: usize) -> Result<()> {
    log.record(&json!({"iteration": iteration, "row": row}))?;
    log.scalar("reflow/straightness", row.straightness, iteration);
    log.scalar("reflow/rf_straightness", row.rf_straightness, iteration);
    log.scalar(
        "reflow/normalized_path_energy",
        row.normalized_path_energy,
        iteration,
    );
    for s in &row.w2_euler {
        log.scalar(&format!("reflow/w2_euler_{}", s.steps), s.w2, iteration);
    }
    Ok(())
}

/// The reflow table as Markdown.
pub fn table_markdown(rows: &[IterationRow]) -> String {
    let mut md = String::from("| flow | straightness | S (Liu) | NPE |");
    for s in REFLOW_STEPS {
        md.push_str(&format!(" W2 @{s} |"));
    }
    md.push_str("\n|---|---|---|---|");
    md.push_str(&"---|".repeat(REFLOW_STEPS.len()));
    md.push('\n');
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.4} | {:.4} | {:.4} |",
            r.flow, r.straightness, r.rf_straightness, r.normalized_path_energy
        ));
        for s in &r.w2_euler {
            md.push_str(&format!(" {:.4} |", s.w2));
        }
        md.push('\n');
    }
    md
}

fn write_table(parent: &Path, rows: &[IterationRow]) -> Result<()> {
    write_json(&parent.join("reflow.json"), &rows)?;
    write_atomic(&parent.join("reflow.md"), table_markdown(rows).as_bytes())?;
    Ok(())
}
