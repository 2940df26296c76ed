//! A training batch's activations are estimated before a run allocates them (issue 26
//! case 5).

use ssl_vision::VisionConfig;

#[test]
fn an_oversized_batch_is_refused_naming_the_keys() {
    let mut cfg = VisionConfig::default();
    // As `complete` leaves it for 1024x1024 images with a patch size given.
    (cfg.model.image_height, cfg.model.image_width) = (1024, 1024);
    cfg.model.patch_size = 16;
    cfg.train.batch_size = 1 << 20;
    let e = cfg.check_memory(usize::MAX).unwrap_err().to_string();
    assert!(e.contains("not enough memory"), "{e}");
    assert!(
        e.contains("train.batch_size") && e.contains("model.depth"),
        "{e}"
    );
    assert!(e.contains("train.max_memory_gb"), "{e}");
    // The images a rank holds cap the batch.
    cfg.check_memory(4).unwrap();
    cfg.train.max_memory_gb = 1e-6;
    let e = cfg.check_memory(4).unwrap_err().to_string();
    assert!(e.contains("(train.max_memory_gb)"), "{e}");
}
