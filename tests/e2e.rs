//! End-to-end tests of the `flowmatch` binary: runs, sweeps, eval, bad input, resumption.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn run_writes_a_self_describing_folder_and_eval_reevaluates_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "tiny.toml", TINY);
    let out = tmp.path().join("runs");
    let o = flowmatch(&[
        "run",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.seed=3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = out.join("tiny");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "model.safetensors",
        "summary.json",
        "timing.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let s = read_json(&dir.join("summary.json"));
    for k in ["final_loss", "w2", "straightness", "rf_straightness", "nfe"] {
        assert!(s[k].is_number(), "summary lacks {k}");
    }
    assert_eq!(s["seed"], 3);
    assert_eq!(s["eval"]["table"].as_array().unwrap().len(), 4);
    let st = s["straightness"].as_f64().unwrap();
    assert!(st > 0.0 && st <= 1.0 + 1e-9);
    // The resolved config is complete and re-loadable.
    let resolved = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(resolved.contains("seed = 3") && resolved.contains("[solver]"));
    // TensorBoard: a well-framed event file that holds the loss curve.
    let ev = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
        .unwrap();
    let bytes = std::fs::read(ev.path()).unwrap();
    let mut pos = 0;
    let mut records = 0;
    while pos < bytes.len() {
        let len = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
        pos += 8 + 4 + len + 4;
        records += 1;
    }
    assert_eq!(pos, bytes.len(), "event records are not framed correctly");
    assert!(records > 30, "{records} records");
    assert!(bytes.windows(10).any(|w| w == b"train/loss"));
    // eval with another solver writes its own file and leaves the summary alone.
    let before = std::fs::read(dir.join("summary.json")).unwrap();
    let o = flowmatch(&[
        "eval",
        dir.to_str().unwrap(),
        "--set",
        "solver.method=rk4",
        "--set",
        "solver.steps=8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = read_json(&dir.join("eval-rk4-8.json"));
    assert_eq!(e["nfe"], 32);
    assert_eq!(std::fs::read(dir.join("summary.json")).unwrap(), before);
    // A second run of the same name with other settings does not overwrite the finished
    // one: it stops with an error naming the key (as the README says), and writes no
    // `tiny-2`; the same settings again reuse the finished run.
    let again = |set: &str| {
        let (c, o) = (cfg.to_str().unwrap(), out.to_str().unwrap());
        flowmatch(&["run", c, "--out", o, "--set", set])
    };
    let o = again("train.steps=5");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("train.steps") && stderr(&o).contains("--redo-changed"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("tiny-2").exists());
    assert_eq!(std::fs::read(dir.join("summary.json")).unwrap(), before);
    let o = again("train.seed=3");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(dir.join("summary.json")).unwrap(), before);
}

#[test]
fn same_config_and_seed_give_byte_identical_summaries() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(
        tmp.path(),
        "det.toml",
        &format!("{TINY}\n[loss]\ncoupling = \"ot\"\n"),
    );
    let mut outs = vec![];
    for k in 0..2 {
        let out = tmp.path().join(format!("o{k}"));
        let o = flowmatch(&["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(std::fs::read(out.join("det").join("summary.json")).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
    let out = tmp.path().join("o3");
    let o = flowmatch(&[
        "run",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.seed=1",
    ]);
    assert!(o.status.success());
    assert_ne!(
        outs[0],
        std::fs::read(out.join("det").join("summary.json")).unwrap()
    );
}

#[test]
fn bad_configs_fail_with_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("syntax", "[train\nsteps = 3\n", "syntax"),
        ("unknown_key", "[train]\nstepz = 3\n", "stepz"),
        ("wrong_type", "[train]\nsteps = \"three\"\n", "train.steps"),
        ("warp", "[solver]\nwarp_s = 1.6\n", "solver.warp_s"),
        ("batch0", "[train]\nbatch_size = 0\n", "train.batch_size"),
        ("steps0", "[train]\nsteps = 0\n", "train.steps"),
        ("dist", "[data]\ntarget = \"banana\"\n", "banana"),
        ("solver", "[solver]\nmethod = \"leapfrog\"\n", "leapfrog"),
        ("section", "[trian]\nsteps = 3\n", "trian"),
        ("device", "device = \"tpu\"\n", "device"),
    ];
    for (name, text, needle) in cases {
        let cfg = write(tmp.path(), &format!("{name}.toml"), text);
        let out = tmp.path().join(format!("out_{name}"));
        let o = flowmatch(&["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{name}: succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{name}: {err}"
        );
        if *name != "syntax" && *name != "section" {
            assert!(
                err.contains(&format!("{name}.toml")) || err.contains("device"),
                "{name}: names no file: {err}"
            );
        }
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(files_under(&out), 0, "{name}: wrote files");
    }
    // Bad --set and a missing file.
    let cfg = write(tmp.path(), "ok.toml", TINY);
    let o = flowmatch(&[
        "run",
        cfg.to_str().unwrap(),
        "--set",
        "solver.steps=0",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("solver.steps"));
    let o = flowmatch(&["run", "/nonexistent/cfg.toml"]);
    assert!(!o.status.success() && stderr(&o).contains("does not exist"));
    let o = flowmatch(&["eval", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("model.safetensors"));
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the weights up within a few steps.
    let cfg = write(tmp.path(), "nan.toml", &format!("{TINY}\n"));
    let out = tmp.path().join("runs");
    let o = flowmatch(&[
        "run",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.lr=1e12",
        "--set",
        "train.checkpoint_every=1",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("not finite") && err.contains("kept the checkpoint of step"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1 + 1, "{err}"); // the "run … ->" line and the error
    let dir = out.join("nan");
    assert!(dir.join("model.safetensors").is_file());
    assert!(!dir.join("summary.json").exists());
    // The kept checkpoint holds finite weights.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let floats = &bytes[8 + header_len..];
    assert!(floats
        .chunks(4)
        .all(|c| f32::from_le_bytes(c.try_into().unwrap()).is_finite()));
}

fn sweep_file(dir: &Path) -> PathBuf {
    write(dir, "base.toml", TINY);
    write(
        dir,
        "sw.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 120\n[axes]\n\"loss.coupling\" = [\"independent\", \"ot\"]\n\"solver.method\" = [\"euler\", \"heun\"]\n",
    )
}

#[test]
fn killed_sweep_resumes_without_redoing_or_losing_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let sw = sweep_file(tmp.path());
    let out = tmp.path().join("runs");
    let sdir = out.join("sw");
    let mut child = Command::new(BIN)
        .args([
            "sweep",
            sw.to_str().unwrap(),
            "--jobs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let finished = |d: &Path| {
        walk(d)
            .iter()
            .filter(|p| p.ends_with("summary.json"))
            .count()
    };
    while (if sdir.exists() { finished(&sdir) } else { 0 }) < 1
        && t0.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done: Vec<PathBuf> = walk(&sdir)
        .into_iter()
        .filter(|p| p.ends_with("summary.json"))
        .collect();
    assert!(
        !done.is_empty() && done.len() < 4,
        "{} finished before the kill",
        done.len()
    );
    let stamps: Vec<_> = done
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .collect();
    let o = flowmatch(&[
        "sweep",
        sw.to_str().unwrap(),
        "--jobs",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!(
            "{} ran, {} already finished",
            4 - done.len(),
            done.len()
        )),
        "{text}"
    );
    for (p, s) in done.iter().zip(stamps) {
        assert_eq!(
            std::fs::metadata(p).unwrap().modified().unwrap(),
            s,
            "finished run {p:?} was redone"
        );
    }
    let csv = std::fs::read_to_string(sdir.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(std::fs::read_to_string(sdir.join("summary.md"))
        .unwrap()
        .contains("| 003_coupling-ot_method-heun |"));
}

#[test]
fn shards_split_the_sweep_and_merge_joins_them() {
    let tmp = tempfile::tempdir().unwrap();
    let sw = sweep_file(tmp.path());
    let out = tmp.path().join("runs");
    for shard in ["0/2", "1/2"] {
        let o = flowmatch(&[
            "sweep",
            sw.to_str().unwrap(),
            "--shard",
            shard,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("2 ran"));
    }
    let o = flowmatch(&["merge", out.join("sw").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("sw").join("summary.csv"))
            .unwrap()
            .lines()
            .count(),
        5
    );
    let o = flowmatch(&["sweep", sw.to_str().unwrap(), "--shard", "2/2"]);
    assert!(!o.status.success() && stderr(&o).contains("--shard"));
}

#[test]
fn reflow_writes_one_folder_per_iteration_and_a_straightness_table() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "{TINY}\n[reflow]\niterations = 1\nmode = \"offline\"\npairs = 512\nteacher_method = \"euler\"\nteacher_steps = 10\ninit = \"scratch\"\nsteps = 100\ndistill_k = 2\ndistill_steps = 40\n"
    );
    let cfg = write(tmp.path(), "rf.toml", &text);
    let out = tmp.path().join("runs");
    let o = flowmatch(&["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let parent = out.join("rf");
    for f in ["rf1", "rf2", "distill2"] {
        assert!(
            parent.join(f).join("summary.json").is_file(),
            "{f} not finished"
        );
        assert!(parent.join(f).join("model.safetensors").is_file());
    }
    let rows = read_json(&parent.join("reflow.json"));
    let rows = rows.as_array().unwrap();
    let flows: Vec<&str> = rows.iter().map(|r| r["flow"].as_str().unwrap()).collect();
    assert_eq!(flows, ["1-RF", "2-RF", "distill-2"]);
    for r in rows {
        let steps: Vec<u64> = r["w2_euler"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["steps"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 5, 10, 100]);
        assert!(r["straightness"].as_f64().unwrap() > 0.0);
    }
    let s = read_json(&parent.join("summary.json"));
    assert_eq!(s["name"], "rf");
    assert!(s["coupling"]
        .as_str()
        .unwrap()
        .starts_with("reflow-offline"));
    assert_eq!(s["reflow"].as_array().unwrap().len(), 3);
    assert!(std::fs::read_to_string(parent.join("reflow.md"))
        .unwrap()
        .contains("| 2-RF |"));
    assert!(std::fs::read_dir(&parent)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("events.out")));
    // Reflow of an existing run, online this time.
    let base = parent.join("rf1");
    let o = flowmatch(&[
        "reflow",
        base.to_str().unwrap(),
        "--set",
        "reflow.mode=online",
        "--set",
        "reflow.steps=30",
        "--set",
        "reflow.distill_k=0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(base
        .join("reflow")
        .join("rf2")
        .join("summary.json")
        .is_file());
    let md = std::fs::read_to_string(base.join("reflow").join("reflow.md")).unwrap();
    assert!(md.contains("| 1-RF |") && md.contains("| 2-RF |"), "{md}");
    let o = flowmatch(&[
        "reflow",
        base.to_str().unwrap(),
        "--set",
        "reflow.mode=sideways",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("reflow.mode"));
}

/// Decodes a PNG and returns (width, height, number of distinct colours).
fn png_facts(path: &Path) -> (u32, u32, usize) {
    let decoder = png::Decoder::new(
        std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    );
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    (info.width, info.height, colours.len())
}

#[test]
fn every_figure_kind_is_drawn_decodes_and_is_not_blank() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "{TINY}\n[reflow]\niterations = 1\nmode = \"offline\"\npairs = 256\nteacher_method = \"euler\"\nteacher_steps = 5\ninit = \"teacher\"\nsteps = 30\n"
    );
    let cfg = write(tmp.path(), "pics.toml", &text);
    let out = tmp.path().join("runs");
    let o = flowmatch(&[
        "run",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "eval.samples=100",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let parent = out.join("pics");
    let run = parent.join("rf1");
    // (file, width, height) as drawn by the run itself: 360 px per panel.
    for (file, w, h) in [
        ("distributions.png", 1080, 360),
        ("trajectories.png", 360, 360),
        ("flow_field.png", 1080, 360),
        ("steps_grid.png", 2160, 360),
    ] {
        let (pw, ph, colours) = png_facts(&run.join(file));
        assert_eq!((pw, ph), (w, h), "{file}");
        assert!(colours > 20, "{file} looks blank: {colours} colours");
    }
    let (pw, ph, colours) = png_facts(&parent.join("reflow.png"));
    assert_eq!((pw, ph), (1080, 360));
    assert!(colours > 20, "reflow.png looks blank");
    for (gif_path, w) in [
        (run.join("flow.gif"), 360u16),
        (parent.join("fm_vs_reflow.gif"), 720),
    ] {
        let mut opts = gif::DecodeOptions::new();
        opts.set_color_output(gif::ColorOutput::RGBA);
        let mut dec = opts
            .read_info(std::fs::File::open(&gif_path).unwrap())
            .unwrap();
        assert_eq!(
            (dec.width(), dec.height()),
            (w, 360),
            "{}",
            gif_path.display()
        );
        let mut frames = vec![];
        while let Some(f) = dec.read_next_frame().unwrap() {
            frames.push(f.buffer.to_vec());
        }
        assert!(
            frames.len() >= 10,
            "{} has {} frames",
            gif_path.display(),
            frames.len()
        );
        assert_ne!(
            frames.first(),
            frames.last(),
            "particles do not move in {}",
            gif_path.display()
        );
    }
    // On demand: redraw one figure into the same folder with `flowmatch plot`.
    std::fs::remove_file(run.join("trajectories.png")).unwrap();
    let o = flowmatch(&["plot", run.to_str().unwrap(), "--what", "trajectories"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_facts(&run.join("trajectories.png")).0, 360);
    let o = flowmatch(&["plot", run.to_str().unwrap(), "--what", "histogram"]);
    assert!(
        !o.status.success() && stderr(&o).lines().count() == 1,
        "{}",
        stderr(&o)
    );
}

/// A tiny "MNIST": class k is a bright horizontal band at rows 2k..2k+3, with a little noise.
fn tiny_mnist(dir: &Path, n: usize) {
    let mut img = vec![0u8; n * 784];
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    for (i, &k) in labels.iter().enumerate() {
        for r in (2 * k as usize + 1)..(2 * k as usize + 4) {
            for c in 4..24 {
                img[i * 784 + r * 28 + c] = 200 + ((i * 7 + c) % 56) as u8;
            }
        }
    }
    flowmatch_data::mnist::write_idx(dir, &img, &labels, n * 4 / 5).unwrap();
}

#[test]
fn mnist_trains_scores_draws_and_reflows_and_bad_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mnist");
    tiny_mnist(&data, 300);
    let clf = tmp.path().join("clf.safetensors");
    let o = flowmatch(&[
        "classifier",
        "--data",
        data.to_str().unwrap(),
        "--out",
        clf.to_str().unwrap(),
        "--steps",
        "150",
        "--batch",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = read_json(&clf.with_extension("json"));
    assert!(report["test_accuracy"].as_f64().unwrap() > 0.9, "{report}");
    let text = format!(
        "name = \"digits\"\n[data]\nsource = \"gaussian\"\ntarget = \"mnist\"\ndir = {:?}\n[model]\nkind = \"unet\"\nhidden = 8\n\
         [train]\nsteps = 60\nbatch_size = 16\nlr = 3e-3\ncheckpoint_every = 0\n[solver]\nmethod = \"euler\"\nsteps = 5\n\
         [eval]\nsamples = 60\nsteps = [1, 5]\nmethods = [\"euler\"]\nclassifier = {:?}\nevery = 20\n\
         [reflow]\niterations = 1\nmode = \"online\"\nteacher_method = \"euler\"\nteacher_steps = 3\nsteps = 10\n",
        data.to_str().unwrap(),
        clf.to_str().unwrap()
    );
    let cfg = write(tmp.path(), "digits.toml", &text);
    let out = tmp.path().join("runs");
    let o = flowmatch(&["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for it in ["rf1", "rf2"] {
        let run = out.join("digits").join(it);
        let s = read_json(&run.join("summary.json"));
        let image = &s["eval"]["image"];
        assert!(image["fid"].as_f64().unwrap().is_finite(), "{s}");
        // A second real sample scores far below a 60-step model's digits.
        let fid_real = image["fid_real"].as_f64().unwrap();
        assert!(
            fid_real > 0.0 && fid_real < image["fid"].as_f64().unwrap(),
            "{s}"
        );
        assert_eq!(image["class_counts"].as_array().unwrap().len(), 10);
        assert!(s["eval"]["table"][0]["fid"].as_f64().is_some());
        // 4 step counts + real digits, 16 per row, 2 px per pixel.
        let (w, h, colours) = png_facts(&run.join("samples_grid.png"));
        assert_eq!((w, h), (110 + 16 * 60, 5 * 60 + 4));
        assert!(colours > 20, "samples grid looks blank");
    }
    // eval.every = 20: the FID-like score at steps 20, 40 and 60 (the final evaluation's), in
    // the summary and in metrics.jsonl; it falls as the base model trains.
    let run = out.join("digits").join("rf1");
    let s = read_json(&run.join("summary.json"));
    let rows = s["progress"].as_array().unwrap();
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [20, 40, 60], "{s}");
    let fid: Vec<f64> = rows.iter().map(|r| r["fid"].as_f64().unwrap()).collect();
    assert_eq!(fid[2], s["eval"]["image"]["fid"].as_f64().unwrap());
    assert!(fid[2] < fid[0], "FID did not fall while training: {fid:?}");
    let logged = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(logged.matches("\"progress\"").count(), 3);
    // Bad input: a truncated image file, then a wrong magic number, each one clear line.
    let images = data.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..1000]).unwrap();
    let o = flowmatch(&["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(
        !o.status.success()
            && e.contains("truncated")
            && e.contains("data.dir")
            && e.lines().count() == 1,
        "{e}"
    );
    let mut wrong = bytes.clone();
    wrong[3] = 0x01;
    std::fs::write(&images, &wrong).unwrap();
    let o = flowmatch(&[
        "classifier",
        "--data",
        data.to_str().unwrap(),
        "--out",
        clf.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("wrong magic number") && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn both_ot_solvers_train_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(
        tmp.path(),
        "ot.toml",
        &format!("{TINY}\n[loss]\ncoupling = \"ot\"\n"),
    );
    let mut summaries = vec![];
    for solver in ["jv", "pathfinding"] {
        let out = tmp.path().join(solver);
        let o = flowmatch(&[
            "run",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--set",
            &format!("loss.ot_solver={solver}"),
            "--set",
            "train.steps=60",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        summaries.push(read_json(&out.join("ot").join("summary.json")));
    }
    assert_eq!(summaries[0]["coupling"], "ot");
    assert_eq!(summaries[1]["coupling"], "ot-pathfinding");
    for s in summaries.iter_mut() {
        s["coupling"] = serde_json::Value::Null;
    }
    assert_eq!(summaries[0], summaries[1]);
    // An unknown solver is a one-line error naming the key.
    let o = flowmatch(&[
        "run",
        cfg.to_str().unwrap(),
        "--set",
        "loss.ot_solver=simplex",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("loss.ot_solver") && e.contains("simplex"),
        "{e}"
    );
}

/// The rows of a CSV file, as cells.
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn sweep_tables_have_axis_columns_reflow_rows_and_replicate_intervals() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "base.toml",
        &format!("{TINY}\n[reflow]\niterations = 1\nmode = \"online\"\nteacher_method = \"euler\"\nteacher_steps = 4\nsteps = 30\n"),
    );
    let sw = write(
        tmp.path(),
        "rs.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 40\n\"logging.plots\" = false\n\"eval.samples\" = 100\n[axes]\n\"model.hidden\" = [16, 24]\n[replicates]\n\"train.seed\" = [0, 1, 2]\n",
    );
    let out = tmp.path().join("out");
    let o = sweep_into(&sw, &out, &["--jobs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = out.join("rs");
    // One column per swept key (any key), one row per flow of each reflow run.
    let rows = csv_rows(&dir.join("summary.csv"));
    assert_eq!(
        &rows[0][..4],
        ["run", "model.hidden", "train.seed", "iteration"]
    );
    assert_eq!(rows.len(), 1 + 6 * 2, "{rows:?}");
    assert_eq!(&rows[1][1..4], ["16", "0", "1-RF"]);
    assert_eq!(&rows[2][1..4], ["16", "0", "2-RF"]);
    assert_eq!(&rows[12][1..4], ["24", "2", "2-RF"]);
    // The aggregate against a hand computation from the runs' own summaries.
    let w2 = |run: &str, stage: &str| {
        read_json(&dir.join(run).join(stage).join("summary.json"))["w2"]
            .as_f64()
            .unwrap()
    };
    let xs: Vec<f64> = [
        "000_hidden-16_seed-0",
        "001_hidden-16_seed-1",
        "002_hidden-16_seed-2",
    ]
    .iter()
    .map(|r| w2(r, "rf2"))
    .collect();
    let mean = xs.iter().sum::<f64>() / 3.0;
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    let half = 4.3027 * sd / 3f64.sqrt(); // t(0.975, 2)
    let agg = csv_rows(&dir.join("summary_agg.csv"));
    let col = |name: &str| agg[0].iter().position(|c| c == name).unwrap();
    let row = agg.iter().find(|r| r[0] == "16" && r[1] == "2-RF").unwrap();
    assert_eq!(row[col("n")], "3");
    let cell = |name: &str| row[col(name)].parse::<f64>().unwrap();
    assert!(
        (cell("w2_mean") - mean).abs() < 1e-5,
        "{} vs {mean}",
        cell("w2_mean")
    );
    assert!((cell("w2_std") - sd).abs() < 1e-5);
    assert!((cell("w2_ci95_lo") - (mean - half)).abs() < 1e-4);
    assert!((cell("w2_ci95_hi") - (mean + half)).abs() < 1e-4);
    // One axis of two values: the paired difference, per iteration and metric.
    let diff = csv_rows(&dir.join("summary_diff.csv"));
    assert_eq!(diff[0][..3], ["iteration", "metric", "n"]);
    // 15 metric columns, less the two this eval table lacks (W2 and MMD at 4 steps).
    assert_eq!(diff.len(), 1 + 2 * 13);
    let md = std::fs::read_to_string(dir.join("summary_agg.md")).unwrap();
    assert!(
        md.contains("t(0.975, n − 1)") && md.contains("paired by train.seed"),
        "{md}"
    );
    // sweep.png: three panels by default; `flowmatch plot SWEEP_DIR` redraws it with other
    // metrics, and an unknown metric is a one-line error that leaves the figure alone.
    let png = dir.join("sweep.png");
    let width = |p: &Path| {
        png::Decoder::new(std::fs::File::open(p).unwrap())
            .read_info()
            .unwrap()
            .info()
            .width
    };
    let three = width(&png);
    let o = flowmatch(&["plot", dir.to_str().unwrap(), "--what", "mmd"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(width(&png) * 3, three);
    let before = std::fs::read(&png).unwrap();
    let o = flowmatch(&["plot", dir.to_str().unwrap(), "--what", "w2,nope"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("`nope`") && e.lines().count() == 1,
        "{e}"
    );
    assert_eq!(std::fs::read(&png).unwrap(), before);
    // TensorBoard's HParams dashboard, as TensorBoard itself reads it: one session per row
    // (6 runs × 2 flows), with the swept values and the metrics.
    tensorboard_shows(&dir, 12, &["iteration", "model.hidden", "train.seed"]);
}

/// Asks TensorBoard (scripts/check_tensorboard_hparams.py) what its HParams dashboard shows
/// for `dir`; says skipped where TensorBoard is not installed.
fn tensorboard_shows(dir: &Path, sessions: usize, hparams: &[&str]) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_tensorboard_hparams.py");
    let o = std::process::Command::new("python3")
        .arg(&script)
        .arg(dir)
        .args(["--expect-sessions", &sessions.to_string()])
        .output();
    let o = match o {
        Ok(o)
            if o.status.code() == Some(2)
                && String::from_utf8_lossy(&o.stderr).contains("tensorboard is not installed") =>
        {
            eprintln!(
                "test tensorboard_hparams skipped: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Ok(o) => o,
        Err(e) => {
            eprintln!("test tensorboard_hparams skipped: no python3 ({e})");
            return;
        }
    };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("hparams: {}", hparams.join(", "))),
        "{out}"
    );
    assert!(
        out.contains("w2_euler_1") && out.contains(&format!("{sessions} sessions")),
        "{out}"
    );
}

#[test]
fn a_solver_axis_trains_once_per_training_config_with_the_same_summaries() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "base.toml", TINY);
    let sw = write(
        tmp.path(),
        "once.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 80\n\"logging.plots\" = false\n[axes]\n\"loss.coupling\" = [\"independent\", \"ot\"]\n\"solver.method\" = [\"euler\", \"rk4\"]\n\"eval.samples\" = [200, 150]\n",
    );
    let out = tmp.path().join("out");
    let o = sweep_into(&sw, &out, &["--jobs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = out.join("once");
    // 8 runs, 2 trainings: the other 6 name the run whose model they evaluated.
    let mut trained = vec![];
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let t = e.path().join("timing.json");
        if t.is_file() && read_json(&t)["trained_in"].is_null() {
            trained.push(e.file_name().to_string_lossy().to_string());
        }
    }
    trained.sort();
    assert_eq!(
        trained,
        [
            "000_coupling-independent_method-euler_samples-200",
            "004_coupling-ot_method-euler_samples-200"
        ]
    );
    assert_eq!(
        read_json(&dir.join("007_coupling-ot_method-rk4_samples-150/timing.json"))["trained_in"],
        "004_coupling-ot_method-euler_samples-200"
    );
    // Each reused run's summary is the one a separate training gives, byte for byte.
    for (run, sets) in [
        (
            "003_coupling-independent_method-rk4_samples-150",
            [
                "loss.coupling=independent",
                "solver.method=rk4",
                "eval.samples=150",
            ],
        ),
        (
            "005_coupling-ot_method-euler_samples-150",
            [
                "loss.coupling=ot",
                "solver.method=euler",
                "eval.samples=150",
            ],
        ),
    ] {
        let sep = tmp.path().join("sep");
        let base = tmp.path().join("base.toml");
        let mut args: Vec<String> = vec![
            "run".into(),
            base.to_str().unwrap().into(),
            "--out".into(),
            sep.to_str().unwrap().into(),
        ];
        for s in sets
            .iter()
            .chain(&["train.steps=80", "logging.plots=false"])
        {
            args.push("--set".into());
            args.push(s.to_string());
        }
        args.push("--set".into());
        args.push(format!("name={run}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = flowmatch(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            std::fs::read(sep.join(run).join("summary.json")).unwrap(),
            std::fs::read(dir.join(run).join("summary.json")).unwrap(),
            "{run}"
        );
    }
    // Killed and rerun: nothing is redone.
    let o = sweep_into(&sw, &out, &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 ran, 8 already finished"));
    // Without reflow, sweep.png has the first axis along x; TensorBoard shows every run.
    assert!(dir.join("sweep.png").is_file());
    tensorboard_shows(&dir, 8, &["eval.samples", "loss.coupling", "solver.method"]);
}

#[test]
fn a_sweep_of_method_variants_trains_meanflow_and_shortcut_and_reports_nll_and_sde_rows() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "base.toml", TINY);
    let sw = write(
        tmp.path(),
        "methods.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 60\n\"logging.plots\" = false\n\"eval.samples\" = 100\n\"eval.nll_samples\" = 50\n\"eval.sde_gammas\" = [0.5]\n\"eval.sde_steps\" = 20\n[variants.cfm]\n[variants.meanflow]\n\"loss.objective\" = \"meanflow\"\n[variants.shortcut]\n\"loss.objective\" = \"shortcut\"\n\"loss.shortcut_steps\" = 16\n[replicates]\n\"train.seed\" = [0, 1]\n",
    );
    let out = tmp.path().join("out");
    let o = sweep_into(&sw, &out, &["--jobs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = out.join("methods");
    // The variants are one axis, named in file order.
    let rows = csv_rows(&dir.join("summary.csv"));
    assert_eq!(&rows[0][..3], ["run", "variant", "train.seed"]);
    let variants: Vec<&str> = rows[1..].iter().map(|r| r[1].as_str()).collect();
    assert_eq!(
        variants,
        ["cfm", "cfm", "meanflow", "meanflow", "shortcut", "shortcut"]
    );
    for (run, objective) in [
        ("000_variant-cfm_seed-0", None),
        ("002_variant-meanflow_seed-0", Some("meanflow")),
        ("004_variant-shortcut_seed-0", Some("shortcut")),
    ] {
        let s = read_json(&dir.join(run).join("summary.json"));
        assert_eq!(s["objective"].as_str(), objective, "{run}");
        // The likelihood of 50 real points, and a stochastic row beside the ODE rows.
        let nll = &s["eval"]["nll"];
        assert_eq!(nll["samples"], 50, "{run}");
        assert_eq!(nll["divergence"], "exact");
        let nats = nll["nats"].as_f64().unwrap();
        assert!(
            nats.is_finite() && nats > -5.0 && nats < 20.0,
            "{run}: NLL {nats}"
        );
        let sde = s["eval"]["table"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["solver"] == "em-g0.5")
            .unwrap_or_else(|| panic!("{run}: no em-g0.5 row"));
        assert_eq!(sde["steps"], 20);
        assert!(sde["w2"].as_f64().unwrap().is_finite());
    }
    // The span models' config records the objective; their checkpoints load back with it.
    let cfg = std::fs::read_to_string(dir.join("002_variant-meanflow_seed-0/config.toml")).unwrap();
    assert!(cfg.contains("objective = \"meanflow\""), "{cfg}");
    // The aggregate has the NLL and few-step columns, one row per variant.
    let agg = csv_rows(&dir.join("summary_agg.csv"));
    let col = |name: &str| {
        agg[0]
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("{name}: {:?}", agg[0]))
    };
    assert_eq!(agg.len(), 4);
    for r in &agg[1..] {
        assert!(r[col("nll_mean")].parse::<f64>().unwrap().is_finite());
        assert!(r[col("mmd_euler_1_mean")].parse::<f64>().unwrap() >= 0.0);
    }
    // One panel per variant at 1 NFE (the first seed).
    let o = flowmatch(&["plot", dir.to_str().unwrap(), "--what", "samples"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, colours) = png_facts(&dir.join("samples_nfe1.png"));
    assert_eq!((w, h), (3 * 360, 360));
    assert!(colours > 10);
    // Bad variants and objective settings: one line naming what is wrong.
    let bad = write(
        tmp.path(),
        "bad.toml",
        "base = \"base.toml\"\n[variants]\nmeanflow = 3\n",
    );
    let o = sweep_into(&bad, &out, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("variant 'meanflow' must be a table"),
        "{}",
        stderr(&o)
    );
    let cfgp = write(tmp.path(), "tiny.toml", TINY);
    let o = flowmatch(&[
        "run",
        cfgp.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "loss.objective=shortcut",
        "--set",
        "loss.shortcut_steps=12",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("loss.shortcut_steps") && e.contains("power of two"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn a_metric_added_through_the_registry_reaches_summary_table_and_tensorboard() {
    // 1-NN two-sample accuracy: one entry of experiments/src/metrics.rs, asked for by name.
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "base.toml", TINY);
    let sw = write(
        tmp.path(),
        "nn.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 60\n\"logging.plots\" = false\n\"eval.metrics\" = [\"nn_accuracy\"]\n[axes]\n\"loss.coupling\" = [\"independent\", \"ot\"]\n",
    );
    let out = tmp.path().join("out");
    let o = sweep_into(&sw, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = out.join("nn");
    let s = read_json(&dir.join("000_coupling-independent/summary.json"));
    let acc = s["eval"]["extra"]["nn_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    let rows = csv_rows(&dir.join("summary.csv"));
    let col = rows[0].iter().position(|h| h == "nn_accuracy").unwrap();
    // Each swept key shows once: no `coupling` column beside the `loss.coupling` axis.
    assert!(rows[0].contains(&"loss.coupling".to_string()));
    assert!(!rows[0].contains(&"coupling".to_string()), "{:?}", rows[0]);
    assert!(rows[1][col].parse::<f64>().unwrap() == acc);
    let events: Vec<u8> = std::fs::read_dir(dir.join("000_coupling-independent"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.out"))
        .flat_map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert!(events.windows(16).any(|w| w == b"eval/nn_accuracy"));
    // The figure takes it by name, with its registry title.
    let o = flowmatch(&["plot", dir.to_str().unwrap(), "--what", "nn_accuracy"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Not asked for: no column (a column no run has is left out), and the summary keeps its
    // bytes (no `extra`).
    let plain = write(
        tmp.path(),
        "plain.toml",
        "base = \"base.toml\"\n[set]\n\"train.steps\" = 60\n\"logging.plots\" = false\n[axes]\n\"loss.coupling\" = [\"independent\"]\n",
    );
    let o = sweep_into(&plain, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv_rows(&out.join("plain/summary.csv"));
    assert!(!rows[0].iter().any(|h| h == "nn_accuracy"), "{:?}", rows[0]);
    let text =
        std::fs::read_to_string(out.join("plain/000_coupling-independent/summary.json")).unwrap();
    assert!(!text.contains("extra"));
    // A name the registry cannot measure is a one-line error naming the key.
    let cfg = write(tmp.path(), "t.toml", TINY);
    let o = flowmatch(&[
        "run",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "eval.metrics=[\"w2\"]",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.starts_with("error: eval.metrics:") && e.contains("nn_accuracy"),
        "{e}"
    );
}

/// `flowmatch run configs/conditional_8gaussians.toml` with 400 training steps, 400 evaluation
/// samples, no figures and no TensorBoard, and `sets`, into `out`.
fn tiny_conditional_run(out: &Path, sets: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "../configs/conditional_8gaussians.toml"];
    let base = [
        "train.steps=400",
        "eval.samples=400",
        "logging.plots=false",
        "logging.tensorboard=false",
    ];
    for s in base.iter().chain(sets) {
        args.extend(["--set", s]);
    }
    args.extend(["--out", out.to_str().unwrap()]);
    flowmatch(&args)
}

#[test]
fn a_tiny_conditional_training_lands_samples_in_the_class_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = tiny_conditional_run(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("conditional_8gaussians/summary.json")).unwrap(),
    )
    .unwrap();
    let extra = &s["eval"]["extra"];
    let acc = extra["class_accuracy"].as_f64().unwrap();
    // Chance is 1/8; the unconditional samples (w = 0) land in the asked class by chance only.
    assert!(acc > 0.8, "class accuracy {acc}");
    let uncond = extra["class_accuracy_guidance_0"].as_f64().unwrap();
    assert!(uncond < 0.35, "unconditional class accuracy {uncond}");
    assert!(extra["class_w2"].as_f64().unwrap() > 0.0);
    assert_eq!(s["coupling"], "ot-within-class");
    // Conditioning keys on a model without classes, and classes on a target without labels,
    // are one-line errors naming the key.
    let cases: &[(&[&str], &str)] = &[
        (&["model.classes=0"], "eval.guidance"),
        (&["model.classes=0", "eval.guidance=[]"], "loss.label_drop"),
        (&["data.target=spiral"], "data.target"),
        (&["model.classes=3"], "model.classes"),
        (&["solver.guidance=-1"], "solver.guidance"),
        (&["loss.label_drop=1.0"], "loss.label_drop"),
        (&["loss.coupling=independent"], "loss.ot_within_class"),
        (&["reflow.guidance=-0.5"], "reflow.guidance"),
    ];
    for (sets, key) in cases {
        let mut args = vec!["run", "../configs/conditional_8gaussians.toml"];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let bad = tmp.path().join("bad");
        args.extend(["--out", bad.to_str().unwrap()]);
        let o = flowmatch(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{sets:?} succeeded");
        assert!(
            err.starts_with(&format!("error: {key}:")),
            "{sets:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // The teacher's guidance of a conditional reflow, on an unconditional model.
    let o = flowmatch(&[
        "run",
        "../configs/lesson_moons.toml",
        "--set",
        "reflow.guidance=2.0",
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.starts_with("error: reflow.guidance:"),
        "{err}"
    );
}

/// Conditional reflow: the student trains on the teacher's pairs with their labels, and its
/// one-step samples still land in the class asked for.
#[test]
fn a_conditional_reflow_keeps_its_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let sets = [
        "reflow.iterations=1",
        "reflow.steps=300",
        "reflow.teacher_steps=4",
        "reflow.guidance=1.5",
        "eval.guidance=[]",
    ];
    let o = tiny_conditional_run(&out, &sets);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |f: &str| -> serde_json::Value {
        let p = out.join("conditional_8gaussians").join(f);
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let rf2 = read("rf2/summary.json");
    let acc = rf2["eval"]["extra"]["class_accuracy_euler_1"]
        .as_f64()
        .unwrap();
    assert!(acc > 0.8, "2-RF's class accuracy at one step: {acc}");
    let config = std::fs::read_to_string(out.join("conditional_8gaussians/rf2/config.toml"));
    assert!(config.unwrap().contains("guidance = 1.5"));
}

/// Entropic couplings end to end: a Sinkhorn run gives the same bytes with and without the
/// prefetch thread; a short SB-CFM training with a score head lowers W2 and samples by its
/// learned score; bad entropic keys are one-line errors naming the key.
#[test]
fn sinkhorn_and_the_schrodinger_bridge_train_and_bad_keys_name_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, sets: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["run", "../configs/lesson_moons.toml"];
        let base = [
            "train.batch_size=128",
            "eval.samples=500",
            "eval.steps=[1, 100]",
            "logging.plots=false",
            "logging.tensorboard=false",
        ];
        for s in base.iter().chain(sets) {
            args.extend(["--set", s]);
        }
        args.extend(["--out", out.to_str().unwrap()]);
        let o = flowmatch(&args);
        (o, out.join("lesson_moons"))
    };
    let summary = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
    };
    let sink = [
        "train.steps=150",
        "loss.coupling=sinkhorn",
        "loss.ot_reg=0.1",
    ];
    let (a, da) = run("sink", &sink);
    assert!(a.status.success(), "{}", stderr(&a));
    let mut off = sink.to_vec();
    off.push("train.prefetch=false");
    let (b, db) = run("sink-serial", &off);
    assert!(b.status.success(), "{}", stderr(&b));
    assert_eq!(
        std::fs::read(da.join("summary.json")).unwrap(),
        std::fs::read(db.join("summary.json")).unwrap()
    );
    assert_eq!(summary(&da)["coupling"], "sinkhorn-eps0.1");
    // A cap of one iteration cannot converge: the run warns once, with the error reached.
    let (c, _) = run(
        "capped",
        &[
            "train.steps=5",
            "loss.coupling=sinkhorn",
            "loss.ot_max_iter=1",
        ],
    );
    assert!(c.status.success(), "{}", stderr(&c));
    let warn = stderr(&c);
    assert!(
        warn.contains("warning: lesson_moons: Sinkhorn stopped at its cap"),
        "{warn}"
    );
    // SB-CFM with a score head: W2 falls with training, and the SDE row samples by the head.
    let sb = [
        "loss.coupling=schrodinger-bridge",
        "loss.sigma=0.5",
        "model.score=true",
        "eval.sde_gammas=[0.5]",
    ];
    let w2 = |steps: &str| {
        let mut s = sb.to_vec();
        s.push(steps);
        let (o, dir) = run(steps, &s);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = summary(&dir);
        assert_eq!(s["coupling"], "schrodinger-bridge-sigma0.5");
        let sde = s["eval"]["table"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["solver"] == "em-g0.5")
            .map(|r| r["w2"].as_f64().unwrap())
            .unwrap();
        (s["w2"].as_f64().unwrap(), sde)
    };
    let (w2_start, _) = w2("train.steps=1");
    let (w2_end, sde_end) = w2("train.steps=600");
    assert!(w2_end < 0.5 * w2_start, "W2 {w2_start} -> {w2_end}");
    assert!(
        sde_end < 0.5 * w2_start,
        "SDE W2 {sde_end} (start {w2_start})"
    );
    // Bad input: one line that names the key.
    let cases: &[(&[&str], &str)] = &[
        (&["loss.coupling=sinkhorn", "loss.ot_reg=0"], "loss.ot_reg"),
        (
            &["loss.coupling=sinkhorn", "loss.ot_reg=nan"],
            "loss.ot_reg",
        ),
        (
            &["loss.coupling=sinkhorn", "loss.ot_max_iter=0"],
            "loss.ot_max_iter",
        ),
        (
            &["loss.coupling=schrodinger-bridge", "loss.sigma=-0.1"],
            "loss.sigma",
        ),
        (&["model.score=true"], "model.score"),
        (
            &["loss.coupling=schrodinger-bridge", "eval.sde_gammas=[0.5]"],
            "eval.sde_gammas",
        ),
        (
            &["loss.coupling=schrodinger-bridge", "loss.path=cosine"],
            "loss.path",
        ),
        (&["loss.ot_draw=sideways"], "loss.ot_draw"),
        (
            &["loss.coupling=schrodinger-bridge", "reflow.iterations=1"],
            "reflow.iterations",
        ),
    ];
    for (sets, key) in cases {
        let (o, _) = run("bad", sets);
        let err = stderr(&o);
        assert!(!o.status.success(), "{sets:?} succeeded");
        assert!(
            err.starts_with(&format!("error: {key}:")),
            "{sets:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
