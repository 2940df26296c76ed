//! The `multimodal` modality: CLIP-style contrastive training of an image tower (ViT) and a
//! text tower (BERT) on image-caption pairs from Parquet (ssl-multimodal); embeddings of
//! either tower; recall@K both ways on held-out pairs and zero-shot classification from
//! class names, each against chance and against untrained towers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use ssl_core::checkpoint::{read_state, resolve_checkpoint, MODEL_FILE};
use ssl_core::{
    parse_device, read_safetensors, LoopTrainer, ParamStore, StopFlag, TrainConfig, Trainer,
};
use ssl_data::{read_all, ColorMode, ColumnSpec, ReadOptions};
use ssl_multimodal::{
    embed_images, embed_token_seqs, holdout_split, keep_best_pairs, pair_batch, read_pairs,
    read_pairs_of, retrieval, tokenize_captions, zero_shot, ClipConfig, ClipModel,
    InMemoryPairSource, MultimodalError, PairColumns, PairSet, TEXT_PREFIX, VISION_PREFIX,
};
use ssl_text::{load_tokenizer, save_tokenizer, train_from_texts, SpecialIds, TokenizerConfig};
use ssl_vision::ViTConfig;
use tokenizers::Tokenizer;

use crate::parallel::Parallel;
use crate::{config, CliError};

/// The embedded default data: 400 Noto emoji (Apache-2.0 images, 32x32 PNG) with their
/// names as captions and their Unicode category and subcategory (MIT data).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/emoji_sample.parquet");

/// ssl-multimodal errors as CLI errors.
pub fn mm(e: MultimodalError) -> CliError {
    match e {
        MultimodalError::Core(c) => CliError::Core(c),
        MultimodalError::Candle(c) => CliError::Candle(c),
        MultimodalError::Data(d) => CliError::Data(d),
        other => CliError::Config(other.to_string()),
    }
}

fn text_err(e: ssl_text::TextError) -> CliError {
    CliError::Config(e.to_string())
}

/// `[data]`: where the pairs are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultimodalDataConfig {
    /// Image column (PNG/JPEG bytes or a `{bytes, path}` struct).
    pub image_column: String,
    /// Caption column.
    pub caption_column: String,
    /// Id column carried into embeddings ("" = `file:row`).
    pub id_column: String,
    /// `rgb` or `grey` (alpha is dropped).
    pub color: ColorMode,
    /// Resize every image to `[height, width]` (empty: keep; all images must then agree).
    pub resize: Vec<usize>,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Use at most the first this many pairs for training and evaluation (0: all; `ssl embed`
    /// embeds every row).
    pub max_pairs: usize,
    /// Fraction of pairs held out (seeded by `train.seed`) from training, for `ssl eval`.
    pub heldout_fraction: f64,
    /// A trained multimodal run or checkpoint that scores the training pairs for filtering.
    pub filter_checkpoint: String,
    /// Drop this fraction of the training pairs, those the filter model scores lowest.
    pub filter_drop_fraction: f64,
}

impl Default for MultimodalDataConfig {
    fn default() -> Self {
        MultimodalDataConfig {
            image_column: "image".into(),
            caption_column: "caption".into(),
            id_column: String::new(),
            color: ColorMode::Rgb,
            resize: vec![32, 32],
            skip_bad_rows: false,
            max_pairs: 0,
            heldout_fraction: 0.2,
            filter_checkpoint: String::new(),
            filter_drop_fraction: 0.0,
        }
    }
}

impl MultimodalDataConfig {
    fn columns(&self, labels: &[String]) -> PairColumns {
        PairColumns {
            image: self.image_column.clone(),
            caption: self.caption_column.clone(),
            id: self.id_column.clone(),
            labels: labels.to_vec(),
            color: self.color,
            resize: self.resize.clone(),
            skip_bad_rows: self.skip_bad_rows,
        }
    }
}

/// `[tokenizer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmTokenizerSection {
    /// An existing `tokenizer.json` ("" = train one on the training captions).
    pub file: String,
    /// Training settings.
    pub train: TokenizerConfig,
}

impl Default for MmTokenizerSection {
    fn default() -> Self {
        MmTokenizerSection {
            file: String::new(),
            train: TokenizerConfig {
                vocab_size: 1000,
                min_frequency: 1,
                ..TokenizerConfig::default()
            },
        }
    }
}

