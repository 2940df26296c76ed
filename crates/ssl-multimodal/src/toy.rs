//! A synthetic image-caption set for tests, examples and benchmarks: coloured shapes on a
//! dark background, captioned with their colour and shape ("a red circle"), with `shape` and
//! `color` label columns for zero-shot checks. Seeded, so every run sees the same pairs.

use ssl_core::SslRng;
use ssl_vision::ImageSet;

use crate::data::PairSet;
use crate::Result;

/// The shapes drawn.
pub const SHAPES: [&str; 4] = ["square", "circle", "cross", "ring"];
/// The colours used, with their RGB values.
pub const COLORS: [(&str, [f32; 3]); 4] = [
    ("red", [1.0, 0.1, 0.1]),
    ("green", [0.1, 0.9, 0.1]),
    ("blue", [0.1, 0.2, 1.0]),
    ("yellow", [1.0, 0.9, 0.1]),
];

fn inside(shape: usize, dx: f32, dy: f32, r: f32) -> bool {
    let d = (dx * dx + dy * dy).sqrt();
    match shape {
        0 => dx.abs() <= r && dy.abs() <= r,
        1 => d <= r,
        2 => (dx.abs() <= r / 3.0 && dy.abs() <= r) || (dy.abs() <= r / 3.0 && dx.abs() <= r),
        _ => d <= r && d >= r * 0.55,
    }
}

/// `n` RGB images of `size x size` pixels with captions and labels, from `seed`.
pub fn toy_pairs(n: usize, size: usize, seed: u64) -> Result<PairSet> {
    let mut rng = SslRng::derived(seed, "toy-pairs");
    let plane = size * size;
    let mut data = vec![0f32; n * 3 * plane];
    let mut captions = Vec::with_capacity(n);
    let mut shapes = Vec::with_capacity(n);
    let mut colors = Vec::with_capacity(n);
    let templates = [
        "a {c} {s}",
        "{c} {s}",
        "the {s} is {c}",
        "one {c} {s} on black",
    ];
    for i in 0..n {
        let s = rng.below(SHAPES.len());
        let c = rng.below(COLORS.len());
        let sz = size as f32;
        let r = sz * rng.uniform_range(0.2, 0.32);
        let cx = rng.uniform_range(r, sz - r);
        let cy = rng.uniform_range(r, sz - r);
        let rgb = COLORS[c].1;
        let img = &mut data[i * 3 * plane..(i + 1) * 3 * plane];
        for y in 0..size {
            for x in 0..size {
                let on = inside(s, x as f32 + 0.5 - cx, y as f32 + 0.5 - cy, r);
                for (ch, v) in rgb.iter().enumerate() {
                    let base = if on { *v } else { 0.05 };
                    img[ch * plane + y * size + x] = (base + 0.05 * rng.normal()).clamp(0.0, 1.0);
                }
            }
        }
        let t = templates[rng.below(templates.len())];
        captions.push(t.replace("{c}", COLORS[c].0).replace("{s}", SHAPES[s]));
        shapes.push(SHAPES[s].to_string());
        colors.push(COLORS[c].0.to_string());
    }
    PairSet::new(
        ImageSet::new(data, [3, size, size])?,
        captions,
        (0..n).map(|i| format!("toy:{i}")).collect(),
        vec![("shape".into(), shapes), ("color".into(), colors)],
    )
}
