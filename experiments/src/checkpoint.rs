//! Checkpoints: `model.safetensors` (the weights a run evaluates) and `resume.safetensors`
//! (everything training needs to continue after a kill: live weights, weight average, Adam
//! moments, the step, the RNG, the recent losses and the progress scores). A rerun of the same
//! command continues from the last checkpoint, and on the CPU it ends with the same bytes as a
//! run that was never interrupted.

use crate::logging::write_atomic;
use crate::report::ProgressRow;
use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use flowmatch_data::Rng;
use flowmatch_losses::TrainerState;
use flowmatch_models::Model;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The resume file's name in a run folder.
pub const RESUME_FILE: &str = "resume.safetensors";
/// The metadata key of [`ResumeInfo`] inside the resume file.
const INFO_KEY: &str = "flowmatch.resume";

/// The exact state of a ChaCha RNG: seed, stream and position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, hex.
    pub seed: String,
    pub stream: u64,
    /// Position in 32-bit words (a u128, as a decimal string).
    pub word_pos: String,
}

impl RngState {
    /// Where `rng` stands.
    pub fn of(rng: &Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// An RNG standing exactly there.
    pub fn to_rng(&self) -> Result<Rng> {
        let bad = || anyhow!("resume file: malformed RNG state");
        if self.seed.len() != 64 {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let mut rng = Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().map_err(|_| bad())?);
        Ok(rng)
    }
}

/// The counters and small state stored beside the tensors. Floats are kept as their bit
/// patterns: a JSON round trip may move a float's last digit, and a resumed run must give
/// exactly the numbers of an uninterrupted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeInfo {
    /// The fingerprint of the config that wrote it ([`crate::config::Config::fingerprint`]):
    /// a resume file copied from another run is refused.
    #[serde(default)]
    pub config: Option<String>,
    /// Training steps done.
    pub step: usize,
    /// The optimiser's step count.
    pub adam_step: usize,
    /// The training RNG as it stands after `step`.
    pub rng: RngState,
    /// The last (up to 100) losses, for `final_loss` (`f32::to_bits`).
    recent_loss_bits: Vec<u32>,
    /// The progress scores so far (`eval.every`).
    progress_bits: Vec<ProgressBits>,
}

/// A [`ProgressRow`] with its floats as `f64::to_bits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProgressBits {
    step: usize,
    w2: u64,
    mmd: u64,
    fid: Option<u64>,
}

impl ResumeInfo {
    /// The state after `step` of the run whose config has `fingerprint`.
    pub fn new(
        fingerprint: String,
        step: usize,
        adam_step: usize,
        rng: RngState,
        recent_losses: &[f32],
        progress: &[ProgressRow],
    ) -> Self {
        Self {
            config: Some(fingerprint),
            step,
            adam_step,
            rng,
            recent_loss_bits: recent_losses.iter().map(|l| l.to_bits()).collect(),
            progress_bits: progress
                .iter()
                .map(|r| ProgressBits {
                    step: r.step,
                    w2: r.w2.to_bits(),
                    mmd: r.mmd.to_bits(),
                    fid: r.fid.map(f64::to_bits),
                })
                .collect(),
        }
    }

    /// The recent losses, exactly.
    pub fn recent_losses(&self) -> Vec<f32> {
        self.recent_loss_bits
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect()
    }

    /// The progress scores, exactly.
    pub fn progress(&self) -> Vec<ProgressRow> {
        self.progress_bits
            .iter()
            .map(|r| ProgressRow {
                step: r.step,
                w2: f64::from_bits(r.w2),
                mmd: f64::from_bits(r.mmd),
                fid: r.fid.map(f64::from_bits),
            })
            .collect()
    }
}

/// Serializes named tensors (and string metadata) as a safetensors file image.
fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(
        cpu.iter().map(|(n, t)| (n.as_str(), t)),
        meta,
    )?)
}

/// Writes a model's weights atomically (PyTorch-style names, mode 0644 like every other file).
pub fn save_model(model: &Model, path: &Path) -> Result<()> {
    save_params(&model.params, path)
}

/// Writes parameters as safetensors, atomically.
pub fn save_params(params: &flowmatch_models::Params, path: &Path) -> Result<()> {
    let named: Vec<(String, Tensor)> = params
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    write_atomic(path, &safetensors_bytes(&named, None)?)?;
    Ok(())
}

/// Writes the resume file atomically.
pub fn save_resume(path: &Path, state: &TrainerState, info: &ResumeInfo) -> Result<()> {
    let meta = HashMap::from([(INFO_KEY.to_string(), serde_json::to_string(info)?)]);
    write_atomic(path, &safetensors_bytes(&state.tensors, Some(meta))?)?;
    Ok(())
}

/// Reads a resume file onto `device`.
pub fn load_resume(path: &Path, device: &Device) -> Result<(TrainerState, ResumeInfo)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = |m: String| anyhow!("{}: {m}; remove it to start the run afresh", path.display());
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let info: ResumeInfo = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(INFO_KEY))
        .ok_or_else(|| bad("not a flowmatch resume file".into()))
        .and_then(|s| serde_json::from_str(s).map_err(|e| bad(e.to_string())))?;
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(e.to_string()))?
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((
        TrainerState {
            steps_done: info.step,
            adam_step: info.adam_step,
            tensors,
        },
        info,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng as _;

    #[test]
    fn rng_state_round_trips_mid_stream() {
        let mut rng = flowmatch_data::rng_from_seed(42);
        for _ in 0..37 {
            rng.random::<u32>();
        }
        let saved = RngState::of(&rng);
        let mut back = saved.to_rng().unwrap();
        let a: Vec<u64> = (0..50).map(|_| rng.random()).collect();
        let b: Vec<u64> = (0..50).map(|_| back.random()).collect();
        assert_eq!(a, b);
        let broken = RngState {
            seed: "zz".into(),
            ..saved
        };
        assert!(broken.to_rng().is_err());
    }

    #[test]
    fn resume_file_round_trips_tensors_and_info() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(RESUME_FILE);
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let state = TrainerState {
            steps_done: 7,
            adam_step: 7,
            tensors: vec![("live/w".into(), t.clone()), ("adam_m/w".into(), t)],
        };
        // Floats whose decimal forms do not survive every JSON parser exactly.
        let losses = [0.142_406_97_f32, 0.1, 1e-7, f32::MIN_POSITIVE];
        let rows = [ProgressRow {
            step: 5,
            w2: 0.142_406_970_262_527_47,
            mmd: 1.0 / 3.0,
            fid: Some(std::f64::consts::PI),
        }];
        let info = ResumeInfo::new(
            "0123".into(),
            7,
            7,
            RngState::of(&flowmatch_data::rng_from_seed(1)),
            &losses,
            &rows,
        );
        save_resume(&p, &state, &info).unwrap();
        let (s, i) = load_resume(&p, &Device::Cpu).unwrap();
        assert_eq!(i, info);
        assert_eq!(i.recent_losses(), losses);
        assert_eq!(i.progress(), rows);
        assert_eq!(s.tensors.len(), 2);
        assert_eq!(s.tensors[1].0, "live/w");
        assert_eq!(
            s.tensors[1].1.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        std::fs::write(&p, b"garbage").unwrap();
        let e = load_resume(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains(RESUME_FILE) && e.contains("afresh"), "{e}");
    }
}