/// `[init]`: start the towers from other runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitSection {
    /// An `ssl pretrain vision` MAE run or checkpoint: its encoder (`vit.*`) becomes the image
    /// tower, with its ViT settings and pixel normalisation.
    pub image_from: String,
    /// An `ssl pretrain text` run or checkpoint: its encoder (`bert.*`) becomes the text
    /// tower, with its BERT settings and tokenizer.
    pub text_from: String,
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmEvalSection {
    /// Recall@K cut-offs.
    pub ks: Vec<usize>,
    /// Text label columns for zero-shot classification (missing columns are an error).
    pub zero_shot_columns: Vec<String>,
    /// Prompt templates; `{}` is the class name.
    pub templates: Vec<String>,
}

impl Default for MmEvalSection {
    fn default() -> Self {
        MmEvalSection {
            ks: vec![1, 5, 10],
            zero_shot_columns: vec!["category".into(), "subcategory".into()],
            templates: vec![
                "an emoji of {}".into(),
                "{}".into(),
                "a picture of {}".into(),
            ],
        }
    }
}

/// Which tower `ssl embed multimodal` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tower {
    /// Images (the image column).
    #[default]
    Image,
    /// Captions (the caption column).
    Text,
}

/// `[embed]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmEmbedSection {
    /// `image` or `text` (`--set embed.tower=text`).
    pub tower: Tower,
}

/// The whole configuration of `ssl pretrain multimodal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultimodalConfig {
    /// Training loop (`accum_steps` must stay 1: use `model.micro_batch` for gradient caching,
    /// which keeps every negative).
    pub train: TrainConfig,
    /// Data.
    pub data: MultimodalDataConfig,
    /// Caption tokenizer.
    pub tokenizer: MmTokenizerSection,
    /// Longest caption in tokens, `[CLS]` and `[SEP]` included.
    pub max_seq_len: usize,
    /// The two towers, the projections and the loss (image size and channels come from
    /// the data, vocabulary from the tokenizer, empty image_mean/std are measured).
    pub model: ClipConfig,
    /// Tower initialisation from other runs.
    pub init: InitSection,
    /// Evaluation.
    pub eval: MmEvalSection,
    /// Embedding extraction.
    pub embed: MmEmbedSection,
}

impl Default for MultimodalConfig {
    fn default() -> Self {
        MultimodalConfig {
            // Sized for the embedded sample: about a minute in release on 2 cores (README).
            // open_clip's AdamW: betas (0.9, 0.98), eps 1e-6, weight decay 0.2, cosine.
            train: TrainConfig {
                max_steps: 300,
                batch_size: 64,
                lr: 1e-3,
                warmup_steps: 30,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6,
                weight_decay: 0.2,
                grad_clip: 1.0,
                checkpoint_every_steps: 100,
                checkpoint_every_minutes: 30.0,
                health_every: 50,
                ..TrainConfig::default()
            },
            data: MultimodalDataConfig::default(),
            tokenizer: MmTokenizerSection::default(),
            max_seq_len: 24,
            model: ClipConfig {
                image: ViTConfig {
                    image_height: 0,
                    image_width: 0,
                    channels: 0,
                    ..ClipConfig::default().image
                },
                image_mean: Vec::new(),
                image_std: Vec::new(),
                ..ClipConfig::default()
            },
            init: InitSection::default(),
            eval: MmEvalSection::default(),
            embed: MmEmbedSection::default(),
        }
    }
}

fn read(paths: &[String], cfg: &MultimodalConfig, labels: &[String]) -> Result<PairSet, CliError> {
    let (mut set, bad) = read_pairs(paths, &cfg.data.columns(labels)).map_err(mm)?;
    if bad.count > 0 {
        eprintln!("skipped {} bad rows: {bad}", bad.count);
    }
    if cfg.data.max_pairs > 0 && set.len() > cfg.data.max_pairs {
        let idx: Vec<usize> = (0..cfg.data.max_pairs).collect();
        set = set.select(&idx);
    }
    Ok(set)
}

/// The stored configuration of another run's checkpoint.
fn stored_config(dir: &str) -> Result<(PathBuf, Value), CliError> {
    let ckpt = resolve_checkpoint(Path::new(dir))?;
    let state = read_state(&ckpt)?;
    Ok((ckpt, state.config))
}

