//! Every-other-value copies of the stride-2 ops: a row split into its even and odd columns
//! (a stride-2 conv's 2×2 phases, the up-conv's gradient scatter) and two rows woven into
//! one (the sub-pixel phases of a transposed conv, the up-conv's interleave).
//!
//! As scalar loops these were strided loads or stores, one value at a time (6 % of the lesson
//! U-Net's step in `split_phases` alone); with AVX2, 16 values are two loads, four shuffles
//! and two stores. Each value is copied (or gets the one add) as before: the same bits.

use std::mem::MaybeUninit;

/// `even[j] = src[2j]`, `odd[j] = src[2j + 1]`: `even` holds `⌈n/2⌉` values and `odd`
/// `⌊n/2⌋` for the `n` of `src`.
pub(crate) fn deinterleave(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    assert!(even.len() == src.len().div_ceil(2) && odd.len() == src.len() / 2);
    #[cfg(target_arch = "x86_64")]
    if super::activation::has_avx2() {
        // SAFETY: AVX2 is checked; the lengths are asserted above.
        return unsafe { deinterleave_avx2(src, even, odd) };
    }
    deinterleave_scalar(src, even, odd);
}

fn deinterleave_scalar(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    for (j, v) in src.iter().enumerate() {
        if j % 2 == 0 {
            even[j / 2] = *v;
        } else {
            odd[j / 2] = *v;
        }
    }
}

/// `dst[2j] = add + a[j]` and `dst[2j + 1] = add + b[j]` (with `ADD`; else the values as they
/// are): `a` holds `⌈n/2⌉` values and `b` `⌊n/2⌋` for the `n` of `dst`, every one written.
pub(crate) fn interleave<const ADD: bool>(
    a: &[f32],
    b: &[f32],
    add: f32,
    dst: &mut [MaybeUninit<f32>],
) {
    assert!(a.len() == dst.len().div_ceil(2) && b.len() == dst.len() / 2);
    #[cfg(target_arch = "x86_64")]
    if super::activation::has_avx2() {
        // SAFETY: AVX2 is checked; the lengths are asserted above.
        return unsafe { interleave_avx2::<ADD>(a, b, add, dst) };
    }
    interleave_scalar::<ADD>(a, b, add, dst);
}

fn interleave_scalar<const ADD: bool>(
    a: &[f32],
    b: &[f32],
    add: f32,
    dst: &mut [MaybeUninit<f32>],
) {
    for (j, d) in dst.iter_mut().enumerate() {
        let v = if j % 2 == 0 { a[j / 2] } else { b[j / 2] };
        d.write(if ADD { add + v } else { v });
    }
}

/// The first `n` of 8 lanes (`n` may be negative or past 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn first(n: isize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.clamp(-1, 8) as i32), lane)
}

/// [`deinterleave`] with AVX2: blocks of 16 values, the last one masked (the rows of the
/// U-Nets' maps are 7 to 28 values: mostly tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn deinterleave_avx2(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    use std::arch::x86_64::*;
    let (s, e, o) = (src.as_ptr(), even.as_mut_ptr(), odd.as_mut_ptr());
    let n = src.len() as isize;
    let mut q = 0;
    while 16 * q < src.len() {
        let at = 16 * q as isize;
        let (x, y) = if at + 16 <= n {
            (
                _mm256_loadu_ps(s.add(16 * q)),
                _mm256_loadu_ps(s.add(16 * q + 8)),
            )
        } else {
            (
                _mm256_maskload_ps(s.add(16 * q), first(n - at)),
                _mm256_maskload_ps(s.add(16 * q + 8), first(n - at - 8)),
            )
        };
        // [x0 x2 y0 y2 | x4 x6 y4 y6], then the 64-bit pairs in order.
        let ev = _mm256_castps_pd(_mm256_shuffle_ps::<0b10_00_10_00>(x, y));
        let od = _mm256_castps_pd(_mm256_shuffle_ps::<0b11_01_11_01>(x, y));
        let ev = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(ev));
        let od = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(od));
        if at + 16 <= n {
            _mm256_storeu_ps(e.add(8 * q), ev);
            _mm256_storeu_ps(o.add(8 * q), od);
        } else {
            let done = 8 * q as isize;
            _mm256_maskstore_ps(e.add(8 * q), first(even.len() as isize - done), ev);
            _mm256_maskstore_ps(o.add(8 * q), first(odd.len() as isize - done), od);
        }
        q += 1;
    }
}

