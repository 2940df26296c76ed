//! `model.preset` through the binary: documented by `ssl config`, a bad name refused before
//! anything is written. (The sizes each preset sets and the explicit keys winning over it are
//! tested in the modality crates, on the configuration types.)

mod common;

use common::{ok, ssl};

#[test]
fn vision_presets_are_documented_and_a_bad_name_is_refused_first() {
    let text = ok(&ssl(&["config", "vision"]));
    assert!(text.contains("preset = \"micro\""), "{text}");
    for name in ["micro", "tiny", "small", "base"] {
        assert!(
            text.contains(&format!("\"{name}\"")),
            "{name} missing:\n{text}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let res = ssl(&[
        "pretrain",
        "vision",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "model.preset=huge",
    ]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("huge") && err.contains("micro, tiny, small, base"),
        "{err}"
    );
    assert!(!out.exists(), "a refused configuration must write nothing");
}
