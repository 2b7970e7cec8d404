//! Images: the MNIST classifier behind the FID-like score, the score itself, and sample grids.

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{loss::cross_entropy, AdamW, Optimizer, ParamsAdamW};
use flowmatch_data::{rng_from_seed, Mnist, MnistSampler};
use flowmatch_metrics::frechet_distance;
use flowmatch_models::Classifier;
use plotters::prelude::*;
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
}

/// Scores generated digits against a fixed real sample.
pub struct FidScorer {
    clf: Classifier,
    real: Vec<f32>,
}

impl FidScorer {
    /// Loads the classifier and embeds the real digits once.
    pub fn new(path: &Path, real: &Tensor) -> Result<Self> {
        let clf = Classifier::load(path, flowmatch_data::mnist::PIXELS, 10, &Device::Cpu)
            .map_err(|e| anyhow!("eval.classifier: {e}"))?;
        let real = clf
            .features(&real.to_device(&Device::Cpu)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { clf, real })
    }

    /// The score of `gen` (`(n, 784)`, any device).
    pub fn score(&self, gen: &Tensor) -> Result<ImageScores> {
        let gen = gen.to_device(&Device::Cpu)?.flatten_from(1)?;
        let f = self.clf.features(&gen)?.flatten_all()?.to_vec1::<f32>()?;
        let fid = frechet_distance(&f, &self.real, Classifier::FEATURES)?;
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
        })
    }
}

/// Draws rows of digits (`(label, (n, 784) tensor in [-1, 1])`), up to `per_row` each, into a
/// PNG: one row per label, 2 px per pixel, the label on the left.
pub fn sample_grid(path: &Path, rows: &[(String, Tensor)], per_row: usize) -> Result<()> {
    crate::plot::font_ready();
    const SCALE: u32 = 2;
    let side = flowmatch_data::mnist::SIDE as u32;
    let cell = side * SCALE + 4;
    let label_w = 110;
    let (w, h) = (
        label_w + cell * per_row as u32,
        cell * rows.len() as u32 + 4,
    );
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&crate::plot::BACKGROUND)?;
    for (r, (label, x)) in rows.iter().enumerate() {
        let y0 = 4 + cell * r as u32;
        root.draw(&Text::new(
            label.clone(),
            (8, (y0 + cell / 2 - 8) as i32),
            ("sans-serif", 15).into_font().color(&WHITE),
        ))?;
        let n = x.dim(0)?.min(per_row);
        let v = x
            .narrow(0, 0, n)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for k in 0..n {
            let x0 = label_w + cell * k as u32;
            for i in 0..side {
                for j in 0..side {
                    let p = v[k * (side * side) as usize + (i * side + j) as usize];
                    let g = ((p.clamp(-1.0, 1.0) + 1.0) * 127.5) as u8;
                    let c = RGBColor(g, g, g);
                    let (px, py) = ((x0 + j * SCALE) as i32, (y0 + i * SCALE) as i32);
                    root.draw(&Rectangle::new(
                        [(px, py), (px + SCALE as i32, py + SCALE as i32)],
                        c.filled(),
                    ))?;
                }
            }
        }
    }
    root.present()?;
    Ok(())
}