fn field<T: serde::de::DeserializeOwned>(v: &Value, ptr: &str, what: &Path) -> Result<T, CliError> {
    let x = v.pointer(ptr).cloned().ok_or_else(|| {
        CliError::Config(format!(
            "{}: the stored configuration has no `{ptr}`",
            what.display()
        ))
    })?;
    serde_json::from_value(x)
        .map_err(|e| CliError::Config(format!("{}: stored `{ptr}`: {e}", what.display())))
}

/// Fills the data-dependent parts of the configuration (image shape, normalisation,
/// vocabulary; the tower settings of `init.*`) and checks it. `train_images` is this rank's
/// share: the normalisation statistics are taken over every rank's training images.
fn complete_config(
    cfg: &mut MultimodalConfig,
    train_images: &ssl_vision::ImageSet,
    tok: &Tokenizer,
    par: &Parallel,
) -> Result<(), CliError> {
    if cfg.train.accum_steps != 1 {
        return Err(CliError::Config(format!(
            "train.accum_steps = {}: accumulating separate micro-batches loses the negatives across them; set model.micro_batch (gradient caching) instead",
            cfg.train.accum_steps
        )));
    }
    if !cfg.init.image_from.is_empty() {
        let (ckpt, v) = stored_config(&cfg.init.image_from)?;
        let vit: ViTConfig = field(&v, "/model", &ckpt)?;
        cfg.model.image = vit;
        cfg.model.image_mean = field(&v, "/task/augment/mean", &ckpt)?;
        cfg.model.image_std = field(&v, "/task/augment/std", &ckpt)?;
    }
    if !cfg.init.text_from.is_empty() {
        let (ckpt, v) = stored_config(&cfg.init.text_from)?;
        cfg.model.text = field(&v, "/model/config", &ckpt)?;
    }
    let [c, h, w] = train_images.shape;
    let m = &mut cfg.model.image;
    for (key, have, want) in [
        ("model.image.channels", m.channels, c),
        ("model.image.image_height", m.image_height, h),
        ("model.image.image_width", m.image_width, w),
    ] {
        if have != 0 && have != want {
            return Err(CliError::Config(format!(
                "{key} = {have} but the data's images have {want} (set data.resize / data.color to match)"
            )));
        }
    }
    m.channels = c;
    m.image_height = h;
    m.image_width = w;
    if cfg.model.image_mean.is_empty() || cfg.model.image_std.is_empty() {
        let (mean, std) = par.channel_stats(&train_images.data, c, h * w)?;
        if cfg.model.image_mean.is_empty() {
            cfg.model.image_mean = mean;
        }
        if cfg.model.image_std.is_empty() {
            cfg.model.image_std = std.iter().map(|s| s.max(1e-3)).collect();
        }
    }
    let sp = SpecialIds::of(tok).map_err(text_err)?;
    let vocab = tok.get_vocab_size(true);
    if !cfg.init.text_from.is_empty() && cfg.model.text.vocab_size != vocab {
        return Err(CliError::Config(format!(
            "the text tower of {} has {} tokens but the tokenizer {vocab}: use that run's tokenizer",
            cfg.init.text_from, cfg.model.text.vocab_size
        )));
    }
    cfg.model.text.vocab_size = vocab;
    cfg.model.text.pad_token_id = sp.pad;
    if cfg.max_seq_len > cfg.model.text.max_position_embeddings {
        return Err(CliError::Config(format!(
            "max_seq_len = {} exceeds model.text.max_position_embeddings = {}",
            cfg.max_seq_len, cfg.model.text.max_position_embeddings
        )));
    }
    cfg.model.validate().map_err(mm)?;
    cfg.train.validate()?;
    Ok(())
}

/// Builds a model of `cfg` with fresh parameters (seeded by `train.seed`).
fn build(cfg: &MultimodalConfig, device: &Device) -> Result<(ParamStore, ClipModel), CliError> {
    let store = ParamStore::new(device);
    let model = ClipModel::new(&cfg.model, &store.builder(cfg.train.seed)).map_err(mm)?;
    Ok((store, model))
}

