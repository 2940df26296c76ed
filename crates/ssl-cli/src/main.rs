//! `ssl`: pretrain, embed, evaluate and configure self-supervised models from TOML.
//!
//! ```text
//! ssl pretrain <modality> [--config FILE] [--data PATH...] [--out DIR] [--set key=value...] [--resume]
//! ssl embed    <modality> --checkpoint DIR --data PATH... --out FILE.parquet
//! ssl eval     <modality> --checkpoint DIR --data PATH... [--test PATH...] [--label-column NAME]
//! ssl finetune <modality> --checkpoint DIR --data TRAIN... [--test TEST...] --out DIR [--label-fraction F...] [--frozen]
//! ssl config   <modality> [--finetune]
//! ssl tokenizer train --data PATH... --column text --out DIR [--heldout PATH...] [--set key=value...]
//! ssl detect fit   --checkpoint MAE_DIR --data NORMAL.parquet --out DET_DIR [--set detect.key=value...]
//! ssl detect score --detector DET_DIR --data IMAGES.parquet --out SCORES.parquet
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod config;
mod detect;
mod error;
mod modalities;
mod pipelines;
mod tokenizer;

pub use error::CliError;

// mimalloc keeps freed buffers instead of returning every page to the kernel: Parquet reads
// and tensor temporaries page-fault far less (ssl-data's benchmark: 1.6x faster reads);
// `main` also turns its purge off (`ssl_core::keep_freed_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ssl",
    version,
    about = "Self-supervised learning on unlabelled Parquet data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The data modalities `ssl` trains.
#[derive(Copy, Clone, Debug, ValueEnum)]
enum Modality {
    /// Numeric feature sequences (batch, seq, features): masked, contrastive or denoising.
    Features,
    /// Time series: PatchTST / TS2Vec convolutions / GRU / LSTM with TS2Vec contrastive,
    /// masked reconstruction or forecasting.
    Timeseries,
    /// Text: BERT masked language modelling (from scratch or adapted from a Hugging Face directory).
    Text,
    /// Images: a ViT trained as a masked autoencoder (MAE) or with SimCLR.
    Vision,
    /// Image-caption pairs: CLIP-style contrastive training of a ViT and a BERT tower
    /// (`ssl embed multimodal --set embed.tower=text` for the captions' embeddings).
    Multimodal,
}

/// What `ssl config` prints: a modality's configuration or the detector's.
#[derive(Copy, Clone, Debug, ValueEnum)]
enum ConfigTarget {
    /// `ssl pretrain features`.
    Features,
    /// `ssl pretrain timeseries`.
    Timeseries,
    /// `ssl pretrain text`.
    Text,
    /// `ssl pretrain vision`.
    Vision,
    /// `ssl pretrain multimodal`.
    Multimodal,
    /// `ssl detect fit` (its `detect.*` and `data.*` keys).
    Detect,
}

