//! The MPI communicator (feature `distributed`): ranks, world and local rank from MPI, and MPI's
//! own collectives on host buffers. Started by `mpirun -n N ...` or `srun ...`.
//!
//! A rank that dies makes a blocking collective wait forever on the others. `mpirun` and `srun`
//! normally end the job when one of its processes dies; as a second line of defence every
//! collective runs under a watchdog that ends this process after
//! `RETINANET_COLLECTIVE_TIMEOUT_S` seconds (default 600) of waiting, naming the collective, so
//! no job hangs without bound.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Communicator as RunComm;

/// Bytes per broadcast message (MPI counts are `int`).
const CHUNK: usize = 1 << 30;

/// What the training thread is waiting for, and since when.
type Waiting = Arc<Mutex<Option<(Instant, &'static str)>>>;

/// MPI's world communicator.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    waiting: Waiting,
    /// NCCL over the ranks' GPUs, joined at the first device all-reduce.
    #[cfg(feature = "nccl")]
    nccl: super::nccl::Lazy,
    // Finalizes MPI when the communicator is dropped (after `world` and `nccl`).
    _universe: Universe,
}

// SAFETY: MPI handles are only used from the thread that initialised MPI (the training thread;
// MPI is initialised with `Threading::Funneled`); the watchdog thread never calls MPI.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MpiComm(rank {} of {}, local {} of {})",
            self.rank, self.size, self.local_rank, self.local_size
        )
    }
}

/// Leaves the "waiting" state when dropped.
struct Watch<'a>(&'a Waiting);

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl MpiComm {
    /// Initialises MPI (once per process) and learns this process's place in the world.
    pub fn init() -> Result<Self> {
        let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
            bail!("MPI is already initialised in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        // The ranks sharing this machine's memory: their order gives the GPU each one takes.
        let node = world.split_shared(world.rank());
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        let timeout = match std::env::var("RETINANET_COLLECTIVE_TIMEOUT_S") {
            Ok(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|t| *t > 0.0 && t.is_finite())
                .with_context(|| {
                    format!(
                        "RETINANET_COLLECTIVE_TIMEOUT_S = `{v}` is not a positive number of seconds"
                    )
                })?,
            Err(_) => 600.0,
        };
        let waiting: Waiting = Arc::default();
        spawn_watchdog(
            waiting.clone(),
            Duration::from_secs_f64(timeout),
            rank,
            size,
        );
        Ok(Self {
            world,
            rank,
            size,
            local_rank,
            local_size,
            waiting,
            #[cfg(feature = "nccl")]
            nccl: Default::default(),
            _universe: universe,
        })
    }

    fn watch(&self, what: &'static str) -> Watch<'_> {
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what));
        Watch(&self.waiting)
    }
}

fn spawn_watchdog(waiting: Waiting, timeout: Duration, rank: usize, size: usize) {
    let tick = (timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let _ = std::thread::Builder::new()
        .name("retinanet-mpi-watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let w = *waiting.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((since, what)) = w
                    && since.elapsed() >= timeout {
                        eprintln!(
                            "rank {rank} of {size}: the {what} has waited {:.0} s for the other ranks (RETINANET_COLLECTIVE_TIMEOUT_S = {:.0}): a rank has died or hangs; ending this rank",
                            since.elapsed().as_secs_f64(),
                            timeout.as_secs_f64()
                        );
                        // SAFETY: ends the process without running destructors or atexit handlers
                        // (MPI's could block on the dead peer).
                        unsafe { libc::_exit(124) };
                    }
            }
        });
}

impl RunComm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _w = self.watch("all-reduce");
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let _w = self.watch("gradient all-reduce");
        for chunk in buf.chunks_mut(CHUNK / 4) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        let _w = self.watch("broadcast");
        let root = self.world.process_at_rank(0);
        for chunk in buf.chunks_mut(CHUNK / 4) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        let _w = self.watch("broadcast");
        let root = self.world.process_at_rank(0);
        let mut len = [buf.len() as u64];
        root.broadcast_into(&mut len[..]);
        buf.resize(len[0] as usize, 0);
        for chunk in buf.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    fn gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let _w = self.watch("gather");
        if data.len() >= i32::MAX as usize {
            bail!("gather: {} bytes exceed one MPI message", data.len());
        }
        let root = self.world.process_at_rank(0);
        // One trailing byte on every message: Open MPI refuses the buffers of a zero-length
        // gather.
        let mut msg = Vec::with_capacity(data.len() + 1);
        msg.extend_from_slice(data);
        msg.push(0);
        let data = &msg[..];
        let len = [data.len() as i32];
        if self.rank != 0 {
            root.gather_into(&len[..]);
            root.gather_varcount_into(data);
            return Ok(Vec::new());
        }
        let mut lens = vec![0i32; self.size];
        root.gather_into_root(&len[..], &mut lens[..]);
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        if total > i32::MAX as usize {
            bail!("gather: {total} bytes in all exceed one MPI message");
        }
        let displs: Vec<i32> = lens
            .iter()
            .scan(0i32, |acc, &l| {
                let d = *acc;
                *acc += l;
                Some(d)
            })
            .collect();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &lens[..], &displs[..]);
            root.gather_varcount_into_root(data, &mut part);
        }
        Ok(lens
            .iter()
            .zip(&displs)
            .map(|(&l, &d)| all[d as usize..(d + l - 1) as usize].to_vec())
            .collect())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    #[cfg(feature = "nccl")]
    fn all_reduce_sum_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        if t.device().is_cuda() {
            let nccl = self.nccl.get(self, t.device())?;
            let _w = self.watch("NCCL all-reduce");
            return nccl.all_reduce_sum(t);
        }
        super::host_all_reduce_tensor(self, t)
    }
}
