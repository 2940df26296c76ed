//! Behaviour of the CLIP model on tiny towers: gradient caching equals one big batch, the
//! temperature is clamped after optimizer steps, every parameter gets a gradient, frozen
//! towers get none, and training aligns the toy pairs.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use ssl_core::{
    Collective, Ctx, LoopTrainer, ParamStore, PretextTask, SharedCollective, SslRng, ThreadGroup,
    TrainConfig, Trainer,
};
use ssl_multimodal::*;
use ssl_vision::Pooling;

fn tiny(vocab: usize) -> ClipConfig {
    let mut c = ClipConfig {
        embed_dim: 8,
        ..ClipConfig::default()
    };
    c.image.image_height = 8;
    c.image.image_width = 8;
    c.image.patch_size = 4;
    c.image.dim = 16;
    c.image.depth = 1;
    c.image.heads = 2;
    c.image.pooling = Pooling::Cls;
    c.text.hidden_size = 16;
    c.text.num_hidden_layers = 1;
    c.text.num_attention_heads = 2;
    c.text.intermediate_size = 32;
    c.text.max_position_embeddings = 16;
    c.text.vocab_size = vocab;
    c
}

struct Setup {
    pairs: PairSet,
    tok: tokenizers::Tokenizer,
}

fn setup(n: usize) -> Setup {
    let pairs = toy::toy_pairs(n, 8, 1).unwrap();
    let tok = train_caption_tokenizer(&pairs.captions, 60).unwrap();
    Setup { pairs, tok }
}

fn batch(s: &Setup) -> PairBatch {
    let seqs = tokenize_captions(&s.tok, &s.pairs.captions, &s.pairs.ids, 12).unwrap();
    let pad = s.tok.token_to_id("[PAD]").unwrap();
    let idx: Vec<usize> = (0..s.pairs.len()).collect();
    pair_batch(&s.pairs.images, &seqs, pad, &idx, &Device::Cpu).unwrap()
}

/// A loss and the gradient of every parameter, by name.
type LossAndGrads = (f64, Vec<(String, Vec<f32>)>);

fn grads_of(model: &ClipModel, b: &PairBatch, micro: Option<usize>) -> LossAndGrads {
    grads_with(model, b, micro, false)
}

/// The loss and gradients of one graph: `forward`, then `backward` of `loss * weight`, with
/// no gradient sink.
fn graph_grads(model: &ClipModel, b: &PairBatch) -> LossAndGrads {
    let mut rng = SslRng::new(5);
    let out = model.forward(b, &mut Ctx::train(&mut rng)).unwrap();
    let grads = (&out.loss * out.weight).unwrap().backward().unwrap();
    named(model, &out, &grads)
}

/// [`grads_of`], optionally with a caller's gradient sink (the fused stacks' parameter
/// gradients delivered aside, collected after the backward pass).
fn grads_with(model: &ClipModel, b: &PairBatch, micro: Option<usize>, sink: bool) -> LossAndGrads {
    let mut rng = SslRng::new(5);
    let mut ctx = Ctx::train(&mut rng);
    if sink {
        ctx = ctx.with_grad_sink(ssl_core::GradSink::new());
    }
    let (out, mut grads) = match micro {
        Some(m) => model.grad_cache(b, m, &mut ctx).unwrap(),
        None => model.forward_backward(b, &mut ctx).unwrap(),
    };
    ctx.collect_grads(&mut grads).unwrap();
    named(model, &out, &grads)
}

/// The loss and every parameter's gradient, by name.
fn named(model: &ClipModel, out: &ssl_core::TaskOutput, grads: &GradStore) -> LossAndGrads {
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    let g = model
        .store()
        .vars()
        .into_iter()
        .map(|(name, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, g)
        })
        .collect();
    (loss, g)
}

