//! One device selector for every binary (`cpu`, `cuda`, `cuda:N`) and the arithmetic it runs
//! in (`precision`).

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

/// The arithmetic of the convolutions and matrix products: the `precision` config key and the
/// `--precision` flag. Weights, BatchNorm statistics, the loss and the optimizer stay f32 in
/// every mode, and so do checkpoints.
///
/// What runs where in this version: `f32` everywhere (the default, bit-stable); `tf32` on CUDA
/// (cuBLAS products with TF32 tensor cores); `bf16` on CPUs with AVX512-BF16 (every
/// convolution product, forward and backward, with bf16-rounded operands and f32 sums;
/// docs/performance.md). The rest is refused with the reason: bf16 on a CPU without
/// AVX512-BF16, f16 on the CPU, bf16 and f16 on the GPU (docs/cuda.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// f32 data, products with TF32 inputs (10-bit mantissa) on CUDA tensor cores.
    Tf32,
    /// bfloat16 products with f32 accumulation.
    Bf16,
    /// float16 products with f32 accumulation and loss scaling.
    F16,
}

impl Precision {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Whether this is the default `f32` (left out of written configs).
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }

    /// Sets the process up to compute in this precision on `device`, or refuses it, saying why
    /// and what to use instead ([`Precision::check`]). On the CPU this is a process-wide
    /// setting of the convolution kernels ([`retinanet_kernels::bf16::set_bf16_products`]),
    /// so `f32` also turns bf16 products off again.
    pub fn apply(self, device: &Device) -> Result<()> {
        self.check(device)?;
        if device.is_cpu() {
            retinanet_kernels::bf16::set_bf16_products(self == Self::Bf16)
                .map_err(|e| anyhow::anyhow!("precision = \"bf16\": {e}"))?;
            return Ok(());
        }
        // cuBLAS's f32 products: TF32 tensor cores or full f32.
        candle_core::cuda::set_gemm_reduced_precision_f32(self == Self::Tf32);
        Ok(())
    }

    /// Whether this precision can run on `device`, without changing anything: the refusal says
    /// why and what to use instead.
    pub fn check(self, device: &Device) -> Result<()> {
        let key = format!("precision = \"{}\"", self.name());
        if device.is_cpu() {
            let cpu =
                || retinanet_kernels::cpu::model_name().unwrap_or_else(|| "this CPU".to_string());
            return match self {
                Self::F32 => Ok(()),
                Self::Tf32 => bail!(
                    "{key}: TF32 is a format of the GPU's tensor cores; the CPU computes f32 products at full precision: use precision = \"f32\" on the CPU"
                ),
                Self::Bf16 if retinanet_kernels::bf16::available() => Ok(()),
                Self::Bf16 => bail!(
                    "{key} on the CPU needs bf16 dot products in hardware (AVX512-BF16: AMD Zen 4, Intel Cooper Lake, Sapphire Rapids and later), which {} does not have: use precision = \"f32\"",
                    cpu()
                ),
                Self::F16 => bail!(
                    "{key}: this version has no f16 kernels for the CPU ({}): use precision = \"f32\", or \"bf16\" on a CPU with AVX512-BF16 (see docs/performance.md)",
                    cpu()
                ),
            };
        }
        match self {
            Self::F32 | Self::Tf32 => Ok(()),
            Self::Bf16 | Self::F16 => bail!(
                "{key}: mixed-precision training and inference on the GPU are not in this version: use precision = \"f32\" or \"tf32\" (see docs/cuda.md)"
            ),
        }
    }
}

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
    fn precision_on_the_cpu() {
        let cpu = Device::Cpu;
        Precision::F32.apply(&cpu).unwrap();
        let e = Precision::Tf32.apply(&cpu).unwrap_err().to_string();
        assert!(
            e.contains("precision = \"tf32\"") && e.contains("\"f32\""),
            "{e}"
        );
        // bf16 runs where the CPU has AVX512-BF16; elsewhere the refusal names the feature.
        // `check`, not `apply`: turning bf16 on is process-wide and would reach the other tests
        // of this binary (tests/bf16.rs runs it in a process of its own).
        match Precision::Bf16.check(&cpu) {
            Ok(()) => assert!(retinanet_kernels::bf16::available()),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("precision = \"bf16\"") && e.contains("\"f32\""),
                    "{e}"
                );
                assert!(e.contains("AVX512-BF16"), "{e}");
                assert!(!retinanet_kernels::bf16::available());
            }
        }
        let e = Precision::F16.apply(&cpu).unwrap_err().to_string();
        assert!(e.contains("precision = \"f16\""), "{e}");
        for p in [
            Precision::F32,
            Precision::Tf32,
            Precision::Bf16,
            Precision::F16,
        ] {
            let v: Precision = serde_json::from_str(&format!("\"{}\"", p.name())).unwrap();
            assert_eq!(v, p);
        }
    }

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
