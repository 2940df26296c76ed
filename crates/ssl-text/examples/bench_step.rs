//! One BERT masked-LM training step (mask, forward, backward, AdamW update), timed.
//!
//! `cargo run --release -p ssl-text --example bench_step -- [preset] [batch] [seq_len] [vocab] [steps]`
//! Pair with `scripts/bench_step_torch.py` (same configuration, transformers) for the ratio.

use std::time::Instant;

use candle_core::{Device, Tensor};
use ssl_core::optim::{AdamW, AdamWConfig};
use ssl_core::{Ctx, ParamStore, PretextTask, SslRng};
use ssl_text::{BertConfig, BertForMaskedLM, MaskingConfig, TextBatch, TokenizedSeq};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let preset = arg(0, "mini");
    let batch: usize = arg(1, "16").parse()?;
    let seq: usize = arg(2, "128").parse()?;
    let vocab: usize = arg(3, "8000").parse()?;
    let steps: usize = arg(4, "10").parse()?;
    let cfg = BertConfig::preset(&preset, vocab)?;
    let store = ParamStore::new(&Device::Cpu);
    let model = BertForMaskedLM::new(&cfg, MaskingConfig::default(), 4, &store.builder(0))?;
    let mut opt = AdamW::new(&store, AdamWConfig::default())?;
    let vars: Vec<Tensor> = store
        .vars()
        .into_iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let mut rng = SslRng::new(0);
    let seqs: Vec<TokenizedSeq> = (0..batch)
        .map(|_| {
            let mut s = TokenizedSeq::default();
            for i in 0..seq {
                let special = i == 0 || i == seq - 1;
                s.ids.push(if special {
                    2
                } else {
                    5 + rng.below(vocab - 5) as u32
                });
                s.word_ids.push((!special).then_some(i as u32));
                s.special.push(special);
            }
            s
        })
        .collect();
    let tb = TextBatch {
        seqs,
        pad_id: 0,
        device: Device::Cpu,
    };
    let mut times = Vec::new();
    let mut phases = [Vec::new(), Vec::new(), Vec::new()];
    for step in 0..steps + 2 {
        let t0 = Instant::now();
        let out = model.forward(&tb, &mut Ctx::train(&mut rng))?;
        let t1 = Instant::now();
        let grads = out.loss.backward()?;
        let t2 = Instant::now();
        let g: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
        opt.step(&g, 1e-4)?;
        drop((out, grads, g));
        let t3 = Instant::now();
        if step >= 2 {
            times.push((t3 - t0).as_secs_f64());
            for (p, d) in phases.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
                p.push(d.as_secs_f64());
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let median_step = median(&mut times);
    let [f, b, o] = phases.map(|mut p| median(&mut p) * 1e3);
    eprintln!("forward {f:.1} ms, backward {b:.1} ms, optimizer {o:.1} ms");
    let median = median_step;
    println!(
        "{{\"impl\": \"ssl-text (candle)\", \"preset\": \"{preset}\", \"batch\": {batch}, \"seq_len\": {seq}, \"vocab\": {vocab}, \"params\": {}, \"median_step_ms\": {:.1}}}",
        store.num_elements(),
        median * 1e3
    );
    Ok(())
}
