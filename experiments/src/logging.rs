//! Run-folder writers: metrics.jsonl, TensorBoard events, atomic files.

use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tensorboard_rs::summary_writer::SummaryWriter;

/// A temporary name beside `path`, unique to this process and call, so that two writers of
/// one file (two shards writing `plan.json`, say) never share it: `.NAME.PID-N.tmp.EXT`
/// (the extension stays last, since the figure writers pick the format from it).
pub fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{n}.tmp{ext}", std::process::id()))
}

/// Whether `name` is one of [`temp_path`]'s names (left behind by a killed writer).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp")
}

/// The same error, its message prefixed with what was being written.
fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
}

/// Writes `path` atomically: `fill` writes a unique temporary file beside it, which is then
/// renamed over `path`. On any failure the temporary file is removed and the error names
/// `path`; `path` itself is never left half-written.
pub fn atomically(
    path: &Path,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = temp_path(path);
    let done = fill(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(Into::into));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::anyhow!("writing {}: {e:#}", path.display()));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (a unique temporary file in the same folder, synced,
/// then renamed); on failure nothing is left behind and the error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let done = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(at(path, e));
    }
    Ok(())
}

/// Pretty JSON with a trailing newline, written atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut s = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Removes the TensorBoard event files of `dir`.
pub fn remove_event_files(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The scalar logs of one run: one JSON object per line plus TensorBoard scalars.
pub struct RunLog {
    jsonl: BufWriter<File>,
    tb: Option<SummaryWriter>,
}

impl RunLog {
    /// Opens `metrics.jsonl` (and a TensorBoard event file) in `dir`, empty.
    pub fn create(dir: &Path, tensorboard: bool) -> std::io::Result<Self> {
        let path = dir.join("metrics.jsonl");
        // A new file, never through a link left in its place.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(at(&path, e)),
            _ => {}
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| at(&path, e))?;
        let jsonl = BufWriter::new(file);
        let tb = tensorboard.then(|| SummaryWriter::new(dir));
        Ok(Self { jsonl, tb })
    }

    /// Reopens the logs of a run resumed after `step` of `last`: `metrics.jsonl` keeps its
    /// training records up to `step` (later ones came from the interrupted attempt, and so do
    /// the eval stage's: the evaluation record and the progress row of step `last`), and a
    /// fresh TensorBoard file gets their scalars again, so that neither holds a step twice.
    pub fn resume(
        dir: &Path,
        tensorboard: bool,
        step: usize,
        last: usize,
    ) -> std::io::Result<Self> {
        let path = dir.join("metrics.jsonl");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        // The lines are kept as they were written (a JSON round trip may move a float's last
        // digit), so the log of a resumed run equals that of an uninterrupted one.
        let kept: Vec<(&str, serde_json::Value)> = old
            .lines()
            .filter_map(|l| Some((l, serde_json::from_str::<serde_json::Value>(l).ok()?)))
            .filter(|(_, v)| {
                let at = v.get("step").and_then(|s| s.as_u64());
                let from_eval_stage = v.get("eval").is_some()
                    || (v.get("progress").is_some() && at == Some(last as u64));
                !from_eval_stage && at.is_some_and(|s| s <= step as u64)
            })
            .collect();
        remove_event_files(dir);
        let mut log = Self::create(dir, tensorboard)?;
        for (line, v) in &kept {
            log.raw(line)?;
            let step = v["step"].as_u64().unwrap_or(0) as usize;
            if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
                log.scalar("train/loss", l, step);
            }
            if let Some(p) = v.get("progress") {
                for key in ["w2", "mmd", "fid"] {
                    if let Some(x) = p.get(key).and_then(|x| x.as_f64()) {
                        log.scalar(&format!("progress/{key}"), x, step);
                    }
                }
            }
        }
        Ok(log)
    }

    /// Appends a record to metrics.jsonl, flushed so that a running job can be followed.
    pub fn record(&mut self, value: &serde_json::Value) -> std::io::Result<()> {
        let write = |w: &mut BufWriter<File>| -> std::io::Result<()> {
            serde_json::to_writer(&mut *w, value).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
            w.flush()
        };
        write(&mut self.jsonl)
            .map_err(|e| std::io::Error::new(e.kind(), format!("writing metrics.jsonl: {e}")))
    }

    /// Appends a line to metrics.jsonl as it is.
    fn raw(&mut self, line: &str) -> std::io::Result<()> {
        self.jsonl.write_all(line.as_bytes())?;
        self.jsonl.write_all(b"\n")
    }

    /// Logs a scalar to TensorBoard.
    pub fn scalar(&mut self, tag: &str, value: f64, step: usize) {
        if let Some(tb) = self.tb.as_mut() {
            if value.is_finite() {
                tb.add_scalar(tag, value as f32, step);
            }
        }
    }

    /// Flushes metrics.jsonl and closes the event file (tensorboard-rs only writes
    /// everything when its writer thread is stopped, i.e. on drop).
    pub fn close(mut self) -> std::io::Result<()> {
        self.jsonl.flush()?;
        if let Some(tb) = self.tb.take() {
            drop(tb);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temporary_names_are_unique_and_keep_the_extension() {
        let p = Path::new("/x/plan.json");
        let (a, b) = (temp_path(p), temp_path(p));
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.starts_with(".plan.json.") && name.ends_with(".tmp.json"),
            "{name}"
        );
        assert!(is_temp_name(&name));
        assert!(!is_temp_name("plan.json"));
    }

    #[test]
    fn a_failed_write_names_the_path_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        // The rename fails late, after the temporary file was written: the target is a folder.
        let target = tmp.path().join("summary.json");
        std::fs::create_dir(&target).unwrap();
        let e = write_atomic(&target, b"{}").unwrap_err().to_string();
        assert!(e.contains("summary.json"), "{e}");
        assert_eq!(names(tmp.path()), vec!["summary.json"]);
        // The same for a figure writer that fails half-way.
        let png = tmp.path().join("flow.png");
        let e = atomically(&png, |t| {
            std::fs::write(t, b"half a picture")?;
            Err(anyhow::anyhow!("out of space"))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("flow.png") && e.contains("out of space"), "{e}");
        assert_eq!(names(tmp.path()), vec!["summary.json"]);
        // A folder that does not exist.
        let e = write_atomic(&tmp.path().join("no/such/x.json"), b"{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no/such/x.json"), "{e}");
        // And a good write leaves exactly the file.
        write_atomic(&tmp.path().join("a.json"), b"{}").unwrap();
        assert_eq!(names(tmp.path()), vec!["a.json", "summary.json"]);
    }

    #[test]
    fn resumed_logs_keep_records_up_to_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = RunLog::create(tmp.path(), false).unwrap();
        for step in [10, 20, 30] {
            log.record(&serde_json::json!({"step": step, "loss": 1.0}))
                .unwrap();
        }
        log.close().unwrap();
        let mut log = RunLog::resume(tmp.path(), false, 20, 30).unwrap();
        log.record(&serde_json::json!({"step": 30, "loss": 0.5}))
            .unwrap();
        log.close().unwrap();
        let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![10, 20, 30]);
        assert!(text.lines().last().unwrap().contains("0.5"));
    }

    #[test]
    fn a_resume_at_the_last_step_drops_the_eval_stage_records() {
        // Killed after the evaluation reached metrics.jsonl, before summary.json: the rerun
        // evaluates again, so the first attempt's eval records must go.
        let tmp = tempfile::tempdir().unwrap();
        let mut log = RunLog::create(tmp.path(), false).unwrap();
        log.record(&serde_json::json!({"step": 20, "loss": 1.0}))
            .unwrap();
        log.record(&serde_json::json!({"step": 20, "progress": {"w2": 1.0}}))
            .unwrap();
        log.record(&serde_json::json!({"step": 30, "loss": 0.5}))
            .unwrap();
        log.record(&serde_json::json!({"step": 30, "progress": {"w2": 0.5}}))
            .unwrap();
        log.record(&serde_json::json!({"step": 30, "eval": {"w2": 0.5}}))
            .unwrap();
        log.close().unwrap();
        RunLog::resume(tmp.path(), false, 30, 30)
            .unwrap()
            .close()
            .unwrap();
        let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        assert_eq!(
            text,
            "{\"loss\":1.0,\"step\":20}\n{\"progress\":{\"w2\":1.0},\"step\":20}\n{\"loss\":0.5,\"step\":30}\n"
        );
    }
}
