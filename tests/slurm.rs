//! Sweeps on a real Slurm cluster (`scripts/slurm-local.sh up`, which `.ci/run` starts):
//! `scripts/slurm_sweep.sh` with 4 shards against a local sweep, and a task requeued while it
//! trains. Where no cluster answers, each test says it was skipped and why.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Says on the terminal (not captured by libtest) that a test could not run here.
fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "test {test} ... skipped: {why}");
}

/// The cluster's config, or `None` after saying why `test` is skipped.
fn cluster_or_skip(test: &str) -> Option<String> {
    match cluster() {
        Ok(conf) => Some(conf),
        Err(why) => {
            skipped(test, &why);
            None
        }
    }
}

/// The cluster's config, when a Slurm controller answers; else why not.
fn cluster() -> Result<String, String> {
    let conf = std::env::var("SLURM_CONF")
        .unwrap_or_else(|_| "/tmp/flowmatch-slurm/slurm.conf".to_string());
    if !Path::new(&conf).is_file() {
        return Err(format!(
            "no Slurm config at {conf} (run scripts/slurm-local.sh up)"
        ));
    }
    let ping = Command::new("scontrol")
        .arg("ping")
        .env("SLURM_CONF", &conf)
        .output()
        .map_err(|e| format!("scontrol not found ({e})"))?;
    let text = String::from_utf8_lossy(&ping.stdout);
    if !ping.status.success() || !text.contains("UP") {
        return Err(format!(
            "the Slurm controller does not answer: {}",
            text.trim()
        ));
    }
    Ok(conf)
}