#[test]
fn grad_cache_equals_one_big_batch() {
    let s = setup(12);
    let b = batch(&s);
    for kind in [LossKind::Clip, LossKind::Siglip] {
        let mut cfg = tiny(s.tok.get_vocab_size(true));
        cfg.loss.kind = kind;
        let store = ParamStore::new(&Device::Cpu);
        let model = ClipModel::new(&cfg, &store.builder(3)).unwrap();
        let (l_full, g_full) = graph_grads(&model, &b);
        // `forward_backward` (which takes a gradient sink of its own) and a caller's sink
        // give the graph's gradients: bit for bit without chunks (each tower's stack runs
        // once).
        assert_eq!(grads_of(&model, &b, None), (l_full, g_full.clone()));
        assert_eq!(grads_with(&model, &b, None, true), (l_full, g_full.clone()));
        // 12 pairs in chunks of 5, 5 and 2 (each chunk's replay delivers to the sink).
        let (l_gc, g_gc) = grads_with(&model, &b, Some(5), true);
        assert!(
            (l_full - l_gc).abs() < 1e-5,
            "{kind:?} loss {l_full} vs {l_gc}"
        );
        // Differences relative to the largest gradient entry of the model: entries whose
        // exact value is 0 (e.g. attention key biases, to which softmax is invariant) only
        // hold float round-off, which a per-entry relative test would magnify.
        let scale = g_full
            .iter()
            .flat_map(|(_, g)| g.iter())
            .fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0);
        let mut worst = 0f32;
        for ((name, a), (_, c)) in g_full.iter().zip(&g_gc) {
            for (x, y) in a.iter().zip(c) {
                let d = (x - y).abs() / scale;
                worst = worst.max(d);
                assert!(d < 1e-5, "{kind:?} {name}: {x} vs {y}");
            }
        }
        eprintln!("{kind:?}: largest relative gradient difference {worst:e}");
    }
}

#[test]
fn logit_scale_is_clamped_after_each_step_and_counts_in_the_metrics() {
    let s = setup(16);
    let mut cfg = tiny(s.tok.get_vocab_size(true));
    // Start just under the cap with a huge learning rate: the step pushes it over, the
    // trainer's after-step hook brings it back.
    cfg.loss.logit_scale_init = 100f64.ln() - 1e-3;
    let store = ParamStore::new(&Device::Cpu);
    let model = ClipModel::new(&cfg, &store.builder(0)).unwrap();
    let seqs = tokenize_captions(&s.tok, &s.pairs.captions, &s.pairs.ids, 12).unwrap();
    let mut src =
        InMemoryPairSource::new(s.pairs.images.clone(), seqs, &s.tok, 8, 0, &Device::Cpu).unwrap();
    let train = TrainConfig {
        max_steps: 3,
        batch_size: 8,
        lr: 0.5,
        warmup_steps: 0,
        grad_clip: 0.0,
        health_every: 0,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let report = LoopTrainer::new(train, Some(dir.path().to_path_buf()))
        .unwrap()
        .fit(&model, &mut src, None)
        .unwrap();
    assert!(
        report.params_without_grad.is_empty(),
        "{:?}",
        report.params_without_grad
    );
    let v = model.logit_scale_value().unwrap();
    assert!(v <= 100f64.ln() + 1e-6, "logit_scale {v} above ln 100");
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    for line in log.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        for k in ["loss", "i2t_accuracy", "t2i_accuracy", "logit_scale"] {
            assert!(m.get(k).is_some(), "{k} missing from {line}");
        }
    }
    // Directly: a value above the cap is pulled back, one below is left alone.
    let var = store.get("logit_scale").unwrap();
    var.set(&Tensor::new(9.0f32, &Device::Cpu).unwrap())
        .unwrap();
    model.after_step().unwrap();
    assert!((model.logit_scale_value().unwrap() - 100f64.ln()).abs() < 1e-6);
    var.set(&Tensor::new(1.0f32, &Device::Cpu).unwrap())
        .unwrap();
    model.after_step().unwrap();
    assert!((model.logit_scale_value().unwrap() - 1.0).abs() < 1e-6);
}

#[test]
fn frozen_tower_gets_no_gradient() {
    let s = setup(8);
    let b = batch(&s);
    let mut cfg = tiny(s.tok.get_vocab_size(true));
    cfg.freeze_image = true;
    let store = ParamStore::new(&Device::Cpu);
    let model = ClipModel::new(&cfg, &store.builder(0)).unwrap();
    let mut rng = SslRng::new(0);
    let (_, grads) = model
        .forward_backward(&b, &mut Ctx::train(&mut rng))
        .unwrap();
    for (name, v) in store.vars() {
        let has = grads.get(v.as_tensor()).is_some();
        assert_eq!(has, !name.starts_with(VISION_PREFIX), "{name}");
    }
}

