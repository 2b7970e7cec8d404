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

/// A layout as equal contiguous blocks at a fixed stride: `(start, block, stride, count)`.
/// A contiguous tensor is one block; a slice along dim 1 of a contiguous `(B, C, …)` tensor
/// (a `cat`'s gradient kept as a view) is `B` blocks. None for anything else.
pub(crate) fn uniform_blocks(l: &Layout) -> Option<(usize, usize, usize, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let mut block = 1usize;
    let mut inner = 0;
    for (&stride, &dim) in strides.iter().zip(dims).rev() {
        if dim != 1 && stride != block {
            break;
        }
        block *= dim;
        inner += 1;
    }
    match dims.len() - inner {
        0 => Some((l.start_offset(), block, block, 1)),
        1 => Some((l.start_offset(), block, strides[0], dims[0])),
        _ => None,
    }
}

/// Data in equal blocks: the data from the first block on, and `(block, stride, count)`.
pub(crate) type Blocks<'a> = (&'a [f32], (usize, usize, usize));

/// The f32 data of a custom op's input laid out in [`uniform_blocks`].
pub(crate) fn f32_blocks<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Blocks<'a>> {
    let data = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{op}: expected f32 storage"),
    };
    match uniform_blocks(l) {
        Some((start, block, stride, count)) if count > 0 => {
            let end = start + (count - 1) * stride + block;
            if end > data.len() {
                candle_core::bail!("{op}: layout past its storage");
            }
            Ok((&data[start..end], (block, stride, count)))
        }
        Some(_) => Ok((&[], (0, 0, 0))),
        None => candle_core::bail!("{op}: expected contiguous blocks"),
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

/// Adds to `db[c]` the sums of channel `c`'s rows from the channels-last gradient `dyt`
/// (`ho·wo` pixels of `op >= db.len()` channels, rows of `wo` pixels), a row at a time, each as
/// [`row_sums`] gives it: eight channels' chains side by side in the lanes, one pixel at a
/// time. The same bits as the rows summed from the planes, for a fraction of the work where a
/// weight gradient has put `dy` channels last anyway.
pub(crate) fn add_row_sums_last(dyt: &[f32], (ho, wo, op): (usize, usize, usize), db: &mut [f32]) {
    const WAYS: usize = 8;
    let o = db.len();
    assert!(op >= o.next_multiple_of(WAYS) && dyt.len() >= ho * wo * op);
    for c0 in (0..o).step_by(WAYS) {
        let n = WAYS.min(o - c0);
        let mut d = [0f32; WAYS];
        d[..n].copy_from_slice(&db[c0..c0 + n]);
        for r in 0..ho {
            let mut acc = [-0.0f32; WAYS];
            for j in 0..wo {
                let px: &[f32; WAYS] = dyt[(r * wo + j) * op + c0..][..WAYS]
                    .try_into()
                    .expect("eight lanes");
                for (a, v) in acc.iter_mut().zip(px) {
                    *a += v;
                }
            }
            for (d, a) in d.iter_mut().zip(acc) {
                *d += a;
            }
        }
        db[c0..c0 + n].copy_from_slice(&d[..n]);
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

    #[test]
    fn row_sums_from_channels_last_have_the_planes_bits() {
        // (channels, rows, columns, padded channels): 1, 8 + 3 and 32 channels.
        for (o, ho, wo, op) in [
            (1, 4, 5, 16),
            (11, 7, 7, 16),
            (32, 28, 28, 32),
            (3, 1, 9, 16),
        ] {
            let dy: Vec<f32> = (0..o * ho * wo)
                .map(|i| match i % 17 {
                    0 => 3e7,
                    9 => -3e7,
                    _ => ((i * 53 % 97) as f32 - 48.0) / 7.0,
                })
                .collect();
            let mut dyt = vec![f32::NAN; ho * wo * op];
            for (c, plane) in dy.chunks_exact(ho * wo).enumerate() {
                for (q, v) in plane.iter().enumerate() {
                    dyt[q * op + c] = *v;
                }
            }
            let start: Vec<f32> = (0..o).map(|c| c as f32 * 0.25 - 1.0).collect();
            let (mut got, mut want) = (start.clone(), start);
            add_row_sums_last(&dyt, (ho, wo, op), &mut got);
            let mut sums = vec![0f32; ho];
            for (plane, d) in dy.chunks_exact(ho * wo).zip(&mut want) {
                row_sums(plane, (ho, wo, wo), &mut sums);
                sums.iter().for_each(|v| *d += v);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{o} channels, {ho} x {wo}");
        }
    }
}
