//! Run-folder writers: metrics.jsonl, TensorBoard events, atomic JSON files.

use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use tensorboard_rs::summary_writer::SummaryWriter;

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension()
            .map(|e| e.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Pretty JSON with a trailing newline, written atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut s = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// The scalar logs of one run: one JSON object per line plus TensorBoard scalars.
pub struct RunLog {
    jsonl: BufWriter<File>,
    tb: Option<SummaryWriter>,
}

impl RunLog {
    /// Opens `metrics.jsonl` (and a TensorBoard event file) in `dir`.
    pub fn create(dir: &Path, tensorboard: bool) -> std::io::Result<Self> {
        let jsonl = BufWriter::new(File::create(dir.join("metrics.jsonl"))?);
        let tb = tensorboard.then(|| SummaryWriter::new(dir));
        Ok(Self { jsonl, tb })
    }

    /// Appends a record to metrics.jsonl, flushed so that a running job can be followed.
    pub fn record(&mut self, value: &serde_json::Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.jsonl, value).map_err(std::io::Error::other)?;
        self.jsonl.write_all(b"\n")?;
        self.jsonl.flush()
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