impl ConfigTarget {
    fn modality(self) -> Option<Modality> {
        match self {
            ConfigTarget::Features => Some(Modality::Features),
            ConfigTarget::Timeseries => Some(Modality::Timeseries),
            ConfigTarget::Text => Some(Modality::Text),
            ConfigTarget::Vision => Some(Modality::Vision),
            ConfigTarget::Multimodal => Some(Modality::Multimodal),
            ConfigTarget::Detect => None,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train an encoder with a pretext task; writes config.toml, metrics.jsonl, checkpoints/, loss.png.
    Pretrain {
        /// What kind of data.
        modality: Modality,
        /// TOML configuration (defaults: `ssl config <modality>`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Parquet files, directories or globs (default: the embedded sample).
        #[arg(long, num_args = 1..)]
        data: Vec<String>,
        /// Run directory.
        #[arg(long, default_value = "runs/pretrain")]
        out: PathBuf,
        /// Override a config key, e.g. --set train.max_steps=500 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue from the newest checkpoint in the run directory.
        #[arg(long)]
        resume: bool,
    },
    /// Write embeddings (id, embedding) of a data set to Parquet.
    Embed {
        /// What kind of data.
        modality: Modality,
        /// A run directory or a checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Parquet files, directories or globs.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// Output Parquet file.
        #[arg(long)]
        out: PathBuf,
        /// Override a config key of the checkpoint's configuration (data.* keys).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Evaluate frozen embeddings: pretext loss, and linear-probe / k-NN accuracy with labels.
    Eval {
        /// What kind of data.
        modality: Modality,
        /// A run directory or a checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Training data for the probes (Parquet files, directories or globs).
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// Test data (default: a seeded stratified 20% hold-out of --data).
        #[arg(long, num_args = 1..)]
        test: Vec<String>,
        /// Label column (default: the config's data.label_column).
        #[arg(long)]
        label_column: Option<String>,
        /// Override a config key of the checkpoint's configuration (data.* keys).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Fine-tune a classifier from a pretrained run (text, vision, timeseries) on label
    /// fractions, against the same model from random initialisation; prints the report
    /// (also OUT/report.json), each run's checkpoints under OUT/fraction-F/{pretrained,scratch}.
    Finetune {
        /// What kind of data.
        modality: Modality,
        /// A pretrained run directory, a checkpoint directory, or (text) a Hugging Face BERT
        /// directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Labelled training data (Parquet files, directories or globs).
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// Test data (default: a seeded stratified 20% hold-out of --data).
        #[arg(long, num_args = 1..)]
        test: Vec<String>,
        /// Directory of the fine-tuning runs and the report.
        #[arg(long)]
        out: PathBuf,
        /// Label column (default: finetune.label_column, "label").
        #[arg(long)]
        label_column: Option<String>,
        /// Fractions of the labelled rows, each its own run, e.g. --label-fraction 0.01 0.1 1
        /// (drawn per class, seeded by finetune.seed).
        #[arg(long, num_args = 1..)]
        label_fraction: Vec<f64>,
        /// Train the head only, on the frozen encoder's standardised features, at
        /// finetune.frozen_lr (default: full fine-tuning).
        #[arg(long)]
        frozen: bool,
        /// TOML of fine-tuning settings (`ssl config <modality> --finetune` prints them).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a setting: finetune.* keys (e.g. finetune.train.lr=1e-4) or the
        /// checkpoint's data.* keys (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue the runs in --out from their newest checkpoints.
        #[arg(long)]
        resume: bool,
    },
    /// Tokenizer commands.
    Tokenizer {
        /// What to do.
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Print a modality's (or the detector's) default configuration as commented TOML.
    Config {
        /// A modality, or `detect` for `ssl detect fit`'s settings.
        modality: ConfigTarget,
        /// Print the modality's `ssl finetune` settings instead.
        #[arg(long)]
        finetune: bool,
    },
    /// Defect detection learned from normal images only, on a pretrained MAE.
    Detect {
        #[command(subcommand)]
        action: DetectAction,
    },
}

#[derive(Subcommand)]
enum DetectAction {
    /// Fit on defect-free images: memory bank, normal statistics, calibrated threshold.
    Fit {
        /// An MAE run directory or checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Normal (defect-free) images: Parquet files, directories or globs.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// Detector directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Override a setting, e.g. --set detect.scorers=["patch_core"] (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Score images: score, flag and a heat-map PNG per image.
    Score {
        /// A directory written by `ssl detect fit`.
        #[arg(long)]
        detector: PathBuf,
        /// Images to score: Parquet files, directories or globs.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// Output Parquet file (id, score, flag, heatmap, score_<scorer>...).
        #[arg(long)]
        out: PathBuf,
        /// Heat-map directory (default: `<out stem>_heatmaps` beside --out).
        #[arg(long)]
        heatmaps: Option<PathBuf>,
        /// Override a key of the stored configuration (data.* keys).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a BPE / WordPiece / Unigram tokenizer on a Parquet text column (streamed) and
    /// write DIR/tokenizer.json; with --heldout, print its fertility (tokens per word) there.
    Train {
        /// Parquet files, directories or globs.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// Text column.
        #[arg(long, default_value = "text")]
        column: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// TOML with the tokenizer settings (keys of `[tokenizer.train]` in `ssl config text`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a setting, e.g. --set kind=bpe --set vocab_size=16000 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Held-out Parquet data for the fertility report.
        #[arg(long, num_args = 1..)]
        heldout: Vec<String>,
        /// A generic tokenizer.json to compare fertility with (e.g. a pretrained model's).
        #[arg(long)]
        generic: Option<PathBuf>,
    },
}

/// Runs `$body` with `$p` naming the [`pipelines::Pipeline`] of `$modality`.
macro_rules! with_pipeline {
    ($modality:expr, $p:ident => $body:expr) => {
        match $modality {
            Modality::Features => {
                type $p = modalities::Features;
                $body
            }
            Modality::Timeseries => {
                type $p = modalities::Timeseries;
                $body
            }
            Modality::Text => {
                type $p = modalities::Text;
                $body
            }
            Modality::Vision => {
                type $p = modalities::Vision;
                $body
            }
            Modality::Multimodal => {
                type $p = modalities::Multimodal;
                $body
            }
        }
    };
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Pretrain {
            modality,
            config,
            data,
            out,
            set,
            resume,
        } => with_pipeline!(modality, P => {
            pipelines::pretrain::<P>(config.as_deref(), &data, &out, &set, resume)
        }),
        Command::Embed {
            modality,
            checkpoint,
            data,
            out,
            set,
        } => with_pipeline!(modality, P => pipelines::embed::<P>(&checkpoint, &data, &out, &set)),
        Command::Eval {
            modality,
            checkpoint,
            data,
            test,
            label_column,
            set,
        } => with_pipeline!(modality, P => {
            pipelines::eval::<P>(&checkpoint, &data, &test, label_column.as_deref(), &set)
        }),
        Command::Finetune {
            modality,
            checkpoint,
            data,
            test,
            out,
            label_column,
            label_fraction,
            frozen,
            config,
            set,
            resume,
        } => {
            let args = pipelines::FinetuneArgs {
                config: config.as_deref(),
                label_column: label_column.as_deref(),
                fractions: &label_fraction,
                frozen,
                set: &set,
                resume,
            };
            with_pipeline!(modality, P => {
                pipelines::finetune::<P>(&checkpoint, &data, &test, &out, &args)
            })
        }
        Command::Config { modality, finetune } => {
            let text = match (modality.modality(), finetune) {
                (Some(m), false) => {
                    let name = format!("{m:?}").to_lowercase();
                    with_pipeline!(m, P => pipelines::default_toml::<P>(&name))?
                }
                (Some(m), true) => {
                    let name = format!("{m:?}").to_lowercase();
                    with_pipeline!(m, P => pipelines::finetune_toml::<P>(&name))?
                }
                (None, false) => detect::default_toml()?,
                (None, true) => {
                    return Err(CliError::Config(
                        "the detector has no fine-tuning settings".into(),
                    ))
                }
            };
            print!("{text}");
            Ok(())
        }
        Command::Tokenizer {
            command:
                TokenizerCommand::Train {
                    data,
                    column,
                    out,
                    config,
                    set,
                    heldout,
                    generic,
                },
        } => tokenizer::train(
            config.as_deref(),
            &data,
            &column,
            &out,
            &set,
            &heldout,
            generic.as_deref(),
        ),
        Command::Detect { action } => match action {
            DetectAction::Fit {
                checkpoint,
                data,
                out,
                set,
            } => detect::fit(&checkpoint, &data, &out, &set),
            DetectAction::Score {
                detector,
                data,
                out,
                heatmaps,
                set,
            } => detect::score(&detector, &data, &out, heatmaps.as_deref(), &set),
        },
    }
}

fn main() -> ExitCode {
    ssl_core::keep_freed_memory();
    ssl_core::candle_ops_on_caller();
    if let Some(msg) = misplaced_modality(&std::env::args().collect::<Vec<_>>()) {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    // Long library loops (embedding, evaluation, detection) report progress on stderr.
    ssl_core::monitor::set_progress_enabled(true);
    // The whole command runs on a compute thread (see `ssl_core::on_compute_threads`); MPI and
    // CUDA state is created inside it, on that thread.
    match ssl_core::on_compute_threads(move || run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_report(&e));
            ExitCode::FAILURE
        }
    }
}

/// A modality written after the options (`ssl pretrain --data x.parquet text`), where an
/// option such as `--data` would take it for its value: the message to print instead of
/// clap's "missing <MODALITY>".
fn misplaced_modality(args: &[String]) -> Option<String> {
    let command = args.get(1)?;
    if !matches!(command.as_str(), "pretrain" | "embed" | "eval" | "finetune") {
        return None;
    }
    let is_modality = |a: &str| Modality::from_str(a, true).is_ok();
    if args
        .get(2)
        .is_none_or(|a| is_modality(a) || !a.starts_with("--"))
    {
        return None;
    }
    let word = args[2..]
        .iter()
        .find(|a| is_modality(a) && !std::path::Path::new(a).exists())?;
    Some(format!(
        "the modality goes right after the command: `ssl {command} {word} --data ...` ('{word}' after the options would be read as an option's value, e.g. a data path)"
    ))
}

/// `error: <message>` and one `  caused by: <cause>` line for each cause in the error's
/// chain whose text the message above it does not already carry.
fn error_report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("error: {e}");
    let mut shown = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !shown.contains(&text) {
            out.push_str(&format!("\n  caused by: {text}"));
        }
        shown = text;
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{error_report, misplaced_modality};

    #[test]
    fn a_modality_after_data_is_named() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let msg = misplaced_modality(&args("ssl pretrain --data x.parquet text")).unwrap();
        assert!(msg.contains("ssl pretrain text --data"), "{msg}");
        assert_eq!(
            misplaced_modality(&args("ssl pretrain text --data x.parquet")),
            None
        );
        assert_eq!(misplaced_modality(&args("ssl config text")), None);
        assert_eq!(
            misplaced_modality(&args("ssl eval --data a.parquet --test vision")).unwrap(),
            "the modality goes right after the command: `ssl eval vision --data ...` ('vision' after the options would be read as an option's value, e.g. a data path)"
        );
    }

    #[test]
    fn causes_are_shown_once() {
        let io = std::io::Error::other("disk on fire");
        let e = ssl_core::CoreError::io("writing", "/tmp/x", io);
        let text = error_report(&e);
        assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
        assert!(text.starts_with("error: "), "{text}");
        #[derive(Debug, thiserror::Error)]
        #[error("outer failed")]
        struct Outer(#[source] std::io::Error);
        let text = error_report(&Outer(std::io::Error::other("inner cause")));
        assert_eq!(text, "error: outer failed\n  caused by: inner cause");
    }
}