fn slurm(conf: &str, args: &[&str]) -> String {
    let o = Command::new(args[0])
        .args(&args[1..])
        .env("SLURM_CONF", conf)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Submits `sweep` with `scripts/slurm_sweep.sh` into `out`; returns the job ids.
fn submit(conf: &str, sweep: &Path, shards: usize, out: &Path) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm_sweep.sh");
    let o = Command::new("bash")
        .arg(&script)
        .arg(sweep)
        .arg(shards.to_string())
        .env("SLURM_CONF", conf)
        .env("FM_BIN", BIN)
        .env("FM_OUT", out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{text}{}", stderr(&o));
    // "submitted array A (N shards) and merge job M; …"
    let words: Vec<&str> = text.split_whitespace().collect();
    let array = words[2].to_string();
    let merge = words[words.iter().position(|w| *w == "job").unwrap() + 1]
        .trim_end_matches(';')
        .to_string();
    vec![array, merge]
}

/// Waits (bounded) until none of `jobs` is queued or running.
fn wait_for(conf: &str, jobs: &[String], limit: Duration) {
    let t0 = Instant::now();
    let ids = jobs.join(",");
    while t0.elapsed() < limit {
        if slurm(conf, &["squeue", "-h", "-j", &ids]).trim().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "jobs {ids} still queued after {limit:?}: {}",
        slurm(conf, &["squeue", "-j", &ids])
    );
}

fn logs(out: &Path) -> String {
    let mut all = String::new();
    for p in walk(&out.join("slurm-logs")) {
        all.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
    }
    all
}

fn sweep_files(dir: &Path, name: &str, set: &str, axes: &str) -> PathBuf {
    write(dir, "base.toml", TINY);
    write(
        dir,
        &format!("{name}.toml"),
        &format!("base = \"base.toml\"\n[set]\n\"logging.plots\" = false\n{set}\n[axes]\n{axes}\n"),
    )
}

#[test]
fn a_sweep_in_four_slurm_shards_equals_a_local_sweep() {
    let Some(conf) = cluster_or_skip("slurm::a_sweep_in_four_slurm_shards_equals_a_local_sweep")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let sw = sweep_files(
        tmp.path(),
        "sw4",
        "\"train.steps\" = 60",
        "\"loss.coupling\" = [\"independent\", \"ot\"]\n\"solver.method\" = [\"euler\", \"heun\"]",
    );
    let out = tmp.path().join("cluster");
    let jobs = submit(&conf, &sw, 4, &out);
    wait_for(&conf, &jobs, Duration::from_secs(400));
    let log = logs(&out);
    assert!(log.contains("merged 4 of 4 runs"), "{log}");
    let local = tmp.path().join("local");
    let o = sweep_into(&sw, &local, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let runs: Vec<String> = read_json(&out.join("sw4/plan.json"))["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs.len(), 4);
    for r in &runs {
        let a = std::fs::read(out.join("sw4").join(r).join("summary.json")).unwrap();
        let b = std::fs::read(local.join("sw4").join(r).join("summary.json")).unwrap();
        assert_eq!(a, b, "run {r} differs between Slurm and the local sweep");
    }
    assert_eq!(
        std::fs::read(out.join("sw4/summary.csv")).unwrap(),
        std::fs::read(local.join("sw4/summary.csv")).unwrap()
    );
}

/// Submits a one-run sweep of 12,000 steps (`name`, seed `seed`), waits for its first
/// checkpoint, sends `interrupt` + the task id (a requeue, a signal), releases the requeued
/// task at once (Slurm holds it for a while, Reason=BeginTime) and waits for the end. Returns
/// the sweep file, the run folder and the task logs.
fn interrupted_run(
    conf: &str,
    dir: &Path,
    name: &str,
    seed: u64,
    interrupt: &[&str],
) -> (PathBuf, PathBuf, String) {
    let sw = sweep_files(
        dir,
        name,
        "\"train.steps\" = 12000\n\"train.checkpoint_every\" = 500",
        &format!("\"train.seed\" = [{seed}]"),
    );
    let out = dir.join("cluster");
    let jobs = submit(conf, &sw, 1, &out);
    let task = format!("{}_0", jobs[0]);
    let run = out.join(name).join(format!("000_seed-{seed}"));
    let t0 = Instant::now();
    while !run.join("resume.safetensors").is_file() && t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        run.join("resume.safetensors").is_file(),
        "no checkpoint: {}",
        logs(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut args = interrupt.to_vec();
    args.push(&task);
    slurm(conf, &args);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        let state = slurm(conf, &["squeue", "-h", "-j", &task, "-o", "%T"]);
        if state.trim() == "PENDING" {
            let job = format!("JobId={task}");
            slurm(conf, &["scontrol", "update", &job, "StartTime=now"]);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for(conf, &jobs, Duration::from_secs(400));
    (sw, run, logs(&out))
}

#[test]
fn a_requeued_slurm_task_resumes_and_ends_as_an_uninterrupted_run() {
    let Some(conf) =
        cluster_or_skip("slurm::a_requeued_slurm_task_resumes_and_ends_as_an_uninterrupted_run")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (sw, run, log) = interrupted_run(&conf, tmp.path(), "long", 4, &["scontrol", "requeue"]);
    assert!(
        log.contains("stopped on request") && log.contains("resuming after step"),
        "the task did not stop and resume: {log}"
    );
    assert!(log.contains("merged 1 of 1 runs"), "{log}");
    let local = tmp.path().join("local");
    let o = sweep_into(&sw, &local, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(run.join("summary.json")).unwrap(),
        std::fs::read(local.join("long/000_seed-4/summary.json")).unwrap(),
        "the requeued run's summary differs from an uninterrupted run's"
    );
}

#[test]
fn scancel_signal_term_without_full_reaches_flowmatch() {
    let Some(conf) = cluster_or_skip("slurm::scancel_signal_term_without_full_reaches_flowmatch")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // `scancel --signal=TERM` signals the job's steps only (not the batch shell): flowmatch
    // must be one of them to checkpoint and exit 75, after which the task requeues itself.
    let (_, run, log) = interrupted_run(
        &conf,
        tmp.path(),
        "cancel",
        5,
        &["scancel", "--signal=TERM"],
    );
    assert!(
        log.contains("stopped on request") && log.contains("resuming after step"),
        "SIGTERM did not reach flowmatch: {log}"
    );
    assert!(run.join("summary.json").is_file(), "{log}");
}
