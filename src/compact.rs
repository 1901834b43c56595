//! The compact form of the cached vectors: each row as int8 codes with one scale (the
//! row's largest magnitude / 127), a quarter of its f32 bytes. A query is scored against
//! the codes in integers (the query as int16 codes), which ranks candidates; their exact
//! cosines come from the stored f32 vectors (`vectors` rescoring). Integer sums are
//! exact in any order, so every CPU path and thread split gives the same approximate
//! scores.

/// Per-row symmetric int8 quantization: writes `out` (the row's codes), returns the
/// scale that multiplies them back (0 for an all-zero row).
pub fn quantize_row(v: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = crate::simd::max_abs(v);
    if !max.is_finite() || max == 0.0 {
        out.extend(std::iter::repeat_n(0, v.len()));
        return 0.0;
    }
    let scale = max / 127.0;
    crate::simd::quantize(v, scale, out);
    scale
}

/// A query in int16 codes, scaled so that no sum against int8 rows can overflow an i32.
pub struct QueryCodes {
    codes: Vec<i16>,
    scale: f32,
    /// Bounds the rounding error of a row's approximate score (see `error_bound`).
    l1: f32,
    own_error: f32,
    /// The CPU path of its scans, found once a query rather than once a row.
    level: crate::simd::Level,
}

impl QueryCodes {
    pub fn new(q: &[f32]) -> Self {
        let dim = q.len().max(1);
        // |sum| <= 127 * top * dim must stay below 2^31.
        let top = (i32::MAX as usize / (127 * dim)).min(i16::MAX as usize) as f32;
        let max = crate::simd::max_abs(q);
        let scale = if max.is_finite() && max > 0.0 {
            max / top
        } else {
            0.0
        };
        let codes = q
            .iter()
            .map(|x| {
                if scale == 0.0 {
                    0
                } else {
                    (x / scale).round().clamp(-top, top) as i16
                }
            })
            .collect();
        let l1 = q.iter().map(|x| x.abs()).sum();
        Self {
            codes,
            scale,
            l1,
            // Each query code is off by at most scale/2, against row values of at most
            // 1 in magnitude (unit vectors): sqrt(dim) bounds their l1 norm.
            own_error: scale / 2.0 * (dim as f32).sqrt(),
            level: crate::simd::Level::detect(),
        }
    }

    /// The approximate dot product with a row's codes.
    #[inline(always)]
    pub fn score(&self, row: &[i8], row_scale: f32) -> f32 {
        crate::simd::idot_at(self.level, row, &self.codes) as f32 * (row_scale * self.scale)
    }

    /// How far `score` can be from the exact dot product of the unit row: each row code
    /// is off by at most row_scale/2 times the query's value, and the query's own
    /// rounding adds `own_error`. Doubled for the f32 arithmetic's own error.
    #[inline(always)]
    pub fn error_bound(&self, row_scale: f32) -> f32 {
        2.0 * (row_scale / 2.0 * self.l1 + self.own_error) + 1e-6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u32, dim: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.into_iter().map(|a| a / n).collect()
    }

    #[test]
    fn approximate_scores_stay_within_their_bound() {
        for dim in [3, 512, 1280] {
            let q = QueryCodes::new(&unit(1, dim));
            let mut worst = 0f32;
            for seed in 2..200 {
                let v = unit(seed, dim);
                let mut codes = Vec::new();
                let s = quantize_row(&v, &mut codes);
                assert_eq!(codes.len(), dim);
                let exact: f32 = unit(1, dim).iter().zip(&v).map(|(a, b)| a * b).sum();
                let err = (q.score(&codes, s) - exact).abs();
                assert!(
                    err <= q.error_bound(s),
                    "dim {dim}: {err} > {}",
                    q.error_bound(s)
                );
                worst = worst.max(err);
            }
            // Close enough to rank candidates: far below the gaps between products.
            assert!(worst < 0.01, "dim {dim}: worst error {worst}");
        }
    }

    #[test]
    fn zero_and_extreme_rows_do_not_overflow() {
        let mut codes = Vec::new();
        assert_eq!(quantize_row(&[0.0; 4], &mut codes), 0.0);
        assert_eq!(codes, [0; 4]);
        let dim = 4096;
        let ones = vec![1.0f32; dim];
        let q = QueryCodes::new(&ones);
        let mut codes = Vec::new();
        let s = quantize_row(&ones, &mut codes);
        assert!((q.score(&codes, s) - dim as f32).abs() < 0.01 * dim as f32);
        let neg: Vec<f32> = ones.iter().map(|x| -x).collect();
        let mut codes = Vec::new();
        let s = quantize_row(&neg, &mut codes);
        assert!((q.score(&codes, s) + dim as f32).abs() < 0.01 * dim as f32);
    }
}
