//! What the pipeline tests share.

use ssl_multimodal::MultimodalConfig;

/// A configuration small enough for a test: tiny towers (16x16 images, a 100-token
/// vocabulary), batches of 32, a warm-up of one step; the caller sets the step count and
/// what else it tests.
pub fn tiny_config() -> MultimodalConfig {
    let mut cfg = MultimodalConfig::default();
    cfg.train.warmup_steps = 1;
    cfg.train.batch_size = 32;
    cfg.data.resize = vec![16, 16];
    cfg.tokenizer.train.vocab_size = 100;
    cfg.max_seq_len = 12;
    cfg.model.embed_dim = 16;
    cfg.model.image.patch_size = 4;
    cfg.model.image.dim = 32;
    cfg.model.image.depth = 1;
    cfg.model.image.heads = 2;
    cfg.model.text.hidden_size = 32;
    cfg.model.text.num_hidden_layers = 1;
    cfg.model.text.num_attention_heads = 2;
    cfg.model.text.intermediate_size = 64;
    cfg.model.text.max_position_embeddings = 16;
    cfg
}
