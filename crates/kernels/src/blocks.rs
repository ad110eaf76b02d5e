//! GGUF's block formats as the kernels read them, and the parsers from a
//! GGUF tensor's bytes.

use half::f16;

/// A GGUF Q4_1 block: `x = d * q + m`, `q` in 0..16; `qs[j]` holds
/// element `j` in its low nibble and element `j + 16` in its high one.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: u16,
    pub m: u16,
    pub qs: [u8; 16],
}

/// A GGUF Q8_0 block: `x = d * q`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; 32],
}

/// Quantized weights as GGUF stores them: one row of blocks per output
/// column, columns one after another.
pub enum QBlocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

impl BlockQ4_1 {
    /// Reads GGUF Q4_1 blocks (20 bytes each).
    pub fn parse(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(20) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(20)
                .map(|b| {
                    let mut qs = [0u8; 16];
                    qs.copy_from_slice(&b[4..20]);
                    Self {
                        d: u16::from_le_bytes([b[0], b[1]]),
                        m: u16::from_le_bytes([b[2], b[3]]),
                        qs,
                    }
                })
                .collect(),
        )
    }

    /// Reads GGUF Q4_0 blocks (18 bytes: `x = d * (q - 8)`) exactly as Q4_1.
    pub fn parse_q4_0(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(18) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(18)
                .map(|b| {
                    let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                    let mut qs = [0u8; 16];
                    qs.copy_from_slice(&b[2..18]);
                    Self {
                        d: d.to_bits(),
                        m: (d * f16::from_f32(-8.0)).to_bits(),
                        qs,
                    }
                })
                .collect(),
        )
    }
}

impl BlockQ8_0 {
    /// Reads GGUF Q8_0 blocks (34 bytes each).
    pub fn parse(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(34) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(34)
                .map(|b| {
                    let mut qs = [0i8; 32];
                    for (q, byte) in qs.iter_mut().zip(&b[2..34]) {
                        *q = *byte as i8;
                    }
                    Self {
                        d: u16::from_le_bytes([b[0], b[1]]),
                        qs,
                    }
                })
                .collect(),
        )
    }
}
