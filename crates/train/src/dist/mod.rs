//! Data parallelism: one process per device, gradients summed by a collective library.
//!
//! Every process (rank) runs the same training loop on its share of each global batch. The
//! [`Communicator`] hides which collective library runs: [`Local`] for a world of one process
//! (every collective is the identity and costs nothing), MPI's own collectives on the CPU with
//! the `distributed` feature (`mpirun -n N train-detector ...`, `srun` under SLURM), and NCCL
//! for CUDA tensors with the `nccl` feature. [`from_env`] picks one from the launcher's
//! environment.
//!
//! Exactness against one process: each rank's loss is its share of the global batch's loss
//! (normalised by global counts), so the sum of the ranks' gradients is the gradient of the
//! global loss; weights, momentum buffers and every decision of the loop (learning rate, stops,
//! the NaN check) are the same on every rank.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

#[cfg(feature = "distributed")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod threads;

/// Collectives over the ranks of a data-parallel run. Called from the training thread only.
pub trait Communicator: Send + Sync + fmt::Debug {
    /// This process's rank in `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// This process's rank among the ranks of its machine (which GPU it takes).
    fn local_rank(&self) -> usize;
    /// Number of ranks on this machine.
    fn local_size(&self) -> usize;
    /// `"local"`, `"mpi"` or `"nccl"`.
    fn backend(&self) -> &'static str;
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's values to every rank, in place.
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's bytes to every rank (the length travels too).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()>;
    /// Every rank's bytes, in rank order, on rank 0 (empty on the others).
    fn gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Ends every rank of the job at once (a failure only this rank saw).
    fn abort(&self, code: i32) -> !;

    /// The sum over the ranks of a tensor on any device. The default goes through host memory;
    /// a device-side library (NCCL) reduces in place on the device.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        host_all_reduce_tensor(self, t)
    }

    /// Whether this is rank 0, the rank that writes checkpoints, logs and reports.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// [`Communicator::all_reduce_sum_tensor`] through host memory and the f32 all-reduce.
pub fn host_all_reduce_tensor<C: Communicator + ?Sized>(comm: &C, t: &Tensor) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(t.clone());
    }
    let dims = t.dims().to_vec();
    let mut v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    comm.all_reduce_sum_f32(&mut v)?;
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?
        .to_dtype(t.dtype())?
        .to_device(t.device())?)
}

/// Whether to run the gradient all-reduce even in a world of one process
/// (`RETINANET_ALWAYS_ALLREDUCE=1`): measures what the collective path costs on one device.
fn always_all_reduce() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RETINANET_ALWAYS_ALLREDUCE").is_ok_and(|v| v == "1"))
}

/// The world of one process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Communicator for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![data.to_vec()])
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The communicator a process was launched for: MPI when an MPI launcher started it (and this
/// build has the `distributed` feature), else [`Local`]. A multi-process launch of a build
/// without the feature is refused: its ranks would each train alone into the same run folder.
pub fn from_env() -> Result<Arc<dyn Communicator>> {
    let launched = launcher_world_size();
    #[cfg(feature = "distributed")]
    if launched.is_some() {
        return Ok(Arc::new(mpi::MpiComm::init()?));
    }
    if let Some((n, var)) = launched.filter(|(n, _)| *n > 1) {
        bail!(
            "started as one of {n} processes ({var} = {n}), but this binary was built without the `distributed` feature: rebuild with `--features distributed` (see docs/distributed.md)"
        );
    }
    Ok(Arc::new(Local))
}

/// The world size an MPI launcher announced through the environment, with the variable read:
/// Open MPI's `mpirun`, MPICH / Hydra and PMI-2, PMIx, SLURM's `srun`.
pub fn launcher_world_size() -> Option<(usize, &'static str)> {
    for var in [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ] {
        if let Some(n) = std::env::var(var).ok().and_then(|v| v.trim().parse().ok()) {
            return Some((n, var));
        }
    }
    // srun without an MPI plug-in still sets SLURM_NTASKS for each task it starts.
    if std::env::var("SLURM_STEP_ID").is_ok()
        && let Some(n) = std::env::var("SLURM_NTASKS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
    {
        return Some((n, "SLURM_NTASKS"));
    }
    None
}

/// An error every rank raised together (a collective decision, such as a NaN loss on some
/// rank): printed once by rank 0, and the ranks end normally instead of aborting the job.
#[derive(Debug)]
pub struct Agreed(pub String);

impl fmt::Display for Agreed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Agreed {}

/// Whether `e` is an [`Agreed`] error (raised by every rank at once).
pub fn is_agreed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Agreed>().is_some())
}

