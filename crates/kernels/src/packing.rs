//! GGUF's row-by-row blocks repacked into groups of [`GROUP`] columns, so
//! that one register holds the same inputs of sixteen columns.

use crate::blocks::{BlockQ4_1, BlockQ8_0, QBlocks};
use crate::{GROUP, QK};

/// Sixteen columns' Q4_1 blocks for the same 32 inputs. `qs[64 j + 4 c + i]`
/// is byte `4 j + i` of column `c`'s GGUF block: input `4 j + i` in its low
/// nibble, input `16 + 4 j + i` in its high one.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Q4Group {
    pub(crate) d: [u16; GROUP],
    pub(crate) m: [u16; GROUP],
    pub(crate) qs: [u8; 256],
}

/// Sixteen columns' Q8_0 blocks for the same 32 inputs. `qs[64 j + 4 c + i]`
/// is input `4 j + i` of column `c` plus 128, as the unsigned bytes the
/// fused dot product takes (the sums subtract `128 Σq` again).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct Q8Group {
    pub(crate) d: [u16; GROUP],
    pub(crate) qs: [u8; 512],
}

#[derive(Clone)]
pub(crate) enum Groups {
    Q4_1(Vec<Q4Group>),
    Q8_0(Vec<Q8Group>),
}

/// An `n × k` quantized matrix repacked for [`matmul`]: group `g`'s block
/// `b` at `g * k / QK + b`. Columns past `n` in the last group are zero.
pub struct PackedWeights {
    pub(crate) n: usize,
    pub(crate) kb: usize,
    pub(crate) groups: Groups,
}

/// Lays `rows` (`n` columns of `kb` blocks each, GGUF order) out as groups
/// of [`GROUP`] columns, block by block: `put` writes one column's block
/// into its group at column `c`. `None` when the block count does not
/// match.
fn scatter<B, G: Clone>(
    rows: &[B],
    n: usize,
    kb: usize,
    empty: G,
    put: impl Fn(&mut G, usize, &B),
) -> Option<Vec<G>> {
    if rows.len() != n * kb {
        return None;
    }
    let mut out = vec![empty; n.div_ceil(GROUP) * kb];
    for (col, row) in rows.chunks_exact(kb).enumerate() {
        let (g, c) = (col / GROUP, col % GROUP);
        for (b, block) in row.iter().enumerate() {
            put(&mut out[g * kb + b], c, block);
        }
    }
    Some(out)
}

impl PackedWeights {
    /// Repacks `n` columns of `k` inputs (a multiple of [`QK`]); `None` when
    /// the block count does not match.
    pub fn pack(blocks: &QBlocks, n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || !k.is_multiple_of(QK) {
            return None;
        }
        let kb = k / QK;
        let groups = match blocks {
            QBlocks::Q4_1(rows) => {
                let empty = Q4Group {
                    d: [0; GROUP],
                    m: [0; GROUP],
                    qs: [0; 256],
                };
                Groups::Q4_1(scatter(rows, n, kb, empty, |dst, c, block| {
                    dst.d[c] = block.d;
                    dst.m[c] = block.m;
                    for j in 0..4 {
                        dst.qs[64 * j + 4 * c..64 * j + 4 * c + 4]
                            .copy_from_slice(&block.qs[4 * j..4 * j + 4]);
                    }
                })?)
            }
            QBlocks::Q8_0(rows) => {
                // Zero columns are stored as 128 (zero plus the offset).
                let empty = Q8Group {
                    d: [0; GROUP],
                    qs: [0x80; 512],
                };
                Groups::Q8_0(scatter(rows, n, kb, empty, |dst, c, block| {
                    dst.d[c] = block.d;
                    for j in 0..8 {
                        for i in 0..4 {
                            dst.qs[64 * j + 4 * c + i] = (block.qs[4 * j + i] as u8) ^ 0x80;
                        }
                    }
                })?)
            }
        };
        Some(Self { n, kb, groups })
    }

    /// The GGUF layout back (to stack matrices that read the same input).
    pub fn unpack(&self) -> QBlocks {
        let kb = self.kb;
        match &self.groups {
            Groups::Q4_1(groups) => QBlocks::Q4_1(
                (0..self.n * kb)
                    .map(|i| {
                        let (col, b) = (i / kb, i % kb);
                        let (g, c) = (col / GROUP, col % GROUP);
                        let src = &groups[g * kb + b];
                        let mut qs = [0u8; 16];
                        for j in 0..4 {
                            qs[4 * j..4 * j + 4]
                                .copy_from_slice(&src.qs[64 * j + 4 * c..64 * j + 4 * c + 4]);
                        }
                        BlockQ4_1 {
                            d: src.d[c],
                            m: src.m[c],
                            qs,
                        }
                    })
                    .collect(),
            ),
            Groups::Q8_0(groups) => QBlocks::Q8_0(
                (0..self.n * kb)
                    .map(|i| {
                        let (col, b) = (i / kb, i % kb);
                        let (g, c) = (col / GROUP, col % GROUP);
                        let src = &groups[g * kb + b];
                        let qs = std::array::from_fn(|e| {
                            let (j, i) = (e / 4, e % 4);
                            (src.qs[64 * j + 4 * c + i] ^ 0x80) as i8
                        });
                        BlockQ8_0 { d: src.d[c], qs }
                    })
                    .collect(),
            ),
        }
    }

    /// One matrix with the columns of all `parts` (same `k`, same format).
    pub fn stack(parts: &[&PackedWeights]) -> Option<PackedWeights> {
        let (first, rest) = parts.split_first()?;
        if rest.iter().any(|p| p.kb != first.kb) {
            return None;
        }
        let n = parts.iter().map(|p| p.n).sum();
        // Parts of whole groups line up as they are (the last may end in a
        // partly filled one); a partly filled group inside would shift the
        // columns after it, so then the columns are packed again.
        if parts[..parts.len() - 1]
            .iter()
            .all(|p| p.n.is_multiple_of(GROUP))
        {
            let mut groups = first.groups.clone();
            for p in rest {
                match (&mut groups, &p.groups) {
                    (Groups::Q4_1(all), Groups::Q4_1(more)) => all.extend_from_slice(more),
                    (Groups::Q8_0(all), Groups::Q8_0(more)) => all.extend_from_slice(more),
                    _ => return None,
                }
            }
            return Some(Self {
                n,
                kb: first.kb,
                groups,
            });
        }
        let mut blocks = first.unpack();
        for p in rest {
            match (&mut blocks, p.unpack()) {
                (QBlocks::Q4_1(all), QBlocks::Q4_1(more)) => all.extend(more),
                (QBlocks::Q8_0(all), QBlocks::Q8_0(more)) => all.extend(more),
                _ => return None,
            }
        }
        Self::pack(&blocks, n, first.kb * QK)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.kb * QK
    }
}
