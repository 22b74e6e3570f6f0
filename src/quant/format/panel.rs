//! The CPU decode kernels' layout of a 4-bit weight: panels of eight rows
//! ([`crate::quant::cpu::w4_panel`] multiplies it). For each panel and 32-chunk `c` of the
//! input, 128 bytes: four 32-byte words, word `j` holding at bytes `4r .. 4r + 4` the codes of
//! row `r` for inputs `32c + 4j ..` (low nibbles) and `32c + 16 + 4j ..` (high nibbles). One
//! broadcast 4-byte piece of a token's activations meets a word's nibbles in one `vpdpbusd`, lane
//! `r` collecting row `r`'s products: after the chunk's eight pieces lane `r` holds row `r`'s exact
//! integer dot product, with no horizontal sum (the row-major layout of [`PackedQ4`] needs one per
//! row and chunk pair). Per panel and group, the eight rows' f16 scales then their zeros (small
//! integers, exact in f16): one load and one conversion each for all eight rows.
//!
//! Built from a [`PackedQ4`] on first use ([`PackedQ4::panels`]); the bytes are the same codes.
use super::packed::PackedQ4;
use half::f16;

/// Rows of a panel.
pub const PANEL_ROWS: usize = 8;

#[derive(Debug, Clone)]
pub struct PanelQ4 {
    pub n: usize,
    pub k: usize,
    pub group_size: usize,
    /// `[n / 8][k / 32][4 words][8 rows][4]` (see the module docs).
    pub codes: Vec<u8>,
    /// `[n / 8][groups][scales of the 8 rows, then their zeros]`.
    pub sz: Vec<f16>,
}

impl PanelQ4 {
    /// Whether `w` can be laid out in panels: whole panels of rows.
    pub fn fits(w: &PackedQ4) -> bool {
        w.shape.n.is_multiple_of(PANEL_ROWS) && w.shape.k.is_multiple_of(32)
    }

    /// `w` in panels; `w` must [`fit`](Self::fits).
    pub fn from_packed(w: &PackedQ4) -> Self {
        assert!(Self::fits(w), "a {}×{} weight is not whole panels of {PANEL_ROWS} rows", w.shape.n, w.shape.k);
        let (n, k, g) = (w.shape.n, w.shape.k, w.shape.group_size);
        let (chunks, groups) = (k / 32, w.groups());
        let mut codes = vec![0u8; n * k / 2];
        let mut sz = vec![f16::ZERO; n * groups * 2];
        for p in 0..n / PANEL_ROWS {
            let dst = &mut codes[p * chunks * 128..(p + 1) * chunks * 128];
            for r in 0..PANEL_ROWS {
                let o = p * PANEL_ROWS + r;
                for c in 0..chunks {
                    for j in 0..4 {
                        for e in 0..4 {
                            let i = 32 * c + 4 * j + e;
                            dst[c * 128 + j * 32 + r * 4 + e] = w.code(o, i) | w.code(o, i + 16) << 4;
                        }
                    }
                }
                for gi in 0..groups {
                    let at = (p * groups + gi) * 2 * PANEL_ROWS;
                    sz[at + r] = w.scales[o * groups + gi];
                    sz[at + PANEL_ROWS + r] = f16::from_f32(f32::from(w.zeros[o * groups + gi]));
                }
            }
        }
        Self { n, k, group_size: g, codes, sz }
    }

    /// Panel `p`'s codes (`k / 32` chunks of 128 bytes).
    pub fn panel_codes(&self, p: usize) -> &[u8] {
        let len = self.k / 32 * 128;
        &self.codes[p * len..(p + 1) * len]
    }

    /// Panel `p`'s scales and zeros (`groups` times 16).
    pub fn panel_sz(&self, p: usize) -> &[f16] {
        let len = self.k / self.group_size * 2 * PANEL_ROWS;
        &self.sz[p * len..(p + 1) * len]
    }
}