/// Makes one rank's failure everyone's: every rank learns whether any rank failed, and all
/// return the first failing rank's message (with its rank when the world is larger than one).
/// Used around set-up steps that may fail on one rank only, so no rank waits forever in the next
/// collective for a rank that has given up.
pub fn agree<T>(comm: &dyn Communicator, r: Result<T>) -> Result<T> {
    if comm.size() == 1 {
        return r;
    }
    let mine = match &r {
        Ok(_) => Vec::new(),
        Err(e) => format!("{e:#}").into_bytes(),
    };
    let all = comm.gather_bytes(&mine)?;
    let mut verdict = Vec::new();
    if comm.is_root()
        && let Some((rank, msg)) = all.iter().enumerate().find(|(_, m)| !m.is_empty())
    {
        verdict = format!("rank {rank}: {}", String::from_utf8_lossy(msg)).into_bytes();
    }
    comm.broadcast_bytes(&mut verdict)?;
    match r {
        Ok(v) if verdict.is_empty() => Ok(v),
        // The verdict carries the first failing rank's whole message.
        _ => Err(Agreed(String::from_utf8_lossy(&verdict).into_owned()).into()),
    }
}

/// Opens a run's data on every rank: rank 0 first (it may generate the synthetic data the
/// others then read), then the others; a failure anywhere is everyone's.
pub fn open_on_ranks<T>(comm: &dyn Communicator, open: impl Fn() -> Result<T>) -> Result<T> {
    let first = if comm.is_root() {
        open().map(Some)
    } else {
        Ok(None)
    };
    let opened = match agree(comm, first)? {
        Some(d) => Ok(d),
        None => open(),
    };
    agree(comm, opened)
}

/// Refuses a global batch the ranks cannot share evenly, naming both numbers.
pub fn check_divisible(key: &str, batch: usize, comm: &dyn Communicator) -> Result<usize> {
    let n = comm.size();
    if !batch.is_multiple_of(n) {
        bail!(
            "{key} = {batch} is the global batch, split evenly over the ranks: {n} ranks do not divide it (use a multiple of {n})"
        );
    }
    Ok(batch / n)
}

/// Floats per all-reduce of the gradients: a few large messages, not one per variable (the
/// latency of a collective dwarfs a small tensor's transfer).
const BUCKET_FLOATS: usize = 8 << 20;

/// Sums the gradients of `vars` over the ranks, in place in `grads`: flattened into a few large
/// buffers in the variables' order, reduced, and split back. A variable without a gradient on
/// this rank counts as zeros (every rank runs the same graph, so none normally lacks one).
pub fn all_reduce_grads(
    comm: &dyn Communicator,
    grads: &mut GradStore,
    vars: &[(String, Var)],
) -> Result<()> {
    if comm.size() == 1 && !always_all_reduce() {
        return Ok(());
    }
    let mut start = 0;
    while start < vars.len() {
        // The next bucket: variables up to BUCKET_FLOATS values (at least one).
        let mut end = start;
        let mut len = 0;
        while end < vars.len() && (end == start || len + vars[end].1.elem_count() <= BUCKET_FLOATS)
        {
            len += vars[end].1.elem_count();
            end += 1;
        }
        let bucket = &vars[start..end];
        let on_device = bucket.iter().any(|(_, v)| !v.device().is_cpu());
        if on_device {
            // Concatenated on the device so a device-side library reduces it there.
            let parts: Vec<Tensor> = bucket
                .iter()
                .map(|(_, v)| match grads.get(v) {
                    Some(g) => g.flatten_all(),
                    None => v.zeros_like()?.flatten_all(),
                })
                .collect::<candle_core::Result<_>>()?;
            let summed = comm.all_reduce_sum_tensor(&Tensor::cat(&parts, 0)?)?;
            let mut off = 0;
            for (_, v) in bucket {
                let n = v.elem_count();
                let g = summed.narrow(0, off, n)?.reshape(v.dims())?.contiguous()?;
                grads.insert(v, g);
                off += n;
            }
        } else {
            let mut buf = Vec::with_capacity(len);
            for (_, v) in bucket {
                match grads.get(v) {
                    Some(g) => buf.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    None => buf.resize(buf.len() + v.elem_count(), 0.0),
                }
            }
            comm.all_reduce_sum_f32(&mut buf)?;
            let mut off = 0;
            for (_, v) in bucket {
                let n = v.elem_count();
                let g = Tensor::from_slice(&buf[off..off + n], v.dims(), v.device())?
                    .to_dtype(v.dtype())?;
                grads.insert(v, g);
                off += n;
            }
        }
        start = end;
    }
    Ok(())
}

