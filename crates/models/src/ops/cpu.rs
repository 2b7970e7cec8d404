//! What the CPU custom ops share: their f32 inputs, one strided matrix product (the `gemm`
//! crate candle itself uses), the unpacking of a backward's gradients, and zeroed output slots.

use candle_core::{CpuStorage, Layout, Result, Tensor};
use std::mem::MaybeUninit;

/// Samples per work item of a backward that sums parameter gradients over the batch: each
/// chunk sums its own, then the chunks are added in order, so the result does not depend on
/// the number of threads (convs, transposed convs, GroupNorm).
pub(crate) const CHUNK: usize = 4;

/// The contiguous f32 data of a custom op's input.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{op}: expected f32 storage"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// The three inputs of a `CustomOp3`.
pub(crate) fn f32_slices3<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<[&'a [f32]; 3]> {
    Ok([
        f32_slice(s1, l1, op)?,
        f32_slice(s2, l2, op)?,
        f32_slice(s3, l3, op)?,
    ])
}

/// Splits a backward's flat output `[d₁; d₂; d₃]` into the gradients of the three inputs
/// (views, no copies), each in its input's shape.
pub(crate) fn unpack_grads(
    packed: &Tensor,
    inputs: [&Tensor; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let mut start = 0;
    let mut take = |t: &Tensor| -> Result<Option<Tensor>> {
        let n = t.elem_count();
        let g = packed.narrow(0, start, n)?.reshape(t.shape())?;
        start += n;
        Ok(Some(g))
    };
    Ok((take(inputs[0])?, take(inputs[1])?, take(inputs[2])?))
}

/// `dst (m×n, row-major) = [dst +] a · b` where `a` is `m×k` and `b` is `k×n`, each given with
/// its (row, column) strides, so transposes are free. `threads > 1` splits the product with
/// rayon (the convolution passes 1: it parallelises over samples instead).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(dst.len() >= m * n && a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `d` filled with zeros, as floats.
pub(crate) fn zeroed(d: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    d.fill(MaybeUninit::new(0.0));
    // SAFETY: every value was just written.
    unsafe { std::slice::from_raw_parts_mut(d.as_mut_ptr().cast::<f32>(), d.len()) }
}

/// `out[r]` = the sum of row `r` of `src` (`rows` rows of `n` floats, `stride` apart), as
/// `iter().sum()` adds it: `((−0 + v₀) + v₁) + …` in order, the same bits. Eight rows' chains
/// run side by side, so the adds overlap instead of each waiting on the one before (one chain
/// is bound by the add's latency: the bias gradients' row sums were 3 % of the unet's step).
pub(crate) fn row_sums(src: &[f32], (rows, n, stride): (usize, usize, usize), out: &mut [f32]) {
    const WAYS: usize = 8;
    assert!(out.len() >= rows && (rows == 0 || src.len() >= (rows - 1) * stride + n));
    let mut r = 0;
    while r + WAYS <= rows {
        let lines: [&[f32]; WAYS] = std::array::from_fn(|l| &src[(r + l) * stride..][..n]);
        let mut acc = [-0.0f32; WAYS];
        for j in 0..n {
            for (a, line) in acc.iter_mut().zip(&lines) {
                *a += line[j];
            }
        }
        out[r..r + WAYS].copy_from_slice(&acc);
        r += WAYS;
    }
    for (o, t) in out[r..rows].iter_mut().zip(r..rows) {
        *o = src[t * stride..][..n].iter().sum::<f32>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_sums_have_the_bits_of_one_chain_per_row() {
        // Rows of 28, 7 and 1 floats, 1 to 19 rows (the eight-way blocks and the rest), with
        // a stride past the row and values whose sums depend on the order (and a -0 row).
        for (rows, n, stride) in [
            (19, 28, 30),
            (8, 7, 7),
            (3, 1, 2),
            (16, 5, 5),
            (1, 784, 784),
        ] {
            let src: Vec<f32> = (0..rows * stride)
                .map(|i| match i % 13 {
                    0 => 1e8,
                    5 => -1e8,
                    _ => ((i * 37 % 101) as f32 - 50.0) / 3.0,
                })
                .collect();
            let mut src = src;
            src[..n].iter_mut().for_each(|v| *v = -0.0);
            let mut got = vec![f32::NAN; rows];
            row_sums(&src, (rows, n, stride), &mut got);
            for (r, g) in got.iter().enumerate() {
                let want = src[r * stride..r * stride + n].iter().sum::<f32>();
                assert_eq!(g.to_bits(), want.to_bits(), "rows {rows} n {n}: row {r}");
            }
        }
    }
}