/// Loads the towers named in `[init]` into a fresh model.
fn init_towers(cfg: &MultimodalConfig, model: &ClipModel, device: &Device) -> Result<(), CliError> {
    for (from, src_prefix, dst_prefix) in [
        (&cfg.init.image_from, "vit", VISION_PREFIX),
        (&cfg.init.text_from, "bert", TEXT_PREFIX),
    ] {
        if from.is_empty() {
            continue;
        }
        let ckpt = resolve_checkpoint(Path::new(from))?;
        let file = ckpt.join(MODEL_FILE);
        let values = read_safetensors(&file, device)?;
        let report = model
            .load_tower(&values, src_prefix, dst_prefix, &file)
            .map_err(mm)?;
        let n = report
            .loaded
            .iter()
            .filter(|k| k.starts_with(dst_prefix))
            .count();
        eprintln!(
            "{dst_prefix}: {n} tensors from {} ({} of its tensors unused)",
            file.display(),
            report.unexpected.len()
        );
    }
    Ok(())
}

/// The tokenizer of a run: `tokenizer.file`, the text tower's run, a resumed run's, or one
/// trained on `captions` (saved to `out/tokenizer.json` in every case).
fn tokenizer_for(
    cfg: &mut MultimodalConfig,
    captions: &[String],
    out: &Path,
    resume: bool,
    write: bool,
) -> Result<Tokenizer, CliError> {
    let saved = out.join("tokenizer.json");
    let tok = if !cfg.tokenizer.file.is_empty() {
        load_tokenizer(Path::new(&cfg.tokenizer.file)).map_err(text_err)?
    } else if !cfg.init.text_from.is_empty() {
        let (ckpt, v) = stored_config(&cfg.init.text_from)?;
        let file: String = field(&v, "/tokenizer/file", &ckpt)?;
        load_tokenizer(Path::new(&file)).map_err(text_err)?
    } else if resume && saved.is_file() {
        load_tokenizer(&saved).map_err(text_err)?
    } else {
        let t0 = std::time::Instant::now();
        let tok = train_from_texts(captions.iter(), &cfg.tokenizer.train).map_err(text_err)?;
        eprintln!(
            "trained a {:?} tokenizer ({} tokens) on {} captions in {:.1}s",
            cfg.tokenizer.train.kind,
            tok.get_vocab_size(true),
            captions.len(),
            t0.elapsed().as_secs_f64()
        );
        tok
    };
    if write {
        save_tokenizer(&tok, out).map_err(text_err)?;
    }
    cfg.tokenizer.file = std::fs::canonicalize(&saved)
        .unwrap_or(saved)
        .to_string_lossy()
        .into_owned();
    Ok(tok)
}

/// A trained run's model, configuration and tokenizer.
pub struct LoadedRun {
    /// The checkpoint directory.
    pub ckpt: PathBuf,
    /// Its configuration (with `--set` overrides).
    pub cfg: MultimodalConfig,
    /// The model with the checkpoint's weights.
    pub model: ClipModel,
    /// The caption tokenizer.
    pub tok: Tokenizer,
    /// Where the model lives.
    pub device: Device,
}

/// Loads a run or checkpoint of `ssl pretrain multimodal`.
pub fn load_run(checkpoint: &Path, set: &[String]) -> Result<LoadedRun, CliError> {
    let (ckpt, cfg): (PathBuf, MultimodalConfig) =
        config::from_checkpoint(checkpoint, "multimodal", set)?;
    let device = parse_device(&cfg.train.device)?;
    let tok = load_tokenizer(Path::new(&cfg.tokenizer.file)).map_err(text_err)?;
    let (store, model) = build(&cfg, &device)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok(LoadedRun {
        ckpt,
        cfg,
        model,
        tok,
        device,
    })
}

/// Quality scores (image-caption cosine) of `pairs` under another run's model.
fn filter_scores(run: &LoadedRun, pairs: &PairSet) -> Result<Vec<f32>, CliError> {
    let bs = run.cfg.train.batch_size.max(1);
    let img = embed_images(&run.model, &pairs.images, bs, &run.device).map_err(mm)?;
    let seqs = tokenize_captions(&run.tok, &pairs.captions, &pairs.ids, run.cfg.max_seq_len)
        .map_err(mm)?;
    let pad = SpecialIds::of(&run.tok).map_err(text_err)?.pad;
    let txt = embed_token_seqs(&run.model, &seqs, pad, bs, &run.device).map_err(mm)?;
    ssl_multimodal::pair_scores(&img, &txt).map_err(mm)
}

