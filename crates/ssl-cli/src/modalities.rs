//! The five modalities as [`Pipeline`]s: each names its crate's configuration, embedded
//! sample and pipeline calls (every crate's pipeline has the same shape, so one macro writes
//! the five implementations).

use std::path::{Path, PathBuf};

use ssl_core::finetune::{FinetuneConfig, FinetuneReport};
use ssl_core::run_dir::RunOptions;
use ssl_core::TrainConfig;

use crate::pipelines::{json, Pipeline, Sample};
use crate::CliError;

/// Declares `$name` as the [`Pipeline`] of configuration `$cfg` with the embedded sample
/// `$file` (`$what`) and the crate functions `$pretrain`, `$stored`, `$embed`, `$eval`.
macro_rules! pipeline {
    ($(#[$doc:meta])* $name:ident: $cfg:ty, $file:literal, $what:literal,
     $pretrain:path, $stored:path, $embed:path, $eval:path
     $(, finetune: $ft_defaults:path, $finetune:path)?) => {
        $(#[$doc])*
        pub struct $name;

        impl Pipeline for $name {
            type Config = $cfg;
            const SAMPLE: Sample = Sample {
                file: $file,
                bytes: include_bytes!(concat!("../data/", $file)),
                what: $what,
            };
            fn train(cfg: &$cfg) -> &TrainConfig {
                &cfg.train
            }
            fn pretrain(
                cfg: $cfg,
                data: &[String],
                out: &Path,
                opts: &RunOptions,
            ) -> Result<(), CliError> {
                $pretrain(cfg, data, out, opts)?.print();
                Ok(())
            }
            fn stored_config(checkpoint: &Path) -> Result<(PathBuf, $cfg), CliError> {
                Ok($stored(checkpoint)?)
            }
            fn embed(ckpt: &Path, cfg: &$cfg, data: &[String], out: &Path) -> Result<(), CliError> {
                eprintln!("{}", $embed(ckpt, cfg, data, out)?);
                Ok(())
            }
            fn eval(
                ckpt: &Path,
                cfg: &$cfg,
                data: &[String],
                test: &[String],
                label: Option<&str>,
            ) -> Result<serde_json::Value, CliError> {
                json(&$eval(ckpt, cfg, data, test, label)?)
            }
            $(
            fn finetune_defaults() -> Option<FinetuneConfig> {
                Some($ft_defaults())
            }
            fn finetune(
                ckpt: &Path,
                cfg: &$cfg,
                ft: &FinetuneConfig,
                data: &[String],
                test: &[String],
                out: &Path,
                opts: &RunOptions,
            ) -> Result<FinetuneReport, CliError> {
                Ok($finetune(ckpt, cfg, ft, data, test, out, opts)?)
            }
            )?
        }
    };
}

pipeline!(
    /// Numeric feature sequences (ssl-timeseries' `features` pipeline).
    Features: ssl_timeseries::FeaturesConfig,
    "basic_motions_train.parquet",
    "UEA BasicMotions, 40 recordings x 6 channels x 100 steps",
    ssl_timeseries::pretrain_features,
    ssl_timeseries::pipeline::features::stored_config,
    ssl_timeseries::embed_features,
    ssl_timeseries::eval_features
);

pipeline!(
    /// Time series (ssl-timeseries' `timeseries` pipeline).
    Timeseries: ssl_timeseries::TimeseriesConfig,
    "gunpoint_train.parquet",
    "UCR GunPoint, 50 series x 150 steps",
    ssl_timeseries::pretrain_timeseries,
    ssl_timeseries::pipeline::timeseries::stored_config,
    ssl_timeseries::embed_timeseries,
    ssl_timeseries::eval_timeseries,
    finetune: ssl_timeseries::finetune_timeseries_config, ssl_timeseries::finetune_timeseries
);

pipeline!(
    /// Text (ssl-text); `stored_config` also takes a Hugging Face directory.
    Text: ssl_text::TextConfig,
    "spdx_licenses_sample.parquet",
    "120 SPDX licence texts, CC0",
    ssl_text::pretrain,
    ssl_text::stored_config,
    ssl_text::embed,
    ssl_text::eval,
    finetune: ssl_text::finetune_config, ssl_text::finetune
);

pipeline!(
    /// Images (ssl-vision).
    Vision: ssl_vision::VisionConfig,
    "fashion_mnist_sample.parquet",
    "1,500 Fashion-MNIST images, 28x28 grey",
    ssl_vision::pretrain,
    ssl_vision::stored_config,
    ssl_vision::embed,
    ssl_vision::eval,
    finetune: ssl_vision::finetune_config, ssl_vision::finetune
);

pipeline!(
    /// Image-caption pairs (ssl-multimodal); `--set embed.tower=image|text`.
    Multimodal: ssl_multimodal::MultimodalConfig,
    "emoji_sample.parquet",
    "400 emoji, 32x32, with their names",
    ssl_multimodal::pretrain,
    ssl_multimodal::stored_config,
    ssl_multimodal::embed,
    ssl_multimodal::eval
);
