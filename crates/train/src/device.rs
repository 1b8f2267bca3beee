//! One device selector for every binary: `cpu`, `cuda`, `cuda:N`.

use anyhow::{Context, Result, bail};
use candle_core::Device;

/// Parses `cpu`, `cuda` (device 0) or `cuda:N` and opens the device.
///
/// A CUDA device in a build without the `cuda` feature is a clear error, not a silent CPU run.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    let ordinal = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        _ => match s.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .with_context(|| format!("device `{spec}`: `{n}` is not a CUDA device number"))?,
            None => bail!("unknown device `{spec}`: use cpu, cuda or cuda:N"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "device `{spec}` needs a build with CUDA: rebuild with `--features cuda` (see docs/cuda.md)"
        );
    }
    Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("`x`"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:1").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
