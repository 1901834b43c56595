//! The hot loops of ranking, compiled for AVX2 as well and picked at run time. The
//! release build targets baseline x86-64 (128-bit SSE2, no `roundps`); a loop only gets
//! wider registers when it is compiled inside a `#[target_feature]` function, so each
//! kernel's body is inlined into one such function. (An AVX-512 copy was no faster:
//! LLVM keeps to 256-bit registers for it unless tuned for one CPU.) Every level gives
//! the same bits: the f32 sum has a fixed lane order (no reassociation, no fused
//! multiply-add), the integer sum is exact, and rounding is exact by definition.

/// The widest vector extension a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Portable,
    Avx2,
}

impl Level {
    /// What this CPU has (std caches the detection: a load and a test per call).
    #[inline]
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Level::Avx2;
        }
        Level::Portable
    }

    /// This CPU's level and every one below it (for the tests that compare them).
    pub fn available() -> Vec<Self> {
        match Self::detect() {
            Level::Portable => vec![Level::Portable],
            Level::Avx2 => vec![Level::Portable, Level::Avx2],
        }
    }
}

/// Partial sums of the f32 dot product: eight AVX2 registers, enough to hide the
/// latency of the additions (a 10,000 x 512 scan: 2.0 ms with 64 lanes vs 2.5 with 8).
const LANES: usize = 64;

/// `a . b` in f32, with `LANES` partial sums reduced in a fixed order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_at(Level::detect(), a, b)
}

/// The largest `|x|` of `v`, NaNs skipped (0 for an empty slice). A fold through one
/// accumulator is a serial chain of `maxss` (four cycles each: 1.7 us a 1,280-value
/// row, most of the time to load a cache); `LANES` accumulators vectorize. The same
/// value in any order: max is exact, and no -0.0 survives `abs`.
pub fn max_abs(v: &[f32]) -> f32 {
    max_abs_at(Level::detect(), v)
}

/// Appends `round(v / scale)` clamped to [-127, 127] for each value to `out`.
pub fn quantize(v: &[f32], scale: f32, out: &mut Vec<i8>) {
    quantize_at(Level::detect(), v, scale, out)
}

/// Defines `$name(level, args)`: the portable `$body` compiled once per level.
macro_rules! kernel {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        pub fn $name(level: Level, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if level == Level::Avx2 {
                    // SAFETY: `level` is at most what `Level::detect` found on this CPU.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            $body($($arg),*)
        }
    };
}

kernel!(dot_at, dot_body, (a: &[f32], b: &[f32]) -> f32);
kernel!(idot_at, idot_body, (a: &[i8], b: &[i16]) -> i32);
kernel!(quantize_at, quantize_body, (v: &[f32], scale: f32, out: &mut Vec<i8>) -> ());
kernel!(max_abs_at, max_abs_body, (v: &[f32]) -> f32);

#[inline(always)]
fn max_abs_body(v: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(0f32, |m, x| m.max(x.abs()));
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i].abs());
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

/// LLVM turns it into widening multiply-adds (`vpmaddwd` on AVX2).
#[inline(always)]
fn idot_body(a: &[i8], b: &[i16]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// Without SSE4.1, `f32::round` is a call to libm's `roundf` for each value.
#[inline(always)]
fn quantize_body(v: &[f32], scale: f32, out: &mut Vec<i8>) {
    out.extend(v.iter().map(|x| {
        let q = (x / scale).round().clamp(-127.0, 127.0);
        // NaN to 0 as `as` would; then the value is a whole number within i8, and the
        // unchecked conversion vectorizes where `as`'s saturating one (branches for
        // NaN and overflow) was scalar: 13 ms for 10,000 rows of 1,280, now 3.
        let q = if q.is_nan() { 0.0 } else { q };
        // SAFETY: `q` is finite and within [-127, 127].
        unsafe { q.to_int_unchecked::<i32>() as i8 }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u32, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn every_level_gives_the_same_bits() {
        let levels = Level::available();
        assert_eq!(levels[0], Level::Portable);
        for n in [0, 1, 3, 63, 64, 100, 512, 1280, 1283] {
            let (a, b) = (values(1, n), values(2, n));
            let codes: Vec<i8> = values(3, n).iter().map(|x| (x * 254.0) as i8).collect();
            let wide: Vec<i16> = b.iter().map(|x| (x * 65534.0) as i16).collect();
            // Exact halves (ties round away from zero), and values past the clamp.
            let mut q = a.clone();
            q.extend([0.5, -0.5, 1.5, -2.5, 126.5, 1e9, -1e9, 0.0, -0.0, f32::NAN]);
            q.extend([f32::INFINITY, f32::NEG_INFINITY]);
            let first = (
                dot_at(levels[0], &a, &b).to_bits(),
                idot_at(levels[0], &codes, &wide),
                {
                    let mut out = Vec::new();
                    quantize_at(levels[0], &q, 1.0 / 127.0, &mut out);
                    out
                },
                max_abs_at(levels[0], &a).to_bits(),
            );
            // The plain fold it replaces, NaNs skipped.
            let fold = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(first.3, fold(&a).to_bits(), "{n} values");
            let mut odd = a.clone();
            odd.extend([f32::NAN, -0.0, -7.0]);
            for &level in &levels {
                assert_eq!(max_abs_at(level, &odd), fold(&odd), "{level:?}, {n} values");
            }
            for &level in &levels[1..] {
                let mut out = Vec::new();
                quantize_at(level, &q, 1.0 / 127.0, &mut out);
                let got = (
                    dot_at(level, &a, &b).to_bits(),
                    idot_at(level, &codes, &wide),
                    out,
                    max_abs_at(level, &a).to_bits(),
                );
                assert_eq!(got, first, "{level:?}, {n} values");
            }
        }
        let mut out = Vec::new();
        let v = [0.5, -0.5, 1.5, 300.0, f32::NAN, -1e30];
        quantize_at(Level::detect(), &v, 1.0, &mut out);
        assert_eq!(out, [1, -1, 2, 127, 0, -127]);
        assert_eq!(max_abs(&[f32::NAN, -3.0, 2.0]), 3.0);
        assert_eq!(max_abs(&[]), 0.0);
        let naive: f32 = values(1, 1280)
            .iter()
            .zip(values(2, 1280))
            .map(|(x, y)| x * y)
            .sum();
        assert!((dot(&values(1, 1280), &values(2, 1280)) - naive).abs() < 1e-3);
    }
}
