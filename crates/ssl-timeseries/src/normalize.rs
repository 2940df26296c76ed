//! How series are scaled before a model sees them (`data.normalize`): each channel
//! standardised with the training set's mean and standard deviation (TS2Vec's reference fits a
//! `StandardScaler` on the training data's channels), each series z-normalised on its own, or
//! left as read. The channel statistics are measured on a bounded sample at pretraining
//! ([`ChannelMoments`]), stored in the run's configuration and applied alike by `embed`,
//! `eval` and anything else that reads data for the run ([`Normalization::apply`]).

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use ssl_core::seq::SeqExample;
use ssl_core::Parallel;

use crate::{Result, TsError};

/// The default bound on the training series read to measure the channel statistics
/// (`data.stats_series`).
pub const DEFAULT_STATS_SERIES: usize = 4096;

/// `data.normalize`: how series are scaled before the model sees them.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeMode {
    /// Each channel standardised with the training data's mean and standard deviation
    /// (measured on a bounded sample at pretraining and stored with the run): the scale of a
    /// series relative to the others is kept, as in TS2Vec's reference.
    Channel,
    /// Each channel of each series z-normalised on its own (the amplitude is removed).
    Series,
    /// The values as read.
    None,
}

impl NormalizeMode {
    /// The mode a boolean meant before modes existed: `true` z-normalised each series,
    /// `false` left the values as read.
    pub fn from_bool(b: bool) -> Self {
        if b {
            NormalizeMode::Series
        } else {
            NormalizeMode::None
        }
    }
}

/// Reads `"channel"`, `"series"` or `"none"`, and the booleans of older configurations
/// (`true`: `"series"`, `false`: `"none"`).
impl<'de> Deserialize<'de> for NormalizeMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bool(bool),
            Name(String),
        }
        match Repr::deserialize(d)? {
            Repr::Bool(b) => Ok(NormalizeMode::from_bool(b)),
            Repr::Name(s) => match s.as_str() {
                "channel" => Ok(NormalizeMode::Channel),
                "series" => Ok(NormalizeMode::Series),
                "none" => Ok(NormalizeMode::None),
                "true" | "false" => Ok(NormalizeMode::from_bool(s == "true")),
                other => Err(serde::de::Error::custom(format!(
                    "normalize = {other:?}: expected \"channel\", \"series\" or \"none\" (or a boolean: true = \"series\", false = \"none\")"
                ))),
            },
        }
    }
}

/// Per-channel mean and standard deviation of the training data.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    /// Mean per channel.
    pub mean: Vec<f32>,
    /// Standard deviation per channel (1 for a constant channel, which is only centred).
    pub std: Vec<f32>,
}

impl ChannelStats {
    /// Statistics from `mean` and `std` as stored in a configuration under `key` (`data`):
    /// both of one length, every standard deviation finite and positive.
    pub fn new(mean: Vec<f32>, std: Vec<f32>, key: &str) -> Result<Self> {
        if mean.len() != std.len() || mean.is_empty() {
            return Err(TsError::Config(format!(
                "{key}.channel_mean has {} values and {key}.channel_std {}: give one of each per channel (or leave both empty to measure them at pretraining)",
                mean.len(),
                std.len()
            )));
        }
        if let Some(i) = std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(TsError::Config(format!(
                "{key}.channel_std[{i}] = {}: must be finite and positive",
                std[i]
            )));
        }
        if let Some(i) = mean.iter().position(|m| !m.is_finite()) {
            return Err(TsError::Config(format!(
                "{key}.channel_mean[{i}] = {}: must be finite",
                mean[i]
            )));
        }
        Ok(ChannelStats { mean, std })
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Standardises every observed value of `e` (gaps stay NaN); an error when `e` has
    /// another number of channels.
    pub fn apply(&self, e: &mut SeqExample) -> Result<()> {
        let c = self.channels();
        if e.features != c {
            return Err(TsError::InvalidInput(format!(
                "a series has {} channels but the run's channel statistics (data.channel_mean) have {c}",
                e.features
            )));
        }
        for step in e.values.chunks_mut(c) {
            for ((v, m), s) in step.iter_mut().zip(&self.mean).zip(&self.std) {
                if v.is_finite() {
                    *v = (*v - m) / s;
                }
            }
        }
        Ok(())
    }
}

