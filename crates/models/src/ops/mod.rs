//! The CPU kernels behind the models: candle custom ops with their own backward, AVX-512 or
//! AVX2 / FMA chosen at run time, each tested bit for bit (or to 1e-4) against the plain
//! candle ops it replaces. Other devices run the plain ops.
//!
//! - [`activation`]: GELU / SiLU (rational `erf` with fused multiply-adds).
//! - [`linear`]: `Linear`, and `Linear` + activation as one op.
//! - [`dense`]: an MLP's layers chained in register tiles, for sampling (no gradient).
//! - [`conv`]: the U-Nets' convolutions, the kernel chosen by shape: stride 1 on the padded
//!   layout by Winograd F(2×2, 3×3) (`conv_winograd`, 3×3 on even sides) and direct AVX2 /
//!   AVX-512 kernels (`conv_direct`), tap by tap for a few outputs (`conv_padded`); stride 2 on
//!   the input's phases; 1×1 on the direct kernel (`conv_pointwise`); without AVX2 by unfold +
//!   gemm (backward by col2im).
//! - [`conv_transpose`]: the lesson U-Net's transposed convolutions (sub-pixel phases by the
//!   direct kernels, or Winograd F(2×2, 2×2) for k 4 on even phases; gemm + col2im for other
//!   geometries).
//! - `conv_wgrad`: a conv's weight gradient on the direct layout, the output channels in the
//!   vector lanes (wherever Winograd's does not serve).
//! - `conv_subpixel`: a stride-2 conv's data gradient, which is a stride-2 transposed conv's
//!   forward, as four sub-pixel convs on the direct kernel.
//! - `upconv`: a 3×3 conv of a ×2-upsampled map, at the low resolution (`Conv::forward_upsampled`).
//! - [`norm`]: GroupNorm + SiLU.
//! - `pairs`: the every-other-value copies of the stride-2 ops (phases, interleaves).
//! - `geometry`: a convolution's shape, unfold (im2col) and fold (col2im).
//! - `cpu`: shared helpers (slices of CPU storage, parallel batches).

pub mod activation;
pub mod conv;
mod conv_direct;
mod conv_padded;
mod conv_pointwise;
mod conv_subpixel;
pub mod conv_transpose;
mod conv_wgrad;
mod conv_winograd;
pub(crate) mod cpu;
pub(crate) mod dense;
mod geometry;
pub mod linear;
pub mod norm;
mod pairs;
mod upconv;
