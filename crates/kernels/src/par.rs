//! Small parallel helpers over rayon's global pool.

use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    /// Set while a caller already runs one task per thread, so inner loops stay sequential.
    static SEQUENTIAL: Cell<bool> = const { Cell::new(false) };
}

/// Threads of rayon's pool (`RAYON_NUM_THREADS`, else the logical CPUs).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` with [`for_each_chunk`] sequential on this thread.
pub(crate) fn sequential<R>(f: impl FnOnce() -> R) -> R {
    let old = SEQUENTIAL.with(|s| s.replace(true));
    let r = f();
    SEQUENTIAL.with(|s| s.set(old));
    r
}

/// Calls `f(i, chunk)` for the `i`-th `size`-long chunk of `data`, in parallel unless inside
/// [`sequential`].
pub(crate) fn for_each_chunk<T: Send>(
    data: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Send + Sync,
) {
    if size == 0 {
        return;
    }
    if SEQUENTIAL.with(Cell::get) || data.len() <= size {
        data.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}