/// What is done to each series read for a run: the resolved form of `data.normalize` (with
/// the run's channel statistics).
#[derive(Debug, Clone, PartialEq)]
pub enum Normalization {
    /// The values as read.
    None,
    /// Each channel of each series z-normalised on its own.
    Series,
    /// Each channel standardised with the run's statistics.
    Channel(Arc<ChannelStats>),
}

impl Normalization {
    /// The normalisation `mode` names, with the channel statistics `mean` / `std` of the
    /// configuration section `key` (needed, and checked, for [`NormalizeMode::Channel`]: an
    /// error naming the keys when they are empty, which means a run that was never
    /// pretrained with them).
    pub fn resolve(mode: NormalizeMode, mean: &[f32], std: &[f32], key: &str) -> Result<Self> {
        Ok(match mode {
            NormalizeMode::None => Normalization::None,
            NormalizeMode::Series => Normalization::Series,
            NormalizeMode::Channel if mean.is_empty() && std.is_empty() => {
                return Err(TsError::Config(format!(
                    "{key}.normalize = \"channel\" needs {key}.channel_mean and {key}.channel_std: pretraining measures them on the training data and stores them in the run's config.toml (set them, or choose {key}.normalize = \"series\" or \"none\")"
                )))
            }
            NormalizeMode::Channel => Normalization::Channel(Arc::new(ChannelStats::new(
                mean.to_vec(),
                std.to_vec(),
                key,
            )?)),
        })
    }

    /// Applies the normalisation to `e` in place.
    pub fn apply(&self, e: &mut SeqExample) -> Result<()> {
        match self {
            Normalization::None => Ok(()),
            Normalization::Series => {
                e.normalize_instance();
                Ok(())
            }
            Normalization::Channel(stats) => stats.apply(e),
        }
    }
}

/// Running per-channel moments of a sample of series (sum, sum of squares and count of the
/// observed values of each channel), summed over ranks into [`ChannelStats`].
#[derive(Debug, Clone, Default)]
pub struct ChannelMoments {
    /// Per channel: sum, sum of squares, observed values (`3 * channels`).
    sums: Vec<f64>,
    /// Series added.
    series: usize,
}

impl ChannelMoments {
    /// No series yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Series added so far (on this rank).
    pub fn series(&self) -> usize {
        self.series
    }

    /// Adds the observed values of `e`; an error when its channels differ from the first
    /// series'.
    pub fn add(&mut self, e: &SeqExample) -> Result<()> {
        let c = e.features;
        if self.sums.is_empty() {
            self.sums = vec![0.0; 3 * c];
        } else if self.sums.len() != 3 * c {
            return Err(TsError::InvalidInput(format!(
                "a series has {c} channels where the first had {}",
                self.sums.len() / 3
            )));
        }
        for step in e.values.chunks(c.max(1)) {
            for (j, v) in step.iter().enumerate() {
                if v.is_finite() {
                    let v = f64::from(*v);
                    self.sums[3 * j] += v;
                    self.sums[3 * j + 1] += v * v;
                    self.sums[3 * j + 2] += 1.0;
                }
            }
        }
        self.series += 1;
        Ok(())
    }

