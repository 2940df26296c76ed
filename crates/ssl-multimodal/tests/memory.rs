//! Both towers' activations are estimated before a run allocates them (issue 26 case 5).

use ssl_multimodal::MultimodalConfig;

#[test]
fn an_oversized_batch_is_refused_naming_the_keys() {
    let mut cfg = MultimodalConfig::default();
    (cfg.model.image.image_height, cfg.model.image.image_width) = (32, 32);
    cfg.model.micro_batch = 0;
    assert!(
        cfg.memory_estimate(64) < 1 << 30,
        "{}",
        cfg.memory_estimate(64)
    );
    cfg.train.batch_size = 1_000_000_000;
    let e = cfg.check_memory(usize::MAX).unwrap_err().to_string();
    assert!(e.contains("not enough memory"), "{e}");
    assert!(
        e.contains("train.batch_size") && e.contains("max_seq_len"),
        "{e}"
    );
    assert!(e.contains("train.max_memory_gb"), "{e}");
    // The pairs a rank holds cap the batch; gradient caching caps it further.
    assert!(cfg.memory_estimate(64) < 1 << 30);
    cfg.model.micro_batch = 8;
    cfg.check_memory(usize::MAX).unwrap();
}
