//! Helpers shared by the end-to-end tests: the binary, a tiny config, file walks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_flowmatch");

/// A tiny but real config: 150 training steps, 200 eval samples.
pub const TINY: &str = r#"
[model]
kind = "velocity-mlp"
hidden = 32
layers = 2
[train]
steps = 150
batch_size = 64
lr = 3e-3
checkpoint_every = 50
[eval]
samples = 200
steps = [1, 10]
methods = ["euler", "rk4-warp"]
[logging]
every = 5
"#;

pub fn flowmatch(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("FLOWMATCH_TRAIN__CHECKPOINT_EVERY", "50")
        .output()
        .expect("runs flowmatch")
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A JSON file the binary wrote.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn files_under(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    walk(dir).len()
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Runs `flowmatch sweep SWEEP --out OUT EXTRA…`.
pub fn sweep_into(sweep: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "sweep",
        sweep.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    flowmatch(&args)
}
