//! Class-conditional sampling: a conditional model seen as a plain velocity field, for fixed
//! labels ([`Labeled`]) or with classifier-free guidance ([`Guided`]), so that every solver,
//! the stochastic sampler and the trainer's objectives take labels without knowing of them.

use crate::VelocityField;
use candle_core::{Device, Result, Tensor};

/// Labels as the `(B,)` u32 tensor a conditional model reads.
pub fn label_tensor(labels: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(labels, labels.len(), device)
}

/// A conditional model with its labels bound: `v(x, t, y)` for a batch of the labels' size.
pub struct Labeled<'a> {
    field: &'a dyn VelocityField,
    y: Tensor,
}

impl<'a> Labeled<'a> {
    /// `field` for labels `y` (`(B,)` u32 in `0..=classes`, `classes` meaning "no label").
    pub fn new(field: &'a dyn VelocityField, y: Tensor) -> Self {
        Self { field, y }
    }
}

impl Labeled<'_> {
    /// The labels of a batch like `x`: all of them, or the first rows' for a leading part of
    /// the batch (the shortcut objective's bootstrap evaluates the first rows).
    fn labels(&self, x: &Tensor) -> Result<Tensor> {
        let (n, m) = (x.dim(0)?, self.y.dim(0)?);
        match n.cmp(&m) {
            std::cmp::Ordering::Equal => Ok(self.y.clone()),
            std::cmp::Ordering::Less => self.y.narrow(0, 0, n),
            std::cmp::Ordering::Greater => {
                candle_core::bail!("a batch of {n} rows with {m} labels")
            }
        }
    }
}

impl VelocityField for Labeled<'_> {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.field.labeled_velocity(x, t, None, &self.labels(x)?)
    }
    fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
        self.field.labeled_velocity(x, t, Some(h), &self.labels(x)?)
    }
}

/// Classifier-free guidance: `v = v(x, t, ∅) + w·(v(x, t, y) − v(x, t, ∅))`. `w = 0` is the
/// unconditional field, `w = 1` the plain conditional one, `w > 1` extrapolates past it.
/// Both velocities come from one forward pass over the batch twice.
pub struct Guided<'a> {
    field: &'a dyn VelocityField,
    /// The labels; `None`: balanced over the classes for whatever batch comes
    /// ([`balanced_labels`]).
    y: Option<Tensor>,
    w: f64,
}

impl<'a> Guided<'a> {
    /// `field` guided towards labels `y` with scale `w`.
    pub fn new(field: &'a dyn VelocityField, y: Tensor, w: f64) -> Result<Self> {
        Ok(Self {
            field,
            y: Some(y),
            w,
        })
    }

    /// `field` guided with scale `w` towards labels balanced over its classes (row `i` asks
    /// for class `i mod K`), for batches of any size (figures, evaluations).
    pub fn balanced(field: &'a dyn VelocityField, w: f64) -> Self {
        Self { field, y: None, w }
    }

    /// The labels of a batch like `x`.
    fn labels(&self, x: &Tensor) -> Result<Tensor> {
        match &self.y {
            Some(y) => Ok(y.clone()),
            None => label_tensor(
                &balanced_labels(x.dim(0)?, self.field.classes()),
                x.device(),
            ),
        }
    }

    /// The guided velocity from `run(x, labels)`; both velocities from one pass over the
    /// batch twice (labels, then "no label").
    fn combine(
        &self,
        x: &Tensor,
        run: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let y = self.labels(x)?;
        if self.w == 1.0 {
            return run(x, &y);
        }
        let null = Tensor::full(self.field.classes() as u32, y.dims(), y.device())?;
        let both = Tensor::cat(&[&y, &null], 0)?;
        let b = x.dim(0)?;
        let v = run(&Tensor::cat(&[x, x], 0)?, &both)?;
        let (cond, uncond) = (v.narrow(0, 0, b)?, v.narrow(0, b, b)?);
        &uncond + ((cond - &uncond)? * self.w)?
    }
}

/// `t` (or `h`) for the doubled batch.
fn twice(v: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[v, v], 0)
}

impl VelocityField for Guided<'_> {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let t2 = if self.w == 1.0 { t.clone() } else { twice(t)? };
        self.combine(x, |x, y| self.field.labeled_velocity(x, &t2, None, y))
    }
    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let tt = Tensor::full(t as f32, x.dim(0)?, x.device())?.to_dtype(x.dtype())?;
        self.velocity(x, &tt)
    }
    fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
        let (t2, h2) = if self.w == 1.0 {
            (t.clone(), h.clone())
        } else {
            (twice(t)?, twice(h)?)
        };
        self.combine(x, |x, y| self.field.labeled_velocity(x, &t2, Some(&h2), y))
    }
    fn mean_velocity_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
        let full = |v: f64| Tensor::full(v as f32, x.dim(0)?, x.device())?.to_dtype(x.dtype());
        self.mean_velocity(x, &full(t)?, &full(h)?)
    }
}

/// Checks a guidance scale: finite and ≥ 0 (0 is unconditional, 1 plain conditional).
pub fn validate_guidance(w: f64) -> std::result::Result<(), crate::ModelError> {
    if w >= 0.0 && w.is_finite() {
        Ok(())
    } else {
        Err(crate::ModelError::Setting {
            field: "guidance",
            msg: format!("a guidance scale must be a number ≥ 0, got {w}"),
        })
    }
}

/// Labels balanced over `classes`: `0, 1, …, K − 1, 0, 1, …` for `n` samples.
pub fn balanced_labels(n: usize, classes: usize) -> Vec<u32> {
    (0..n).map(|i| (i % classes.max(1)) as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// A "model" whose velocity is `label + 10·t` in every coordinate (label K = 3 is ∅).
    struct ByLabel;
    impl VelocityField for ByLabel {
        fn velocity(&self, _x: &Tensor, _t: &Tensor) -> Result<Tensor> {
            candle_core::bail!("conditional only")
        }
        fn classes(&self) -> usize {
            3
        }
        fn labeled_velocity(
            &self,
            x: &Tensor,
            t: &Tensor,
            _h: Option<&Tensor>,
            y: &Tensor,
        ) -> Result<Tensor> {
            let col = (y.to_dtype(DType::F32)? + (t * 10.0)?)?.reshape((x.dim(0)?, 1))?;
            col.broadcast_as(x.shape())?.contiguous()
        }
    }

    #[test]
    fn guidance_is_the_unconditional_field_plus_w_times_the_difference() {
        let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let y = label_tensor(&[1, 2], &Device::Cpu).unwrap();
        let at = |w: f64| -> Vec<f32> {
            let g = Guided::new(&ByLabel, y.clone(), w).unwrap();
            let v = g.velocity_at(&x, 0.5).unwrap();
            v.narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // v(∅) = 3 + 5 = 8; v(y) = y + 5.
        assert_eq!(at(0.0), vec![8.0, 8.0]);
        assert_eq!(at(1.0), vec![6.0, 7.0]);
        // w = 2: 8 + 2·(y + 5 − 8) = 2y + 2, past the conditional velocity.
        assert_eq!(at(2.0), vec![4.0, 6.0]);
        let labeled = Labeled::new(&ByLabel, y.clone());
        let v = labeled.velocity_at(&x, 0.0).unwrap();
        assert_eq!(
            v.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0], vec![2.0, 2.0]]
        );
        assert_eq!(balanced_labels(5, 2), vec![0, 1, 0, 1, 0]);
    }
}
