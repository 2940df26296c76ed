//! A coarse memory check before a run allocates its dominant buffers.
//!
//! A configuration with an oversized batch, sequence or series asks the allocator for more
//! memory than the machine has, and the process aborts with only "memory allocation of N
//! bytes failed". Each pipeline estimates its largest allocations from its configuration at
//! start and calls [`check_fits`], which refuses the run with [`CoreError::Memory`] naming
//! the keys that drive the estimate, before anything is allocated or written.

use crate::{CoreError, Result};

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// The memory the kernel says is available for new allocations without swapping
/// (`MemAvailable` in `/proc/meminfo`), in bytes; `None` where it cannot be read (other
/// systems, or a kernel without the field).
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_available(&text)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn parse_meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line["MemAvailable:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next() {
        Some("kB") | Some("KB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

/// The product of `factors`, saturating at `u64::MAX` instead of overflowing: the size of
/// a buffer of that many elements (times the element size given as a factor).
pub fn product_bytes(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f))
}

/// A coarse size, in bytes, of what one sequence of `tokens` tokens keeps for the backward
/// pass of the transformer stack `cfg`: per layer about `16 x dim + 2 x mlp_dim` values a
/// token and `2 x heads x tokens` attention weights a token, 4 bytes each.
pub fn transformer_activation_bytes(cfg: &crate::nn::TransformerConfig, tokens: u64) -> u64 {
    let per_token = (16 * cfg.dim as u64)
        .saturating_add(2 * cfg.mlp_dim as u64)
        .saturating_add(product_bytes(&[2, cfg.heads.max(1) as u64, tokens]));
    product_bytes(&[cfg.depth.max(1) as u64, tokens, per_token, 4])
}

/// `train.max_memory_gb` as a limit in bytes: `None` for 0 (or anything not positive),
/// meaning "what the machine has available".
pub fn limit_from_gb(max_memory_gb: f64) -> Option<u64> {
    (max_memory_gb.is_finite() && max_memory_gb > 0.0).then_some((max_memory_gb * GIB) as u64)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

/// Checks that `estimate_bytes`, the coarse size of `what` (e.g. "the text batch's
/// activations and logits"), fits in `limit_override` bytes (from `train.max_memory_gb`) or,
/// without one, in [`available_bytes`]. `keys` names the settings the estimate grows with
/// (e.g. "train.batch_size x input.max_seq_len"). Where no limit is known the check passes.
/// The error says both and how to override the limit.
pub fn check_fits(
    estimate_bytes: u64,
    what: &str,
    keys: &str,
    limit_override: Option<u64>,
) -> Result<()> {
    let (limit, source) = match limit_override {
        Some(l) => (l, "train.max_memory_gb"),
        None => match available_bytes() {
            Some(a) => (a, "available memory (MemAvailable)"),
            None => return Ok(()),
        },
    };
    if estimate_bytes <= limit {
        return Ok(());
    }
    Err(CoreError::Memory {
        message: format!(
            "{what} would need about {} but the limit is {} ({source}); the estimate grows \
             with {keys}: lower them, or set train.max_memory_gb to the GiB this run may use \
             if the estimate is too high",
            gib(estimate_bytes),
            gib(limit)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_available() {
        let text = "MemTotal:       16318976 kB\nMemFree:  1 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(8_000_000 * 1024));
        assert_eq!(parse_meminfo_available("MemTotal: 5 kB\n"), None);
        if cfg!(target_os = "linux") {
            assert!(available_bytes().is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn products_saturate() {
        assert_eq!(product_bytes(&[2, 3, 4]), 24);
        assert_eq!(product_bytes(&[u64::MAX, 2]), u64::MAX);
        assert_eq!(product_bytes(&[]), 1);
    }

    #[test]
    fn attention_makes_long_sequences_quadratic() {
        let cfg = crate::nn::TransformerConfig::default();
        let short = transformer_activation_bytes(&cfg, 100);
        let long = transformer_activation_bytes(&cfg, 200_000);
        assert!(short < 1 << 30, "{short}");
        assert!(long > 1 << 40, "{long}");
    }

    #[test]
    fn limits_and_errors_name_the_keys() {
        assert_eq!(limit_from_gb(0.0), None);
        assert_eq!(limit_from_gb(-1.0), None);
        assert_eq!(limit_from_gb(2.0), Some(2 << 30));
        check_fits(1 << 20, "x", "train.batch_size", Some(1 << 30)).unwrap();
        let e = check_fits(3 << 30, "the batch", "train.batch_size", Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the batch") && e.contains("3.0 GiB"), "{e}");
        assert!(
            e.contains("train.batch_size") && e.contains("train.max_memory_gb"),
            "{e}"
        );
        // Without an override the machine's available memory is the limit.
        if available_bytes().is_some() {
            let e = check_fits(u64::MAX, "the batch", "k", None).unwrap_err();
            assert!(e.to_string().contains("MemAvailable"), "{e}");
            check_fits(1, "the batch", "k", None).unwrap();
        }
    }
}
