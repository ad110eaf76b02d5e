//! `flotilla-kernels`: the quantized matrix products and the attention
//! loop that decide the runner's inference speed on CPUs.
//!
//! GGUF stores a quantized matrix row by row (one output column's blocks
//! after another). At load time the runner repacks it into groups of
//! [`GROUP`] columns, block by block ([`Q4Group`], [`Q8Group`]), so that
//! one vector register holds the same four inputs of sixteen columns: a
//! broadcast of four activation bytes and one fused byte dot product
//! (`vpdpbusd`) advance sixteen columns at once, the sums land one column
//! per lane (no horizontal adds), and a group's weights are unpacked once
//! for every activation row of the batch. Activations are quantized per row
//! to 8 bits in blocks of 32 ([`ActBlock`]).
//!
//! Each block's integer dot product is exact, and each row goes through
//! the same float operations whatever else is in the batch, so a sequence's
//! result does not depend on what it is batched with. Column groups are
//! split across the rayon pool the caller runs in.
//!
//! Inner loops: AVX-512 VNNI, AVX-VNNI or AVX2 when the CPU has them
//! (checked at run time), a portable loop otherwise; all are tested against
//! candle's own quantized matmul.
//!
//! Laid out by job:
//!
//! - [`blocks`]: GGUF's Q4_0, Q4_1 and Q8_0 blocks and their parsers;
//! - [`quantize`]: activations to 8-bit blocks;
//! - [`packing`]: GGUF rows repacked into column groups ([`PackedWeights`]);
//! - [`isa`]: which inner loops this CPU runs;
//! - [`matmul`](mod@matmul): the tiled product and the portable inner loops;
//! - [`attention`]: one head's softmax attention over a KV cache;
//! - `x86`: the x86-64 inner loops, one file per instruction set. The only
//!   module with `unsafe` (the crate denies it elsewhere), and the only
//!   crate of the workspace that may use it.

pub mod attention;
pub mod blocks;
pub mod isa;
pub mod matmul;
pub mod packing;
pub mod quantize;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

#[cfg(test)]
mod tests;

pub use attention::{attend, attend_paged, axpy_f32, dot_f32};
pub use blocks::{BlockQ4_1, BlockQ8_0, QBlocks};
pub use isa::{Isa, available_isas, best_isa};
pub use matmul::{matmul, matmul_with};
pub use packing::{PackedWeights, Q4Group, Q8Group};
pub use quantize::{ActBlock, quantize_row, quantize_rows};

/// Values per quantization block.
pub const QK: usize = 32;
/// Output columns packed together: sixteen f32 lanes of one AVX-512
/// register (two AVX2 registers).
pub const GROUP: usize = 16;