/// This rank's share of the pairs (its row groups), split into (training, held-out) exactly
/// as one process splits the whole source: the global row indices of every rank's good rows
/// are gathered, and a row's position among them decides `data.max_pairs`, the hold-out split
/// and, with a pair filter, the score quantile (scores are gathered too).
fn sharded_split(
    paths: &[String],
    cfg: &MultimodalConfig,
    par: &Parallel,
) -> Result<(PairSet, PairSet), CliError> {
    let r = read_pairs_of(paths, &cfg.data.columns(&[]), par.rank, par.world).map_err(mm)?;
    par.report_share(&r.share, r.row_index.len(), "pairs");
    if r.bad_rows.count > 0 {
        eprintln!(
            "rank {}: skipped {} bad rows: {}",
            par.rank, r.bad_rows.count, r.bad_rows
        );
    }
    let mut good = par.gather_indices(&r.row_index)?;
    good.sort_unstable();
    let pos = r
        .row_index
        .iter()
        .map(|i| {
            good.binary_search(i).map_err(|_| {
                CliError::Config(format!(
                    "internal: row {i} is missing from the gathered rows"
                ))
            })
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let n = match cfg.data.max_pairs {
        0 => good.len(),
        m => good.len().min(m),
    };
    let (train_pos, held_pos) =
        holdout_split(n, cfg.data.heldout_fraction, cfg.train.seed).map_err(mm)?;
    let in_set = |set: &[usize]| -> Vec<usize> {
        (0..pos.len())
            .filter(|&k| set.binary_search(&pos[k]).is_ok())
            .collect()
    };
    let mut train_k = in_set(&train_pos);
    let held_k = in_set(&held_pos);
    if !cfg.data.filter_checkpoint.is_empty() && cfg.data.filter_drop_fraction > 0.0 {
        let filt = load_run(Path::new(&cfg.data.filter_checkpoint), &[])?;
        let scores = filter_scores(&filt, &r.set.select(&train_k))?;
        let cand_pos: Vec<usize> = train_k.iter().map(|&k| pos[k]).collect();
        let all_pos = par.gather_indices(&cand_pos)?;
        let all_scores = par.gather_f32(&scores)?;
        // The candidates in one process's order (by position), their scores, the kept ones.
        let mut order: Vec<usize> = (0..all_pos.len()).collect();
        order.sort_unstable_by_key(|&j| all_pos[j]);
        let sorted: Vec<f32> = order.iter().map(|&j| all_scores[j]).collect();
        let keep = keep_best_pairs(&sorted, cfg.data.filter_drop_fraction).map_err(mm)?;
        let mut kept: Vec<usize> = keep.iter().map(|&i| all_pos[order[i]]).collect();
        kept.sort_unstable();
        if par.is_main() {
            eprintln!(
                "pair filter ({}): dropped {} of {} training pairs (over all ranks)",
                filt.ckpt.display(),
                sorted.len() - kept.len(),
                sorted.len()
            );
        }
        train_k.retain(|&k| kept.binary_search(&pos[k]).is_ok());
    }
    Ok((r.set.select(&train_k), r.set.select(&held_k)))
}

/// `ssl pretrain multimodal`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let mut cfg: MultimodalConfig =
        config::resolve(&MultimodalConfig::default(), base.as_deref(), set)?;
    let device = parse_device(&cfg.train.device)?;
    let (mut par, device) = Parallel::init(device)?;
    let _embedded;
    let paths: Vec<String> = if data.is_empty() {
        let (dir, p) = config::write_embedded("emoji_sample.parquet", EMBEDDED_TRAIN)?;
        eprintln!(
            "no --data given: training on the embedded sample (400 emoji, 32x32, with their names)"
        );
        _embedded = dir;
        vec![p]
    } else {
        data.to_vec()
    };
    // With several ranks each rank reads only its share of the rows (see `sharded_split`).
    let (train, heldout) = if par.world == 1 {
        let all = read(&paths, &cfg, &[])?;
        let (mut train_idx, heldout_idx) =
            holdout_split(all.len(), cfg.data.heldout_fraction, cfg.train.seed).map_err(mm)?;
        if !cfg.data.filter_checkpoint.is_empty() && cfg.data.filter_drop_fraction > 0.0 {
            let filt = load_run(Path::new(&cfg.data.filter_checkpoint), &[])?;
            let cand = all.select(&train_idx);
            let scores = filter_scores(&filt, &cand)?;
            let keep = keep_best_pairs(&scores, cfg.data.filter_drop_fraction).map_err(mm)?;
            let mut dropped: Vec<usize> = (0..cand.len())
                .filter(|i| keep.binary_search(i).is_err())
                .collect();
            dropped.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            let worst: Vec<String> = dropped
                .iter()
                .take(5)
                .map(|&i| format!("{:?} ({:.3})", cand.captions[i], scores[i]))
                .collect();
            eprintln!(
                "pair filter ({}): dropped {} of {} training pairs; lowest: {}",
                filt.ckpt.display(),
                dropped.len(),
                cand.len(),
                worst.join(", ")
            );
            train_idx = keep.iter().map(|&i| train_idx[i]).collect();
        }
        let train = all.select(&train_idx);
        let heldout = all.select(&heldout_idx);
        (train, heldout)
    } else {
        sharded_split(&paths, &cfg, &par)?
    };
    std::fs::create_dir_all(out).map_err(|e| CliError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let tok = if par.world == 1 {
        tokenizer_for(&mut cfg, &train.captions, out, resume, true)?
    } else {
        // Rank 0 makes the tokenizer (training on its own share of the captions) and sends it.
        let json = if par.is_main() {
            tokenizer_for(&mut cfg, &train.captions, out, resume, true)?
                .to_string(false)
                .map_err(|e| CliError::Config(format!("cannot serialise the tokenizer: {e}")))?
                .into_bytes()
        } else {
            Vec::new()
        };
        let tok = crate::text::tokenizer_from_json(&par.broadcast_bytes(json)?)?;
        if !par.is_main() {
            // Where rank 0 saved it (written before it was sent).
            let saved = out.join("tokenizer.json");
            cfg.tokenizer.file = std::fs::canonicalize(&saved)
                .unwrap_or(saved)
                .to_string_lossy()
                .into_owned();
        }
        tok
    };
    complete_config(&mut cfg, &train.images, &tok, &par)?;
    if par.is_main() {
        config::write_run_config(out, &config::to_toml(&cfg)?)?;
    }
    let (store, mut model) = build(&cfg, &device)?;
    if !resume {
        init_towers(&cfg, &model, &device)?;
    }
    if par.world > 1 {
        // Negatives span every rank: each step gathers all ranks' embeddings.
        model.gather_across(par.shared());
    }
    let seqs = tokenize_captions(&tok, &train.captions, &train.ids, cfg.max_seq_len).map_err(mm)?;
    let pad = SpecialIds::of(&tok).map_err(text_err)?.pad;
    eprintln!(
        "{} training pairs ({} held out) {}x{}x{}; {:?} loss; micro-batch {}; {} parameters",
        train.len(),
        heldout.len(),
        cfg.model.image.channels,
        cfg.model.image.image_height,
        cfg.model.image.image_width,
        cfg.model.loss.kind,
        if cfg.model.micro_batch == 0 {
            "off".to_string()
        } else {
            cfg.model.micro_batch.to_string()
        },
        store.num_elements()
    );
    let health = if heldout.len() >= 2 {
        let k = heldout.len().min(64);
        let hseqs = tokenize_captions(&tok, &heldout.captions, &heldout.ids, cfg.max_seq_len)
            .map_err(mm)?;
        let idx: Vec<usize> = (0..k).collect();
        Some(pair_batch(&heldout.images, &hseqs, pad, &idx, &device).map_err(mm)?)
    } else {
        None
    };
    let mut source = InMemoryPairSource::new(
        train.images.clone(),
        seqs,
        &tok,
        cfg.train.batch_size,
        cfg.train.seed,
        &device,
    )
    .map_err(mm)?;
    let run_config = serde_json::to_value(&cfg).map_err(|e| CliError::Config(e.to_string()))?;
    let mut trainer = LoopTrainer::new(cfg.train.clone(), Some(out.to_path_buf()))?
        .resume(resume)
        .run_config(run_config)
        .stop_flag(StopFlag::from_signals()?)
        .progress(true)
        .collective(par.take());
    let report = trainer.fit(&model, &mut source, health.as_ref())?;
    if !par.is_main() {
        return Ok(());
    }
    let first = report.losses.first().map(|(_, l)| *l).unwrap_or(f64::NAN);
    let last = report.losses.last().map(|(_, l)| *l).unwrap_or(f64::NAN);
    if report.interrupted {
        eprintln!(
            "interrupted at step {}: checkpoint written, continue with --resume",
            report.step
        );
    }
    eprintln!(
        "done: step {} (loss {first:.4} -> {last:.4}, logit_scale {:.3}); checkpoint {}; metrics {}",
        report.step,
        model.logit_scale_value().map_err(mm)?,
        report
            .last_checkpoint
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        out.join("metrics.jsonl").display()
    );
    Ok(())
}

fn check_shape(set: &PairSet, cfg: &MultimodalConfig) -> Result<(), CliError> {
    let m = &cfg.model.image;
    let want = [m.channels, m.image_height, m.image_width];
    if set.images.shape != want {
        return Err(CliError::Config(format!(
            "the images are {:?} (channels, height, width) but the model was trained on {want:?}; set data.resize / data.color",
            set.images.shape
        )));
    }
    Ok(())
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, CliError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// `ssl embed multimodal` (`--set embed.tower=image|text`): normalised embeddings in the
/// shared space.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let run = load_run(checkpoint, set)?;
    let cfg = &run.cfg;
    let bs = cfg.train.batch_size.max(1);
    let (ids, emb) = match cfg.embed.tower {
        Tower::Image => {
            // Every row is embedded: data.max_pairs limits training and evaluation only.
            let (set, bad) = read_pairs(data, &cfg.data.columns(&[])).map_err(mm)?;
            if bad.count > 0 {
                eprintln!("skipped {} bad rows: {bad}", bad.count);
            }
            check_shape(&set, cfg)?;
            let e = embed_images(&run.model, &set.images, bs, &run.device).map_err(mm)?;
            (set.ids, e)
        }
        Tower::Text => {
            let mut cols = vec![ColumnSpec::text(cfg.data.caption_column.as_str())];
            if !cfg.data.id_column.is_empty() {
                cols.push(ColumnSpec::id(cfg.data.id_column.as_str()));
            }
            let table = read_all(
                data,
                &cols,
                &ReadOptions {
                    skip_bad_rows: cfg.data.skip_bad_rows,
                    ..Default::default()
                },
            )?;
            let captions = table.batch.text(&cfg.data.caption_column)?.to_vec();
            let ids = table.batch.ids().to_vec();
            let seqs = tokenize_captions(&run.tok, &captions, &ids, cfg.max_seq_len).map_err(mm)?;
            let pad = SpecialIds::of(&run.tok).map_err(text_err)?.pad;
            let e = embed_token_seqs(&run.model, &seqs, pad, bs, &run.device).map_err(mm)?;
            (ids, e)
        }
    };
    let dim = emb.dim(1)?;
    let flat = to_vec(&emb)?;
    let tower = format!("{:?}", cfg.embed.tower).to_lowercase();
    let mut meta = BTreeMap::new();
    meta.insert("model".to_string(), "ssl-multimodal CLIP".to_string());
    meta.insert("checkpoint".to_string(), run.ckpt.display().to_string());
    meta.insert("tower".to_string(), tower.clone());
    meta.insert("normalized".to_string(), "true".to_string());
    crate::embeddings::write_embeddings(out, &ids, &flat, dim, meta)?;
    eprintln!(
        "wrote {} {tower} embeddings of dimension {dim} to {}",
        ids.len(),
        out.display()
    );
    Ok(())
}

/// Retrieval and zero-shot figures of one model on the held-out pairs.
fn evaluate(
    model: &ClipModel,
    tok: &Tokenizer,
    cfg: &MultimodalConfig,
    heldout: &PairSet,
    columns: &[String],
    device: &Device,
) -> Result<Value, CliError> {
    let bs = cfg.train.batch_size.max(1);
    let img = embed_images(model, &heldout.images, bs, device).map_err(mm)?;
    let seqs =
        tokenize_captions(tok, &heldout.captions, &heldout.ids, cfg.max_seq_len).map_err(mm)?;
    let pad = SpecialIds::of(tok).map_err(text_err)?.pad;
    let txt = embed_token_seqs(model, &seqs, pad, bs, device).map_err(mm)?;
    let r = retrieval(&img, &txt, &cfg.eval.ks).map_err(mm)?;
    let named = |v: &[f64]| -> Value {
        let m: serde_json::Map<String, Value> =
            r.k.iter()
                .zip(v)
                .map(|(k, x)| (format!("r@{k}"), json!(x)))
                .collect();
        Value::Object(m)
    };
    let mut zs = serde_json::Map::new();
    for c in columns {
        let labels = heldout.label_column(c).map_err(mm)?;
        let z = zero_shot(
            model,
            tok,
            &img,
            labels,
            &cfg.eval.templates,
            cfg.max_seq_len,
            device,
        )
        .map_err(mm)?;
        zs.insert(c.clone(), serde_json::to_value(z).unwrap_or(Value::Null));
    }
    Ok(json!({
        "image_to_text": named(&r.image_to_text),
        "text_to_image": named(&r.text_to_image),
        "chance": named(&r.chance),
        "zero_shot": zs,
    }))
}

/// `ssl eval multimodal`: one JSON object with recall@K both ways on the held-out pairs
/// (the run's seeded hold-out of `--data`, or `--test`), zero-shot accuracy over the label
/// columns, for the trained model and for untrained towers of the same shape.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let run = load_run(checkpoint, set)?;
    let cfg = &run.cfg;
    let columns: Vec<String> = match label_column {
        Some(l) => vec![l.to_string()],
        None => cfg.eval.zero_shot_columns.clone(),
    };
    let heldout = if test.is_empty() {
        let all = read(data, cfg, &columns)?;
        let (_, idx) =
            holdout_split(all.len(), cfg.data.heldout_fraction, cfg.train.seed).map_err(mm)?;
        if idx.len() < 2 {
            return Err(CliError::Config(format!(
                "data.heldout_fraction = {} holds out {} of {} pairs: give --test or a larger fraction",
                cfg.data.heldout_fraction,
                idx.len(),
                all.len()
            )));
        }
        all.select(&idx)
    } else {
        read(test, cfg, &columns)?
    };
    check_shape(&heldout, cfg)?;
    let trained = evaluate(&run.model, &run.tok, cfg, &heldout, &columns, &run.device)?;
    let (_, fresh) = build(cfg, &run.device)?;
    let untrained = evaluate(&fresh, &run.tok, cfg, &heldout, &columns, &run.device)?;
    let report = json!({
        "checkpoint": run.ckpt.display().to_string(),
        "n_heldout": heldout.len(),
        "logit_scale": run.model.logit_scale_value().map_err(mm)?,
        "templates": cfg.eval.templates,
        "trained": trained,
        "untrained": untrained,
    });
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_their_rows_as_one_process_splits_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.parquet");
        // 400 pairs in row groups of 30 (14 groups).
        crate::parallel::regroup(EMBEDDED_TRAIN, 30, &path);
        let paths = vec![path.to_string_lossy().into_owned()];
        let mut cfg = MultimodalConfig::default();
        cfg.data.max_pairs = 300;
        cfg.data.heldout_fraction = 0.1;
        // One process, as `pretrain` splits with one rank.
        let all = read(&paths, &cfg, &[]).unwrap();
        let (tr, he) = holdout_split(all.len(), cfg.data.heldout_fraction, cfg.train.seed).unwrap();
        let ids = |set: &PairSet| -> Vec<String> {
            let mut v = set.ids.clone();
            v.sort();
            v
        };
        let (want_train, want_held) = (ids(&all.select(&tr)), ids(&all.select(&he)));
        assert_eq!((want_train.len(), want_held.len()), (270, 30));
        for world in [1, 3] {
            let out =
                crate::parallel::on_ranks(world, |p| sharded_split(&paths, &cfg, &p).unwrap());
            let (mut train, mut held) = (Vec::new(), Vec::new());
            for (t, h) in &out {
                train.extend(t.ids.clone());
                held.extend(h.ids.clone());
            }
            train.sort();
            held.sort();
            assert_eq!(train, want_train, "world {world}");
            assert_eq!(held, want_held, "world {world}");
            if world > 1 {
                assert!(out.iter().all(|(t, _)| t.len() < 270));
            }
        }
    }
}
