//! The weight average `θ̄ ← d·θ̄ + (1 − d)·θ` after every step, in place. On the CPU all
//! parameters are blended in one parallel loop (as AdamW's, [`crate::adamw`]), with candle's
//! `affine` arithmetic, so it gives the bits of the tensor-op form it replaced (tested);
//! elsewhere it runs as those tensor ops.

use crate::adamw::{for_each, same_size_f32, CHUNK, PARALLEL_MIN};
use crate::LossError;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use flowmatch_models::Model;
use rayon::prelude::*;

/// An exponential moving average of a model's weights.
pub(crate) struct Ema {
    pub decay: f64,
    pub model: Model,
}

impl Ema {
    /// Blends `live`'s weights into the average.
    pub fn update(&self, live: &Model) -> Result<(), LossError> {
        let (avg, live) = (self.model.params.vars(), live.params.vars());
        let cpu = avg
            .iter()
            .all(|v| v.device().is_cpu() && v.dtype() == DType::F32);
        if !cpu {
            for (e, w) in avg.iter().zip(&live) {
                e.set(&blended(e.as_tensor(), w.as_tensor(), self.decay)?)?;
            }
            return Ok(());
        }
        let weights: usize = avg.iter().map(|v| v.elem_count()).sum();
        let parallel = weights >= PARALLEL_MIN;
        let blend = Blend {
            decay: self.decay,
            parallel,
        };
        let pairs: Vec<(&Var, &Var)> = avg.iter().zip(&live).collect();
        for_each(pairs, parallel, |(e, w)| {
            e.as_tensor()
                .inplace_op2(&w.as_tensor().contiguous()?, &blend)
        })?;
        Ok(())
    }
}

/// `d·avg + (1 − d)·live` as tensor ops (candle's `affine` twice and a sum).
fn blended(avg: &Tensor, live: &Tensor, decay: f64) -> candle_core::Result<Tensor> {
    avg.affine(decay, 0.0)? + live.detach().affine(1.0 - decay, 0.0)?
}

/// The blend of one parameter in place, on the CPU.
struct Blend {
    decay: f64,
    parallel: bool,
}

impl InplaceOp2 for Blend {
    fn name(&self) -> &'static str {
        "ema-blend"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (avg, live) = same_size_f32(s1, l1, s2, l2, self.name())?;
        // candle's affine: x·(mul as f32) + (add as f32), the + 0 included (it turns −0 to 0).
        let (d, e) = (self.decay as f32, (1.0 - self.decay) as f32);
        let blend = |avg: &mut [f32], live: &[f32]| {
            for (a, &w) in avg.iter_mut().zip(live) {
                *a = (*a * d + 0.0) + (w * e + 0.0);
            }
        };
        if self.parallel && avg.len() > CHUNK {
            avg.par_chunks_mut(CHUNK)
                .zip(live.par_chunks(CHUNK))
                .for_each(|(a, w)| blend(a, w));
        } else {
            blend(avg, live);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adamw::tests::bits;
    use candle_core::Device;

    #[test]
    fn the_in_place_blend_gives_the_tensor_ops_bits() {
        let dev = Device::Cpu;
        for n in [5, CHUNK * 2 + 3] {
            // Signed zeros first: −0·d + 0 is +0 in candle's affine.
            let draw = |zeros: [f32; 2]| {
                let mut v = Tensor::randn(0f32, 1.0, n, &dev)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                v[..2].copy_from_slice(&zeros);
                Tensor::new(v, &dev).unwrap()
            };
            let (avg, live) = (draw([-0.0, 0.0]), draw([-0.0, -0.0]));
            for decay in [0.9, 0.999, 0.5] {
                let want = blended(&avg, &live, decay).unwrap();
                for parallel in [false, true] {
                    let got = Var::from_tensor(&avg).unwrap();
                    got.as_tensor()
                        .inplace_op2(&live, &Blend { decay, parallel })
                        .unwrap();
                    assert_eq!(bits(got.as_tensor()), bits(&want), "n={n} decay={decay}");
                }
            }
        }
    }
}
