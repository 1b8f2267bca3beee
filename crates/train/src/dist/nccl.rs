//! NCCL all-reduce of CUDA tensors between the MPI ranks (feature `nccl`), the Horovod pattern:
//! rank 0 makes NCCL's unique id, MPI broadcasts it, and every rank joins one NCCL communicator
//! on its own GPU. The gradients are then summed on the devices, in place, on candle's stream;
//! the few host-side collectives of a step (losses, decisions, gathers) stay on MPI.
//!
//! The NCCL communicator is made at the first device all-reduce, when every rank's GPU is
//! known (all ranks reach it at the same step, as every collective).

use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::Communicator;

/// One NCCL communicator over every rank's GPU.
pub struct DeviceComm {
    comm: Comm,
    ordinal: usize,
}

// SAFETY: used from the training thread only, as the MPI communicator that owns it.
unsafe impl Send for DeviceComm {}
unsafe impl Sync for DeviceComm {}

impl DeviceComm {
    /// Joins the NCCL communicator of `host`'s world on `device` (a collective over `host`).
    pub fn join(host: &dyn Communicator, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("NCCL needs a CUDA device");
        };
        let mut id = if host.is_root() {
            let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        host.broadcast_bytes(&mut id)?;
        if id.len() != 128 {
            bail!("NCCL unique id of {} bytes, expected 128", id.len());
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&id) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            dev.cuda_stream(),
            host.rank(),
            host.size(),
            Id::uninit(internal),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "rank {}: cannot join the NCCL communicator of {} ranks on cuda:{} ({e:?}); NCCL refuses two ranks on one GPU",
                host.rank(),
                host.size(),
                device_ordinal(device)
            )
        })?;
        Ok(Self {
            comm,
            ordinal: device_ordinal(device),
        })
    }

    /// The sum over the ranks of a CUDA tensor (a new tensor; `t` is unchanged).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if device_ordinal(t.device()) != self.ordinal {
            bail!(
                "NCCL all-reduce of a tensor on {:?}, the communicator is on cuda:{}",
                t.device().location(),
                self.ordinal
            );
        }
        // A private contiguous copy: reduced in place.
        let out = t.contiguous()?.copy()?;
        out.inplace_op1(&SumInPlace(&self.comm))
            .context("NCCL all-reduce")?;
        Ok(out)
    }
}

fn device_ordinal(d: &Device) -> usize {
    match d.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => usize::MAX,
    }
}

struct SumInPlace<'a>(&'a Comm);

impl InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL reduces CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("NCCL all-reduce needs a contiguous tensor from offset 0")
        }
        let err = |e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}"));
        match s.dtype() {
            candle_core::DType::F32 => {
                let slice = s.as_cuda_slice_mut::<f32>()?;
                self.0
                    .all_reduce_in_place(slice, &ReduceOp::Sum)
                    .map_err(err)?;
            }
            candle_core::DType::F64 => {
                let slice = s.as_cuda_slice_mut::<f64>()?;
                self.0
                    .all_reduce_in_place(slice, &ReduceOp::Sum)
                    .map_err(err)?;
            }
            d => candle_core::bail!("NCCL all-reduce of {d:?} is not supported"),
        }
        Ok(())
    }
}

/// The NCCL communicator an MPI communicator makes when first asked for a device all-reduce.
#[derive(Default)]
pub struct Lazy(OnceLock<Result<DeviceComm, String>>);

impl Lazy {
    /// The communicator on `device`, joined on first use.
    pub fn get(&self, host: &dyn Communicator, device: &Device) -> Result<&DeviceComm> {
        self.0
            .get_or_init(|| DeviceComm::join(host, device).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}
