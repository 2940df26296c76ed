//! Loads a Hugging Face BERT directory with ssl-text and writes the MLM logits of some texts
//! to JSON, for `scripts/check_logits.py` to compare against transformers.
//!
//! `cargo run --release -p ssl-text --example hf_logits -- DIR OUT.json "text one" "text two"`

use std::path::Path;

use candle_core::Device;
use ssl_core::{Ctx, SslRng};
use ssl_text::{
    load_hf_dir, tokenize_texts, InputConfig, InputMode, MaskingConfig, SpecialIds, TextBatch,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: hf_logits DIR OUT.json TEXT...".into());
    }
    let hf = load_hf_dir(
        Path::new(&args[0]),
        MaskingConfig::default(),
        0,
        &Device::Cpu,
    )?;
    let sp = SpecialIds::of(&hf.tokenizer)?;
    let input = InputConfig {
        mode: InputMode::Document,
        max_seq_len: 128,
    };
    let seqs = tokenize_texts(&hf.tokenizer, &args[2..], &input, None, &[])?;
    let batch = TextBatch {
        seqs,
        pad_id: sp.pad,
        device: Device::Cpu,
    };
    let t = batch.tensors()?;
    let logits = hf.model.logits(&t, &mut Ctx::eval(&mut SslRng::new(0)))?;
    let json = serde_json::json!({
        "input_ids": t.input_ids.to_vec2::<u32>()?,
        "attention_mask": t.attention_mask.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?,
        "logits": logits.flatten_all()?.to_vec1::<f32>()?,
        "fresh_head": hf.fresh_head,
    });
    std::fs::write(&args[1], json.to_string())?;
    println!("wrote logits {:?} to {}", logits.dims(), args[1]);
    Ok(())
}
