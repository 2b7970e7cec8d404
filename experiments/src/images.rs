//! Images: the MNIST classifier behind the FID-like score, the score itself, and sample grids.

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{loss::cross_entropy, AdamW, Optimizer, ParamsAdamW};
use flowmatch_data::{rng_from_seed, Mnist, MnistSampler};
use flowmatch_metrics::frechet_distance;
use flowmatch_models::Classifier;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Trains the small MNIST classifier; returns it with its test accuracy.
pub fn train_classifier(
    mnist: Arc<Mnist>,
    steps: usize,
    batch: usize,
    lr: f64,
    seed: u64,
    device: &Device,
) -> Result<(Classifier, f64)> {
    let clf = Classifier::new(flowmatch_data::mnist::PIXELS, 10, seed, device)?;
    let mut opt = AdamW::new(
        clf.params.vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let sampler = MnistSampler(mnist.clone());
    let mut rng = rng_from_seed(seed ^ 0xc1a5);
    for _ in 0..steps {
        let (x, y) = sampler.sample_labelled(batch, &mut rng);
        let x = Tensor::from_vec(x, (batch, flowmatch_data::mnist::PIXELS), device)?;
        let y = Tensor::from_vec(y, batch, device)?.to_dtype(DType::U32)?;
        let loss = cross_entropy(&clf.logits(&x)?, &y)?;
        opt.backward_step(&loss)?;
    }
    let (x, y) = mnist.test_batch(mnist.test_labels.len(), device)?;
    let pred = clf
        .logits(&x)?
        .argmax(1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let correct = pred
        .iter()
        .zip(&y)
        .filter(|(p, y)| **p == **y as u32)
        .count();
    Ok((clf, correct as f64 / y.len().max(1) as f64))
}

/// FID-like score of generated digits and the spread of their predicted classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    /// Fréchet distance between classifier features of generated and real digits.
    pub fid: f64,
    /// Distinct predicted classes among the generated digits (10 = all present).
    pub classes_present: usize,
    /// Generated digits predicted as each class 0..9.
    pub class_counts: Vec<usize>,
    /// The score of a second real sample of the same size: what a perfect model would get at
    /// this sample count (the Fréchet distance of finite samples is biased upwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_real: Option<f64>,
}

/// The classifier's penultimate features of digits `(n, 784)` (any device), row by row.
fn embed(clf: &Classifier, x: &Tensor) -> Result<Vec<f32>> {
    let x = x.to_device(&Device::Cpu)?.flatten_from(1)?;
    Ok(clf.features(&x)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Scores generated digits against a fixed real sample.
pub struct FidScorer {
    clf: Classifier,
    real: Vec<f32>,
    /// The score of `other_real` (see [`ImageScores::fid_real`]).
    fid_real: f64,
}

impl FidScorer {
    /// Loads the classifier, embeds the real digits once, and scores a second real sample
    /// `other_real` against them.
    pub fn new(path: &Path, real: &Tensor, other_real: &Tensor) -> Result<Self> {
        let clf = Classifier::load(path, flowmatch_data::mnist::PIXELS, 10, &Device::Cpu)
            .map_err(|e| anyhow!("eval.classifier: {e}"))?;
        let real = embed(&clf, real)?;
        let fid_real = frechet_distance(&embed(&clf, other_real)?, &real, Classifier::FEATURES)?;
        Ok(Self {
            clf,
            real,
            fid_real,
        })
    }

    /// The classifier's digit for each of `gen`'s rows.
    pub fn predict(&self, gen: &Tensor) -> Result<Vec<u32>> {
        let gen = gen.to_device(&Device::Cpu)?.flatten_from(1)?;
        Ok(self
            .clf
            .logits(&gen)?
            .argmax(1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?)
    }

    /// The score of `gen` (`(n, 784)`, any device).
    pub fn score(&self, gen: &Tensor) -> Result<ImageScores> {
        let gen = gen.to_device(&Device::Cpu)?.flatten_from(1)?;
        let fid = frechet_distance(&embed(&self.clf, &gen)?, &self.real, Classifier::FEATURES)?;
        let pred = self
            .clf
            .logits(&gen)?
            .argmax(1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let mut counts = vec![0usize; 10];
        for p in pred {
            counts[p as usize] += 1;
        }
        Ok(ImageScores {
            fid,
            classes_present: counts.iter().filter(|&&c| c > 0).count(),
            class_counts: counts,
            fid_real: Some(self.fid_real),
        })
    }
}