    /// The statistics over every rank's moments (a collective: every rank calls it), for
    /// `channels` channels (this rank may have read none). A channel never observed, or
    /// constant, gets mean 0 / standard deviation 1 (resp. standard deviation 1), as
    /// scikit-learn's `StandardScaler` does.
    pub fn stats_over_ranks(&self, par: &Parallel, channels: usize) -> Result<ChannelStats> {
        let mut local = vec![0f64; 3 * channels];
        if !self.sums.is_empty() {
            if self.sums.len() != local.len() {
                return Err(TsError::InvalidInput(format!(
                    "the series have {} channels where the data's first had {channels}",
                    self.sums.len() / 3
                )));
            }
            local.copy_from_slice(&self.sums);
        }
        let sums = par.sum_f64(&local)?;
        let (mut mean, mut std) = (Vec::new(), Vec::new());
        for j in 0..channels {
            let (s, s2, n) = (sums[3 * j], sums[3 * j + 1], sums[3 * j + 2]);
            if n == 0.0 {
                mean.push(0.0);
                std.push(1.0);
                continue;
            }
            let m = s / n;
            let var = (s2 / n - m * m).max(0.0);
            let sd = var.sqrt();
            mean.push(m as f32);
            // A constant channel (relative to its magnitude) is only centred.
            std.push(if sd > 1e-8 * m.abs().max(1.0) {
                sd as f32
            } else {
                1.0
            });
        }
        Ok(ChannelStats { mean, std })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_names_and_the_booleans_of_older_configurations() {
        #[derive(Deserialize)]
        struct D {
            normalize: NormalizeMode,
        }
        let read = |s: &str| toml_like(s).map(|d: D| d.normalize);
        assert_eq!(
            read(r#"{"normalize": "channel"}"#),
            Ok(NormalizeMode::Channel)
        );
        assert_eq!(
            read(r#"{"normalize": "series"}"#),
            Ok(NormalizeMode::Series)
        );
        assert_eq!(read(r#"{"normalize": "none"}"#), Ok(NormalizeMode::None));
        assert_eq!(read(r#"{"normalize": true}"#), Ok(NormalizeMode::Series));
        assert_eq!(read(r#"{"normalize": false}"#), Ok(NormalizeMode::None));
        let err = read(r#"{"normalize": "global"}"#).unwrap_err();
        assert!(
            err.contains("\"global\"") && err.contains("channel"),
            "{err}"
        );
        assert_eq!(
            serde_json::to_string(&NormalizeMode::Channel).unwrap(),
            "\"channel\""
        );
    }

    fn toml_like<T: serde::de::DeserializeOwned>(s: &str) -> std::result::Result<T, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn channel_statistics_standardise_each_channel_and_keep_gaps() {
        // Two channels on very different scales, one gap.
        let mut m = ChannelMoments::new();
        let mut series = Vec::new();
        for i in 0..20 {
            let mut v = Vec::new();
            for t in 0..7 {
                v.push(100.0 + (i * 7 + t) as f32);
                v.push(-0.01 * ((i + t) % 5) as f32);
            }
            if i == 3 {
                v[4] = f32::NAN;
            }
            let e = SeqExample::new(v, 7, 2).unwrap();
            m.add(&e).unwrap();
            series.push(e);
        }
        assert_eq!(m.series(), 20);
        let stats = m.stats_over_ranks(&Parallel::single(), 2).unwrap();
        let norm = Normalization::Channel(Arc::new(stats));
        let (mut sum, mut sq, mut n) = ([0f64; 2], [0f64; 2], [0f64; 2]);
        for e in &mut series {
            norm.apply(e).unwrap();
            for step in e.values.chunks(2) {
                for j in 0..2 {
                    if step[j].is_finite() {
                        sum[j] += f64::from(step[j]);
                        sq[j] += f64::from(step[j]).powi(2);
                        n[j] += 1.0;
                    }
                }
            }
        }
        assert!(series[3].values[4].is_nan());
        for j in 0..2 {
            let mean = sum[j] / n[j];
            let std = (sq[j] / n[j] - mean * mean).sqrt();
            assert!(mean.abs() < 1e-4, "channel {j}: mean {mean}");
            assert!((std - 1.0).abs() < 1e-3, "channel {j}: std {std}");
        }
        // The wrong number of channels is refused.
        let mut one = SeqExample::new(vec![1.0; 4], 4, 1).unwrap();
        assert!(norm.apply(&mut one).is_err());
    }

    #[test]
    fn a_constant_channel_is_centred_and_a_channel_mode_needs_statistics() {
        let mut m = ChannelMoments::new();
        m.add(&SeqExample::new(vec![5.0; 6], 6, 1).unwrap())
            .unwrap();
        let s = m.stats_over_ranks(&Parallel::single(), 1).unwrap();
        assert_eq!((s.mean[0], s.std[0]), (5.0, 1.0));
        let err = Normalization::resolve(NormalizeMode::Channel, &[], &[], "data").unwrap_err();
        assert!(err.to_string().contains("data.channel_mean"), "{err}");
        let err = Normalization::resolve(NormalizeMode::Channel, &[0.0, 1.0], &[1.0], "data")
            .unwrap_err();
        assert!(err.to_string().contains("data.channel_std"), "{err}");
        let err =
            Normalization::resolve(NormalizeMode::Channel, &[0.0], &[0.0], "data").unwrap_err();
        assert!(err.to_string().contains("channel_std[0]"), "{err}");
        assert_eq!(
            Normalization::resolve(NormalizeMode::Series, &[], &[], "data").unwrap(),
            Normalization::Series
        );
    }
}
