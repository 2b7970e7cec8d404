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

/// The classifier's digit for each of `x`'s rows (any device).
fn predict(clf: &Classifier, x: &Tensor) -> Result<Vec<u32>> {
    let x = x.to_device(&Device::Cpu)?.flatten_from(1)?;
    Ok(clf
        .logits(&x)?
        .argmax(1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?)
}

/// Scores generated digits against a fixed real sample.
pub struct FidScorer {
    clf: Classifier,
    real: Vec<f32>,
    /// The classifier's digit for each real row (who decides a real digit's class).
    real_class: Vec<u32>,
    /// The score of `other_real` (see [`ImageScores::fid_real`]).
    fid_real: f64,
    /// The per-class score of `other_real`, its rows asked for the class the classifier gives
    /// them: the floor of [`FidScorer::class_fid`] at this sample count.
    class_fid_real: Option<f64>,
}

impl FidScorer {
    /// Loads the classifier, embeds the real digits once, and scores a second real sample
    /// `other_real` against them.
    pub fn new(path: &Path, real: &Tensor, other_real: &Tensor) -> Result<Self> {
        let clf = Classifier::load(path, flowmatch_data::mnist::PIXELS, 10, &Device::Cpu)
            .map_err(|e| anyhow!("eval.classifier: {e}"))?;
        let real_class = predict(&clf, real)?;
        let real = embed(&clf, real)?;
        let other = embed(&clf, other_real)?;
        let fid_real = frechet_distance(&other, &real, Classifier::FEATURES)?;
        let other_class = predict(&clf, other_real)?;
        let mut s = Self {
            clf,
            real,
            real_class,
            fid_real,
            class_fid_real: None,
        };
        s.class_fid_real = s.class_fid_of(&other, &|i| other_class[i])?;
        Ok(s)
    }

    /// The per-class FID-like score of `gen`: for each class c, the Fréchet distance of the
    /// digits asked for c (`asked(row)`) against the real digits the classifier puts in c,
    /// averaged over the classes with at least 2 of each. None when no class has.
    pub fn class_fid(&self, gen: &Tensor, asked: &dyn Fn(usize) -> u32) -> Result<Option<f64>> {
        let gen = gen.to_device(&Device::Cpu)?.flatten_from(1)?;
        self.class_fid_of(&embed(&self.clf, &gen)?, asked)
    }

    /// The floor of [`Self::class_fid`]: a second real sample against the reference.
    pub fn class_fid_real(&self) -> Option<f64> {
        self.class_fid_real
    }

    fn class_fid_of(&self, feats: &[f32], asked: &dyn Fn(usize) -> u32) -> Result<Option<f64>> {
        let d = Classifier::FEATURES;
        let rows = |f: &[f32], keep: &dyn Fn(usize) -> bool| -> Vec<f32> {
            f.chunks(d)
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .flat_map(|(_, r)| r.iter().copied())
                .collect()
        };
        let mut scores = vec![];
        for c in 0..10u32 {
            let g = rows(feats, &|i| asked(i) == c);
            let r = rows(&self.real, &|i| self.real_class[i] == c);
            if g.len() >= 2 * d && r.len() >= 2 * d {
                scores.push(frechet_distance(&g, &r, d)?);
            }
        }
        Ok((!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64))
    }

    /// The classifier's digit for each of `gen`'s rows.
    pub fn predict(&self, gen: &Tensor) -> Result<Vec<u32>> {
        predict(&self.clf, gen)
    }

    /// The score of `gen` (`(n, 784)`, any device).
    pub fn score(&self, gen: &Tensor) -> Result<ImageScores> {
        let gen = gen.to_device(&Device::Cpu)?.flatten_from(1)?;
        let fid = frechet_distance(&embed(&self.clf, &gen)?, &self.real, Classifier::FEATURES)?;
        let pred = predict(&self.clf, &gen)?;
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
