//! Device selection from a string: `cpu`, `cuda` or `cuda:N`.

use candle_core::Device;

use crate::{CoreError, Result};

/// Parses `cpu`, `cuda` (GPU 0) or `cuda:N` into a candle [`Device`].
///
/// CUDA devices need the crate's `cuda` feature; without it the error says so.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                CoreError::Config(format!(
                    "device `{spec}`: expected `cpu`, `cuda` or `cuda:N` with N a GPU number"
                ))
            })?,
        None => {
            return Err(CoreError::Config(format!(
                "device `{spec}`: expected `cpu`, `cuda` or `cuda:N`"
            )))
        }
    };
    if !cfg!(feature = "cuda") {
        return Err(CoreError::Config(format!(
            "device `{spec}` needs a build with the `cuda` feature (cargo build --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|source| CoreError::Device {
        spec: spec.to_string(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("CPU").unwrap().is_cpu());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("cuda:x"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("cuda"), "{err}");
        }
    }
}
