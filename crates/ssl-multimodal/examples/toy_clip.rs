//! Trains a small CLIP on synthetic coloured shapes ("a red circle") and reports held-out
//! recall@K both ways and zero-shot colour / shape accuracy, before and after training.
//!
//! ```sh
//! cargo run --release -p ssl-multimodal --example toy_clip
//! ```

use candle_core::Device;
use ssl_core::{LoopTrainer, ParamStore, TrainConfig, Trainer};
use ssl_multimodal::*;

fn report(
    what: &str,
    model: &ClipModel,
    tok: &tokenizers::Tokenizer,
    test: &PairSet,
) -> Result<()> {
    let dev = Device::Cpu;
    let img = embed_images(model, &test.images, 128, &dev)?;
    let txt = embed_texts(model, tok, &test.captions, 16, 128, &dev)?;
    let r = retrieval(&img, &txt, &[1, 5, 10])?;
    let mut zs = Vec::new();
    for col in ["color", "shape"] {
        let z = zero_shot(
            model,
            tok,
            &img,
            test.label_column(col)?,
            &["a {} shape".into(), "{}".into()],
            16,
            &dev,
        )?;
        zs.push(format!("{col} {:.3} (chance {:.2})", z.accuracy, z.chance));
    }
    println!(
        "{what}: R@1/5/10 image->text {:.3}/{:.3}/{:.3}, text->image {:.3}/{:.3}/{:.3} (chance {:.3}/{:.3}/{:.3}); zero-shot {}",
        r.image_to_text[0],
        r.image_to_text[1],
        r.image_to_text[2],
        r.text_to_image[0],
        r.text_to_image[1],
        r.text_to_image[2],
        r.chance[0],
        r.chance[1],
        r.chance[2],
        zs.join(", ")
    );
    Ok(())
}

fn main() -> Result<()> {
    let pairs = toy::toy_pairs(1000, 16, 0)?;
    let (tr, te) = holdout_split(pairs.len(), 0.2, 0)?;
    let (train, test) = (pairs.select(&tr), pairs.select(&te));
    let tok = train_caption_tokenizer(&train.captions, 100)?;
    let seqs = tokenize_captions(&tok, &train.captions, &train.ids, 16)?;
    // Gradient caching: batches of 128 in chunks of 32.
    let mut cfg = ClipConfig {
        micro_batch: 32,
        ..ClipConfig::default()
    };
    cfg.image.image_height = 16;
    cfg.image.image_width = 16;
    cfg.image.patch_size = 4;
    cfg.text.vocab_size = tok.get_vocab_size(true);
    let store = ParamStore::new(&Device::Cpu);
    let model = ClipModel::new(&cfg, &store.builder(0))?;
    report("untrained", &model, &tok, &test)?;
    let mut data = InMemoryPairSource::new(train.images.clone(), seqs, &tok, 128, 0, &Device::Cpu)?;
    let train_cfg = TrainConfig {
        max_steps: 150,
        batch_size: 128,
        lr: 2e-3,
        warmup_steps: 15,
        health_every: 0,
        ..TrainConfig::default()
    };
    let out = LoopTrainer::new(train_cfg, None)?.fit(&model, &mut data, None)?;
    println!(
        "loss {:.3} -> {:.3}, logit_scale {:.3}",
        out.losses.first().map(|x| x.1).unwrap_or(f64::NAN),
        out.losses.last().map(|x| x.1).unwrap_or(f64::NAN),
        model.logit_scale_value()?
    );
    report("trained", &model, &tok, &test)?;
    Ok(())
}
