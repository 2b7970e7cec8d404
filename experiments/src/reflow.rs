//! k-rectified flows: the base run (1-RF) teaches a student (2-RF), which teaches the next, …
//! Each iteration is a run folder of its own; the parent gets the straightness table.

use crate::check::Plan;
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
use flowmatch_reflow::{
    Flow, PairSet, ReflowInit, ReflowMode, Stage, Teacher, TeacherCoupling, TeacherLabels,
};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

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
pub fn run_experiment(checked: &Experiment, lock: &RunLock, opts: RunOptions) -> Result<Summary> {
    let (dir, steps) = (lock.dir(), checked.train.steps as u64);
    if !checked.reflow.is_reflow() {
        let pb = progress_bar(steps, opts.show, &checked.name);
        return run(checked, dir, &pb, opts);
    }
    if let Some(done) = open_parent(dir, checked, opts)? {
        return Ok(done);
    }
    let first_exp = with_reflow_eval(checked)?;
    let pb = progress_bar(steps, opts.show, &format!("{} 1-RF", checked.name));
    let (first, model) = run_with(&first_exp, &dir.join("rf1"), &pb, Setup::default(), opts)?;
    chain(&first_exp, model, &first.eval, dir, opts)
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
    let stored = Config::load(&crate::config::ConfigSource {
        file: Some(&RunPaths::new(run_dir).config()),
        sets: &[],
    })
    .ok();
    let asked = sets.iter().any(|o| o.key == "reflow.iterations");
    if !asked && stored.is_some_and(|p| !p.reflow.is_reflow()) {
        sets.insert(
            0,
            crate::config::Override::new(
                "reflow.iterations",
                toml::Value::Integer(1),
                "flowmatch reflow (one iteration unless --set reflow.iterations=K)",
            ),
        );
    }
    let run = open_run(run_dir, &sets)?;
    let (_run_lock, model, exp) = (run.lock, run.model, run.exp);
    if !exp.reflow.is_reflow() {
        return Err(anyhow!(
            "reflow.iterations: flowmatch reflow needs at least 1 iteration (or reflow.distill_k), got 0"
        ));
    }
    let checked = with_reflow_eval(&exp)?;
    let dev = checked.device.clone();
    let parent = run_dir.join("reflow");
    let lock = RunLock::acquire(&parent)?;
    let s = match open_parent(lock.dir(), &checked, opts)? {
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
                checked.name,
                checked.reflow.iterations,
                parent.display()
            );
            let first = crate::eval::evaluate(&model, &checked, &checked.solver, &dev)?;
            chain(&checked, model, &first, lock.dir(), opts)?
        }
    };
    Ok((s, parent))
}

/// Makes a reflow parent folder ready for `plan` (see [`prepare`]) and records its config;
/// returns the summary when this config already finished there.
pub fn open_parent(parent: &Path, plan: &Plan, opts: RunOptions) -> Result<Option<Summary>> {
    match prepare(parent, plan, opts.on_change)? {
        Prepared::Finished => Ok(Some(RunPaths::new(parent).read_summary()?)),
        Prepared::Fresh | Prepared::Resume => {
            write_atomic(&parent.join("config.toml"), plan.config_toml().as_bytes())?;
            Ok(None)
        }
    }
}

/// Trains `reflow.iterations` students starting from `teacher` (already evaluated as
/// `first`), then the optional distillation, into `parent/rf2`, `parent/rf3`, …; writes the
/// table (`reflow.md`, `reflow.json`, TensorBoard curves over iterations) and
/// `parent/summary.json` (the last student's summary with the table).
pub fn chain(
    checked: &Experiment,
    teacher: Model,
    first: &Evaluation,
    parent: &Path,
    opts: RunOptions,
) -> Result<Summary> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut log = RunLog::create(parent, checked.logging.tensorboard)?;
    let mut rows = vec![row_of(Flow::Rectified(1), first)];
    log_row(&mut log, &rows[0], 1)?;
    write_table(parent, &rows)?;
    let mut teacher = Arc::new(teacher);
    let first_model = teacher.clone();
    let mut last: Option<Summary> = None;
    for stage in checked.stages() {
        let student = checked.with_plan(checked.stage(&stage)?);
        let stage_dir = parent.join(stage.flow.folder());
        // A stage that finished before a kill is reused, not retrained.
        let (summary, model) = match prepare(&stage_dir, &student, opts.on_change)? {
            Prepared::Finished => load_finished(&stage_dir, &student, &student.device)?,
            Prepared::Fresh | Prepared::Resume => {
                train_student(checked, &student, &stage, &teacher, &stage_dir, opts)?
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
    if checked.logging.plots {
        if let Err(e) = reflow_figures(checked, &first_model, &teacher, &rows, parent) {
            eprintln!("warning: {}: reflow figures not drawn: {e:#}", checked.name);
        }
    }
    let mut s = last.ok_or_else(|| {
        anyhow!("reflow: nothing to do (reflow.iterations = 0 and no distillation)")
    })?;
    s.name = checked.name.clone();
    s.reflow = Some(rows);
    write_json(&parent.join("summary.json"), &s)?;
    Ok(s)
}

/// Trains one student of the chain of `checked` in `stage_dir` (its own experiment `c`): from
/// its teacher's weights or from scratch, on pairs from `teacher` (online, or an offline set
/// made here).
fn train_student(
    checked: &Experiment,
    c: &Experiment,
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
    // A conditional teacher samples each pair for a drawn label, guided at reflow.guidance.
    let labels = checked.labels.map(|draw| TeacherLabels {
        draw,
        guidance: r.guidance,
    });
    crate::signals::check(&format!("{} {flow}: setup", checked.name))?;
    let (coupling, label): (Box<dyn Coupling>, RunCoupling) = if r.mode == ReflowMode::Offline {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let teacher = Teacher {
            field: as_field.as_ref(),
            solver: r.teacher,
            labels,
        };
        let set = pool.install(|| {
            PairSet::generate(
                checked.source.as_ref(),
                &teacher,
                r.pairs,
                256,
                c.train.seed,
                &device,
            )
        })?;
        crate::signals::check(&format!("{} {flow}: reflow pairs", checked.name))?;
        (
            Box::new(set),
            RunCoupling::ReflowOffline {
                pairs: r.pairs,
                teacher: Solver::from(&r.teacher),
                steps: r.teacher.steps,
            },
        )
    } else {
        let tc = TeacherCoupling::new(source.clone(), as_field, r.teacher)?.with_labels(labels);
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
    let pb = progress_bar(steps as u64, opts.show, &format!("{} {flow}", checked.name));
    let setup = Setup {
        model: Some(student),
        coupling: Some(coupling),
        coupling_label: Some(label),
        time: Some(time),
    };
    run_with(c, stage_dir, &pb, setup, opts)
}

/// `reflow.png` (straightness and W2 across iterations) and `fm_vs_reflow.gif` (1-RF next to
/// the last flow, same starting points).
pub fn reflow_figures(
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
        let mut rng = flowmatch_data::rng_from_seed(checked.eval.seed ^ 0xf10e);
        let x0 = checked
            .source
            .sample(checked.eval.samples.min(1000), &mut rng, &device)?;
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