#[test]
fn training_aligns_toy_pairs() {
    let pairs = toy::toy_pairs(256, 8, 2).unwrap();
    let tok = train_caption_tokenizer(&pairs.captions, 60).unwrap();
    let (tr, te) = holdout_split(pairs.len(), 0.25, 0).unwrap();
    let (train, test) = (pairs.select(&tr), pairs.select(&te));
    let seqs = tokenize_captions(&tok, &train.captions, &train.ids, 12).unwrap();
    let cfg = tiny(tok.get_vocab_size(true));
    let store = ParamStore::new(&Device::Cpu);
    let model = ClipModel::new(&cfg, &store.builder(0)).unwrap();
    let zs_before = {
        let img = embed_images(&model, &test.images, 64, &Device::Cpu).unwrap();
        zero_shot(
            &model,
            &tok,
            &img,
            test.label_column("color").unwrap(),
            &["a {} thing".into()],
            12,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut src =
        InMemoryPairSource::new(train.images.clone(), seqs, &tok, 32, 0, &Device::Cpu).unwrap();
    let train_cfg = TrainConfig {
        max_steps: 120,
        batch_size: 32,
        lr: 3e-3,
        warmup_steps: 10,
        health_every: 0,
        ..TrainConfig::default()
    };
    let report = LoopTrainer::new(train_cfg, None)
        .unwrap()
        .fit(&model, &mut src, None)
        .unwrap();
    let first: f64 = report.losses[..10].iter().map(|x| x.1).sum::<f64>() / 10.0;
    let last: f64 = report.losses[report.losses.len() - 10..]
        .iter()
        .map(|x| x.1)
        .sum::<f64>()
        / 10.0;
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    let img = embed_images(&model, &test.images, 64, &Device::Cpu).unwrap();
    let zs = zero_shot(
        &model,
        &tok,
        &img,
        test.label_column("color").unwrap(),
        &["a {} thing".into()],
        12,
        &Device::Cpu,
    )
    .unwrap();
    eprintln!(
        "zero-shot colour accuracy {} -> {}",
        zs_before.accuracy, zs.accuracy
    );
    assert!(
        zs.accuracy > 0.5,
        "zero-shot colour accuracy {}",
        zs.accuracy
    );
}

#[test]
fn two_ranks_gathering_embeddings_equal_one_process_on_the_combined_batch() {
    // Each rank holds 6 of the 12 pairs; gathering makes every rank's loss the loss over all
    // 12 (every negative), and the ranks' gradients add up to the one-process gradient.
    let s = setup(12);
    let b = batch(&s);
    for (kind, micro) in [
        (LossKind::Clip, 0),
        (LossKind::Siglip, 0),
        (LossKind::Clip, 4),
    ] {
        let mut cfg = tiny(s.tok.get_vocab_size(true));
        cfg.loss.kind = kind;
        cfg.micro_batch = micro;
        let one = ClipModel::new(&cfg, &ParamStore::new(&Device::Cpu).builder(3)).unwrap();
        let (l_one, g_one) = grads_of(&one, &b, None);
        let ranks: Vec<LossAndGrads> = std::thread::scope(|sc| {
            let hs: Vec<_> = ThreadGroup::new(2)
                .into_iter()
                .map(|c| {
                    let (cfg, b) = (cfg.clone(), &b);
                    sc.spawn(move || {
                        let store = ParamStore::new(&Device::Cpu);
                        let mut m = ClipModel::new(&cfg, &store.builder(3)).unwrap();
                        let half = b.narrow(6 * c.rank(), 6).unwrap();
                        let shared: SharedCollective = std::sync::Arc::new(c);
                        m.gather_across(shared);
                        grads_of(&m, &half, None)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (l, _) in &ranks {
            assert!(
                (l - l_one).abs() < 1e-5,
                "{kind:?}/{micro}: loss {l} vs {l_one}"
            );
        }
        let scale = g_one
            .iter()
            .flat_map(|(_, g)| g.iter())
            .fold(0f32, |m, x| m.max(x.abs()));
        let mut worst = 0f32;
        for (k, (name, a)) in g_one.iter().enumerate() {
            for (j, x) in a.iter().enumerate() {
                let sum = ranks[0].1[k].1[j] + ranks[1].1[k].1[j];
                let d = (x - sum).abs() / scale;
                worst = worst.max(d);
                assert!(d < 1e-5, "{kind:?}/{micro} {name}: {x} vs {sum}");
            }
        }
        eprintln!("{kind:?}, micro-batch {micro}: 2 ranks vs 1 process {worst:e}");
    }
}