/// Every variable of `varmap` (weights and BatchNorm statistics) set to rank 0's values.
pub fn broadcast_varmap(comm: &dyn Communicator, varmap: &VarMap) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    for (_, var) in sorted_vars(varmap) {
        let mut v: Vec<f32> = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        comm.broadcast_f32(&mut v)?;
        let t = Tensor::from_vec(v, var.dims(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// The variables of `varmap` in name order.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A checksum of tensors' names and bits, in name order.
pub fn tensors_checksum<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<u32> {
    let mut items: Vec<(&str, &Tensor)> = tensors.into_iter().collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = crc32fast::Hasher::new();
    for (name, t) in items {
        h.update(name.as_bytes());
        let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        for x in v {
            h.update(&x.to_bits().to_le_bytes());
        }
    }
    Ok(h.finalize())
}

/// Checks that every rank holds the same weights (and optimizer state): rank 0's checksum is
/// sent to all and compared; a difference is an error on every rank.
pub fn check_same_weights(
    comm: &dyn Communicator,
    varmap: &VarMap,
    extra: &HashMap<String, Tensor>,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let vars = sorted_vars(varmap);
    let tensors: Vec<(&str, &Tensor)> = vars
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_tensor()))
        .chain(extra.iter().map(|(k, t)| (k.as_str(), t)))
        .collect();
    let mine = tensors_checksum(tensors)?;
    let mut root = mine.to_le_bytes().to_vec();
    comm.broadcast_bytes(&mut root)?;
    let r = if root == mine.to_le_bytes() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "rank {} holds other initial weights than rank 0 (checksum {mine:08x}, rank 0 {:02x?})",
            comm.rank(),
            root
        ))
    };
    agree(comm, r)
}

/// The adapter SyncBatchNorm uses: BatchNorm statistics summed over the ranks.
#[derive(Debug)]
pub struct StatsReducer(pub Arc<dyn Communicator>);

impl retinanet_kernels::SumReducer for StatsReducer {
    fn all_reduce_sum(&self, values: &mut [f64]) -> candle_core::Result<()> {
        self.0
            .all_reduce_sum_f64(values)
            .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm all-reduce: {e:#}")))
    }
}

/// The share of `items` that rank `rank` of `world` takes: contiguous, sizes differing by at
/// most one.
pub fn shard_range(items: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    items * rank / world..items * (rank + 1) / world
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_and_cover() {
        for items in 0..40 {
            for world in 1..6 {
                let mut next = 0;
                for r in 0..world {
                    let s = shard_range(items, r, world);
                    assert_eq!(s.start, next);
                    assert!(s.len() >= items / world && s.len() <= items.div_ceil(world));
                    next = s.end;
                }
                assert_eq!(next, items);
            }
        }
    }

    #[test]
    fn local_world_is_the_identity() {
        let c = Local;
        let mut v = vec![1.0f64, 2.0];
        c.all_reduce_sum_f64(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(c.gather_bytes(b"ab").unwrap(), vec![b"ab".to_vec()]);
        assert!(agree(&c, Err::<(), _>(anyhow::anyhow!("boom"))).is_err());
        assert_eq!(check_divisible("train.batch_size", 5, &c).unwrap(), 5);
    }

    #[test]
    fn agreed_errors_are_recognised() {
        let e: anyhow::Error = Agreed("x".into()).into();
        assert!(is_agreed(&e));
        assert!(is_agreed(&e.context("outer")));
        assert!(!is_agreed(&anyhow::anyhow!("plain")));
    }
}
