//! The project's seeded random-number generator.
//!
//! candle's own CPU generator cannot be seeded, so every random choice (initialisation, masks,
//! augmentations, dropout, shuffling) draws from an [`SslRng`]: ChaCha8, whose whole state is
//! serialisable, so a resumed run continues the exact random stream of an uninterrupted one.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// A seeded, serialisable random-number generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SslRng(ChaCha8Rng);

impl SslRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SslRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// An independent generator for a named purpose: same seed and name give the same stream.
    pub fn derived(seed: u64, purpose: &str) -> Self {
        // FNV-1a of the purpose, mixed into the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in purpose.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        SslRng::new(seed ^ h.rotate_left(17))
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        self.0.random::<f32>()
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform_range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// A standard normal sample.
    pub fn normal(&mut self) -> f32 {
        StandardNormal.sample(&mut self.0)
    }

    /// `n` normal samples with mean `mean` and standard deviation `std`.
    pub fn normal_vec(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }

    /// `n` uniform samples in `[lo, hi)`.
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform_range(lo, hi)).collect()
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// True with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.0.random::<f64>() < p
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// A random `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_json_mid_stream() {
        let mut a = SslRng::new(7);
        for _ in 0..13 {
            a.normal();
        }
        let saved = serde_json::to_string(&a).unwrap();
        let mut b: SslRng = serde_json::from_str(&saved).unwrap();
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            assert_eq!(a.normal().to_bits(), b.normal().to_bits());
        }
    }

    #[test]
    fn derived_streams_differ_by_purpose() {
        let mut a = SslRng::derived(1, "init");
        let mut b = SslRng::derived(1, "mask");
        let mut c = SslRng::derived(1, "init");
        let x = a.next_u64();
        assert_ne!(x, b.next_u64());
        assert_eq!(x, c.next_u64());
    }

    #[test]
    fn normal_moments() {
        let mut r = SslRng::new(3);
        let v = r.normal_vec(20_000, 1.0, 2.0);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "{var}");
    }
}
