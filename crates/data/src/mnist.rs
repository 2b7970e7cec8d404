//! MNIST digits through `candle_datasets::vision::mnist`, as a [`Sampler`] of flattened
//! 28×28 images scaled to `[-1, 1]` (the lesson's `Normalize([0.5], [0.5])`).

use crate::{DataError, Rng, Sampler};
use candle_core::{DType, Device, Tensor};
use rand::Rng as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The IDX files `load_dir` reads, with their magic numbers.
pub const IDX_FILES: [(&str, u32); 4] = [
    ("train-images-idx3-ubyte", 2051),
    ("train-labels-idx1-ubyte", 2049),
    ("t10k-images-idx3-ubyte", 2051),
    ("t10k-labels-idx1-ubyte", 2049),
];

/// Image side and pixel count.
pub const SIDE: usize = 28;
/// Pixels per digit.
pub const PIXELS: usize = SIDE * SIDE;

fn bad(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Mnist {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Checks one IDX file's magic number and that its length matches its header, so a missing,
/// truncated or foreign file is a clear error rather than a short read deep inside candle.
pub fn check_idx(path: &Path, magic: u32) -> Result<usize, DataError> {
    let mut f = std::fs::File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let len = f.metadata().map_err(|e| bad(path, e.to_string()))?.len() as usize;
    let dims = if magic == 2051 { 3 } else { 1 };
    let mut head = vec![0u8; 4 * (1 + dims)];
    f.read_exact(&mut head).map_err(|_| {
        bad(
            path,
            format!("truncated: {len} bytes, shorter than the IDX header"),
        )
    })?;
    let word = |i: usize| {
        u32::from_be_bytes([
            head[4 * i],
            head[4 * i + 1],
            head[4 * i + 2],
            head[4 * i + 3],
        ]) as usize
    };
    if word(0) as u32 != magic {
        return Err(bad(
            path,
            format!(
                "wrong magic number {} (expected {magic}: not an MNIST {} file)",
                word(0),
                if magic == 2051 { "image" } else { "label" }
            ),
        ));
    }
    let n = word(1);
    let per = if magic == 2051 { word(2) * word(3) } else { 1 };
    if magic == 2051 && (word(2), word(3)) != (SIDE, SIDE) {
        return Err(bad(
            path,
            format!("images are {}x{}, expected 28x28", word(2), word(3)),
        ));
    }
    let want = head.len() + n * per;
    if len < want {
        return Err(bad(
            path,
            format!("truncated: {len} bytes, the header promises {want}"),
        ));
    }
    Ok(n)
}

/// MNIST in memory: images in `[-1, 1]`, one row of 784 per digit, and labels.
#[derive(Debug)]
pub struct Mnist {
    pub train_images: Vec<f32>,
    pub train_labels: Vec<u8>,
    pub test_images: Vec<f32>,
    pub test_labels: Vec<u8>,
    /// Where the digits came from (a folder, or "hub").
    pub origin: String,
    /// The training images as one `(len, 784)` tensor on an accelerator, copied there once by
    /// the first batch drawn for it ([`MnistSampler`] gathers batches there).
    on_device: Mutex<Option<Tensor>>,
}

impl Mnist {
    /// Loads the four IDX files from `dir` with `candle_datasets::vision::mnist::load_dir`,
    /// after checking each; `dir = "hub"` downloads MNIST from the Hugging Face hub instead.
    pub fn load(dir: &str) -> Result<Self, DataError> {
        let ds = if dir == "hub" {
            candle_datasets::vision::mnist::load()
                .map_err(|e| bad(Path::new("hub"), format!("download failed: {e}")))?
        } else {
            let root = PathBuf::from(dir);
            if !root.is_dir() {
                return Err(bad(
                    &root,
                    "no such folder (run scripts/fetch-mnist.sh to get the digits)",
                ));
            }
            let mut counts = vec![];
            for (name, magic) in IDX_FILES {
                counts.push(check_idx(&root.join(name), magic)?);
            }
            for (imgs, labels, name) in [
                (counts[0], counts[1], "train"),
                (counts[2], counts[3], "t10k"),
            ] {
                if imgs != labels {
                    return Err(bad(
                        &root,
                        format!("{name}: {imgs} images but {labels} labels"),
                    ));
                }
            }
            candle_datasets::vision::mnist::load_dir(&root)?
        };
        let images = |t: &Tensor| -> Result<Vec<f32>, DataError> {
            Ok(t.to_dtype(DType::F32)?
                .affine(2.0, -1.0)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let labels = |t: &Tensor| -> Result<Vec<u8>, DataError> {
            Ok(t.to_dtype(DType::U8)?.to_vec1::<u8>()?)
        };
        let m = Self {
            train_images: images(&ds.train_images)?,
            train_labels: labels(&ds.train_labels)?,
            test_images: images(&ds.test_images)?,
            test_labels: labels(&ds.test_labels)?,
            origin: dir.to_string(),
            on_device: Mutex::new(None),
        };
        if m.train_labels.is_empty() {
            return Err(bad(Path::new(dir), "the training set is empty"));
        }
        for (labels, file) in [
            (&m.train_labels, "train-labels-idx1-ubyte"),
            (&m.test_labels, "t10k-labels-idx1-ubyte"),
        ] {
            if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l > 9) {
                return Err(bad(
                    &Path::new(dir).join(file),
                    format!("label {l} at position {i} is not a digit 0-9"),
                ));
            }
        }
        Ok(m)
    }

    /// Number of training digits.
    pub fn len(&self) -> usize {
        self.train_labels.len()
    }

    /// Whether there are no training digits.
    pub fn is_empty(&self) -> bool {
        self.train_labels.is_empty()
    }

    /// Test digits `[lo, hi)` as an `(n, 784)` tensor and their labels.
    pub fn test_batch(&self, n: usize, device: &Device) -> Result<(Tensor, Vec<u8>), DataError> {
        let n = n.min(self.test_labels.len());
        let x = Tensor::from_slice(&self.test_images[..n * PIXELS], (n, PIXELS), device)?;
        Ok((x, self.test_labels[..n].to_vec()))
    }
}

/// Draws training digits uniformly at random (with replacement) from a loaded [`Mnist`].
#[derive(Debug, Clone)]
pub struct MnistSampler(pub Arc<Mnist>);

impl MnistSampler {
    /// The indices of `n` digits drawn uniformly with replacement (the draws of
    /// [`sample_labelled`](Self::sample_labelled)).
    fn indices(&self, n: usize, rng: &mut Rng) -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..self.0.len()) as u32)
            .collect()
    }

    /// Draws `n` digits on `device` by gathering them from the training set held there: the
    /// set is copied to the device once, and each batch moves only its `n` indices (drawn by
    /// the host RNG, so the digits are those [`sample_vec`](Sampler::sample_vec) draws).
    pub fn sample_gathered(
        &self,
        n: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Tensor, DataError> {
        let idx = self.indices(n, rng);
        let m = &self.0;
        let mut held = m.on_device.lock().unwrap_or_else(|e| e.into_inner());
        let images = match held.as_ref() {
            Some(t) if t.device().same_device(device) => t.clone(),
            _ => {
                let t = Tensor::from_slice(&m.train_images, (m.len(), PIXELS), device)?;
                *held = Some(t.clone());
                t
            }
        };
        drop(held);
        Ok(images.index_select(&Tensor::from_vec(idx, n, device)?, 0)?)
    }

    /// Draws `n` digits and their labels.
    pub fn sample_labelled(&self, n: usize, rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
        let m = &self.0;
        let mut x = Vec::with_capacity(n * PIXELS);
        let mut y = Vec::with_capacity(n);
        for i in self.indices(n, rng) {
            let i = i as usize;
            x.extend_from_slice(&m.train_images[i * PIXELS..(i + 1) * PIXELS]);
            y.push(m.train_labels[i]);
        }
        (x, y)
    }
}

impl Sampler for MnistSampler {
    fn dim(&self) -> usize {
        PIXELS
    }
    fn sample_vec(&self, n: usize, rng: &mut Rng) -> Vec<f32> {
        self.sample_labelled(n, rng).0
    }
    /// On the CPU the batch is copied from the host set; on an accelerator it is gathered
    /// from the set held there ([`MnistSampler::sample_gathered`]).
    fn sample(&self, n: usize, rng: &mut Rng, device: &Device) -> Result<Tensor, DataError> {
        if device.is_cpu() {
            let v = self.sample_vec(n, rng);
            return Ok(Tensor::from_vec(v, (n, PIXELS), device)?);
        }
        self.sample_gathered(n, rng, device)
    }
    fn classes(&self) -> usize {
        10
    }
    fn sample_labeled_vec(&self, n: usize, rng: &mut Rng) -> Option<(Vec<f32>, Vec<u32>)> {
        let (x, y) = self.sample_labelled(n, rng);
        Some((x, y.into_iter().map(u32::from).collect()))
    }
}

/// Writes the four IDX files for the given digits (bytes 0..=255) and labels, split
/// `train`/`test` at `n_train` — for tests and tools that make their own small MNIST.
pub fn write_idx(dir: &Path, images: &[u8], labels: &[u8], n_train: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let n = labels.len();
    for (prefix, lo, hi) in [("train", 0, n_train), ("t10k", n_train, n)] {
        let mut img = vec![];
        for v in [2051u32, (hi - lo) as u32, SIDE as u32, SIDE as u32] {
            img.extend_from_slice(&v.to_be_bytes());
        }
        img.extend_from_slice(&images[lo * PIXELS..hi * PIXELS]);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img)?;
        let mut lab = vec![];
        for v in [2049u32, (hi - lo) as u32] {
            lab.extend_from_slice(&v.to_be_bytes());
        }
        lab.extend_from_slice(&labels[lo..hi]);
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng_from_seed;

    /// Ten blocky "digits": class k lights up row band k.
    fn toy(n: usize) -> (Vec<u8>, Vec<u8>) {
        let mut img = vec![0u8; n * PIXELS];
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for (i, &k) in labels.iter().enumerate() {
            for r in (k as usize * 2)..(k as usize * 2 + 3) {
                for c in 4..24 {
                    img[i * PIXELS + r * SIDE + c] = 255;
                }
            }
        }
        (img, labels)
    }

    #[test]
    fn round_trips_through_load_dir_and_samples_in_range() {
        let dir = std::env::temp_dir().join(format!("fm-mnist-{}", std::process::id()));
        let (img, lab) = toy(50);
        write_idx(&dir, &img, &lab, 40).unwrap();
        let m = Mnist::load(dir.to_str().unwrap()).unwrap();
        assert_eq!((m.len(), m.test_labels.len()), (40, 10));
        assert_eq!(&m.train_labels[..3], &[0, 1, 2]);
        // Pixel 255 -> 1, 0 -> -1.
        assert_eq!(m.train_images[4], 1.0);
        assert_eq!(m.train_images[0], -1.0);
        let s = MnistSampler(Arc::new(m));
        let x = s.sample(8, &mut rng_from_seed(0), &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[8, 784]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|p| (-1.0..=1.0).contains(p)));
        // The gathered batch (the accelerator's path, here on the CPU) holds the same digits
        // from the same draws, and the set is copied once.
        let host = s.sample_vec(8, &mut rng_from_seed(5));
        let gathered = s
            .sample_gathered(8, &mut rng_from_seed(5), &Device::Cpu)
            .unwrap();
        assert_eq!(
            gathered.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            host
        );
        let again = s
            .sample_gathered(3, &mut rng_from_seed(6), &Device::Cpu)
            .unwrap();
        assert_eq!(again.dims(), &[3, 784]);
        assert!(s.0.on_device.lock().unwrap().is_some());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_truncated_and_foreign_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("fm-mnist-bad-{}", std::process::id()));
        let (img, lab) = toy(20);
        write_idx(&dir, &img, &lab, 15).unwrap();
        let train = dir.join("train-images-idx3-ubyte");
        let bytes = std::fs::read(&train).unwrap();
        // Truncated.
        std::fs::write(&train, &bytes[..bytes.len() - 100]).unwrap();
        let e = Mnist::load(dir.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("truncated") && e.contains("train-images-idx3-ubyte"),
            "{e}"
        );
        // Wrong magic number (a label file where images should be).
        std::fs::copy(dir.join("train-labels-idx1-ubyte"), &train).unwrap();
        let e = Mnist::load(dir.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("wrong magic number 2049"), "{e}");
        // Missing.
        std::fs::remove_file(&train).unwrap();
        let e = Mnist::load(dir.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("cannot open") && e.contains("train-images-idx3-ubyte"),
            "{e}"
        );
        let e = Mnist::load("/nonexistent/mnist").unwrap_err().to_string();
        assert!(e.contains("fetch-mnist.sh"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