/// [`interleave`] with AVX2: blocks of 8 pairs, the last one masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_avx2<const ADD: bool>(
    a: &[f32],
    b: &[f32],
    add: f32,
    dst: &mut [MaybeUninit<f32>],
) {
    use std::arch::x86_64::*;
    let (pa, pb, d) = (a.as_ptr(), b.as_ptr(), dst.as_mut_ptr().cast::<f32>());
    let n = dst.len() as isize;
    let bias = _mm256_set1_ps(add);
    let mut q = 0;
    while 16 * q < dst.len() {
        let at = 16 * q as isize;
        let whole = at + 16 <= n;
        let (mut x, mut y) = if whole {
            (
                _mm256_loadu_ps(pa.add(8 * q)),
                _mm256_loadu_ps(pb.add(8 * q)),
            )
        } else {
            let done = 8 * q as isize;
            (
                _mm256_maskload_ps(pa.add(8 * q), first(a.len() as isize - done)),
                _mm256_maskload_ps(pb.add(8 * q), first(b.len() as isize - done)),
            )
        };
        if ADD {
            (x, y) = (_mm256_add_ps(bias, x), _mm256_add_ps(bias, y));
        }
        // [x0 y0 x1 y1 | x4 y4 x5 y5] and [x2 y2 x3 y3 | x6 y6 x7 y7], then the halves.
        let (lo, hi) = (_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
        let (first8, second8) = (
            _mm256_permute2f128_ps::<0x20>(lo, hi),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        );
        if whole {
            _mm256_storeu_ps(d.add(16 * q), first8);
            _mm256_storeu_ps(d.add(16 * q + 8), second8);
        } else {
            _mm256_maskstore_ps(d.add(16 * q), first(n - at), first8);
            _mm256_maskstore_ps(d.add(16 * q + 8), first(n - at - 8), second8);
        }
        q += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        // Signed zeros and ordinary values: a copy keeps both.
        (0..n)
            .map(|i| {
                if i % 7 == 3 {
                    -0.0
                } else {
                    i as f32 * 0.37 - 5.0
                }
            })
            .collect()
    }

    #[test]
    fn deinterleave_splits_every_length_as_the_strided_loop() {
        for n in 0usize..53 {
            let src = values(n);
            let want_even: Vec<f32> = src.iter().step_by(2).copied().collect();
            let want_odd: Vec<f32> = src.iter().skip(1).step_by(2).copied().collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // The dispatched kernel (AVX2 here) and the plain loop.
            for split in [deinterleave, deinterleave_scalar] {
                let (mut even, mut odd) = (vec![9f32; n.div_ceil(2)], vec![9f32; n / 2]);
                split(&src, &mut even, &mut odd);
                assert_eq!(bits(&even), bits(&want_even), "n={n}");
                assert_eq!(bits(&odd), bits(&want_odd), "n={n}");
            }
        }
    }

    #[test]
    fn interleave_weaves_every_length_as_the_strided_loop() {
        for n in 0usize..53 {
            let (a, b) = (values(n.div_ceil(2)), values(n / 2 + 1)[1..].to_vec());
            for (add, plain) in [None, Some(0.25f32), Some(0.0)]
                .into_iter()
                .flat_map(|add| [(add, false), (add, true)])
            {
                let mut dst = vec![MaybeUninit::new(9f32); n];
                match (add, plain) {
                    (Some(v), false) => interleave::<true>(&a, &b, v, &mut dst),
                    (None, false) => interleave::<false>(&a, &b, 0.0, &mut dst),
                    (Some(v), true) => interleave_scalar::<true>(&a, &b, v, &mut dst),
                    (None, true) => interleave_scalar::<false>(&a, &b, 0.0, &mut dst),
                }
                let f = |v: f32| add.map_or(v, |s| s + v);
                let want: Vec<u32> = (0..n)
                    .map(|i| f(if i % 2 == 0 { a[i / 2] } else { b[i / 2] }).to_bits())
                    .collect();
                // SAFETY: every value was initialised above.
                let got: Vec<u32> = dst
                    .iter()
                    .map(|v| unsafe { v.assume_init() }.to_bits())
                    .collect();
                assert_eq!(got, want, "n={n} add={add:?} plain={plain}");
            }
        }
    }
}
