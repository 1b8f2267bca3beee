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
/// (cuBLAS products with TF32 tensor cores). `bf16` and `f16` are refused, with the reason:
/// on the CPU bf16 needs AVX512-BF16, and no bf16 kernels are written yet even where the CPU has
/// it (docs/performance.md); on the GPU the mixed-precision path is not written yet
/// (docs/cuda.md).
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
    /// and what to use instead.
    pub fn apply(self, device: &Device) -> Result<()> {
        let key = format!("precision = \"{}\"", self.name());
        if device.is_cpu() {
            return match self {
                Self::F32 => Ok(()),
                Self::Tf32 => bail!(
                    "{key}: TF32 is a format of the GPU's tensor cores; the CPU computes f32 products at full precision: use precision = \"f32\" on the CPU"
                ),
                Self::Bf16 | Self::F16 => {
                    let cpu = retinanet_kernels::cpu::model_name()
                        .unwrap_or_else(|| "this CPU".to_string());
                    if self == Self::Bf16 && !retinanet_kernels::cpu::has_bf16() {
                        bail!(
                            "{key} on the CPU needs bf16 dot products in hardware (AVX512-BF16: AMD Zen 4, Intel Cooper Lake, Sapphire Rapids and later), which {cpu} does not have: use precision = \"f32\""
                        )
                    }
                    bail!(
                        "{key}: this version has no {} kernels for the CPU ({cpu}): use precision = \"f32\" (see docs/performance.md)",
                        self.name()
                    )
                }
            };
        }
        match self {
            Self::F32 | Self::Tf32 => {
                // cuBLAS's f32 products: TF32 tensor cores or full f32.
                candle_core::cuda::set_gemm_reduced_precision_f32(self == Self::Tf32);
                Ok(())
            }
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
        let e = Precision::Bf16.apply(&cpu).unwrap_err().to_string();
        assert!(
            e.contains("precision = \"bf16\"") && e.contains("\"f32\""),
            "{e}"
        );
        // Which refusal depends on the CPU: without AVX512-BF16 it names the missing feature.
        assert_eq!(
            e.contains("AVX512-BF16"),
            !retinanet_kernels::cpu::has_bf16(),
            "{e}"
        );
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
