//! A world of threads in one process: the [`Communicator`] of tests that check the
//! data-parallel arithmetic (SyncBatchNorm, gradient sums) without an MPI launcher. Each thread
//! holds one rank; every collective waits for all of them, and sums are taken in rank order, so
//! results are deterministic.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::Result;

use super::Communicator;

struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
}

/// One rank of an in-process world; see [`ThreadComm::world`].
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadComm(rank {} of {})", self.rank, self.shared.size)
    }
}

impl ThreadComm {
    /// The ranks of a world of `size`, one per thread that will use it.
    pub fn world(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's bytes, in rank order, to every rank.
    fn exchange(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        self.shared.slots.lock().unwrap()[self.rank] = mine;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().clone();
        // Nobody overwrites a slot before every rank has read them all.
        self.shared.barrier.wait();
        all
    }
}

fn to_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn local_size(&self) -> usize {
        self.shared.size
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let all = self.exchange(to_bytes(buf, f64::to_le_bytes));
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all
                .iter()
                .map(|b| f64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap()))
                .sum();
        }
        Ok(())
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(to_bytes(buf, f32::to_le_bytes));
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all
                .iter()
                .map(|b| f32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()))
                .sum();
        }
        Ok(())
    }
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(to_bytes(buf, f32::to_le_bytes));
        for (i, x) in buf.iter_mut().enumerate() {
            *x = f32::from_le_bytes(all[0][i * 4..i * 4 + 4].try_into().unwrap());
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        let all = self.exchange(buf.clone());
        *buf = all[0].clone();
        Ok(())
    }
    fn gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.exchange(data.to_vec());
        Ok(if self.rank == 0 { all } else { Vec::new() })
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
