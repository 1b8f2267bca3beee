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

/// Runs `f` with [`for_each_chunk`] and [`for_each_index`] sequential on this thread.
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

/// Calls `f(i)` for `i` in `0..n`, in parallel unless inside [`sequential`].
pub(crate) fn for_each_index(n: usize, f: impl Fn(usize) + Send + Sync) {
    if SEQUENTIAL.with(Cell::get) {
        (0..n).for_each(f);
    } else {
        (0..n).into_par_iter().for_each(f);
    }
}

thread_local! {
    /// Per-thread scratch memory reused across calls (patch matrices, Winograd's buffers), so
    /// large buffers are not mapped, zero-filled and unmapped by the allocator on every
    /// convolution; two, for a call nested in another (a transformed kernel held while the
    /// input's buffers are in use).
    static SCRATCH: [std::cell::RefCell<Vec<u64>>; 2] =
        const { [std::cell::RefCell::new(Vec::new()), std::cell::RefCell::new(Vec::new())] };
}

/// Largest scratch buffer kept between calls (32 MiB a thread); larger ones are allocated per call.
const MAX_CACHED_WORDS: usize = 4 << 20;

/// Runs `f` with a scratch slice of `len` elements of `T` (contents unspecified: `f` must write
/// before it reads). Calls nested more than two deep on one thread get a fresh allocation.
pub(crate) fn with_scratch<T: candle_core::WithDType, R>(
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let words = (len * std::mem::size_of::<T>()).div_ceil(8);
    if words > MAX_CACHED_WORDS {
        return f(&mut vec![T::zero(); len]);
    }
    SCRATCH.with(|cells| {
        let Some(mut buf) = cells.iter().find_map(|c| c.try_borrow_mut().ok()) else {
            return f(&mut vec![T::zero(); len]);
        };
        if buf.len() < words {
            buf.resize(words, 0);
        }
        // SAFETY: the buffer holds at least `len * size_of::<T>()` initialised bytes, is
        // 8-byte aligned (enough for every candle dtype) and every bit pattern is a valid
        // value of those plain numeric types.
        let s = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), len) };
        f(s)
    })
}

/// A raw pointer that parallel tasks writing disjoint elements may share (each use documents why
/// its writes are disjoint).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used for writes to disjoint indices, documented at each use.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

/// Elements below which [`zeroed`] fills on the calling thread (a task costs more).
const PAR_ZERO_MIN: usize = 1 << 16;

/// `vec![0; n]`, with the zeros written by all threads for large `n`.
///
/// Every kernel output that is accumulated into (or written in parallel afterwards) starts as
/// zeros; `vec!` writes them on the calling thread, which is candle's (single) thread, while the
/// rayon workers wait: ~2% of a small-model training step's samples were such memsets, serial.
/// Split over the threads, the zeroing (and the first touch of fresh pages) takes a share of
/// that wall time.
pub fn zeroed<T: candle_core::WithDType>(n: usize) -> Vec<T> {
    if n < PAR_ZERO_MIN || threads() == 1 {
        return vec![T::zero(); n];
    }
    let chunk = n.div_ceil(threads() * 4).max(PAR_ZERO_MIN / 4);
    filled_later(n, |v| {
        v.par_chunks_mut(chunk).for_each(|c| {
            c.fill(std::mem::MaybeUninit::new(T::zero()));
        })
    })
}

/// A vector of `n` values computed chunk by chunk in parallel: `f(i, dst)` writes every element
/// of the `i`-th `chunk`-long piece (the last may be shorter). No zero-fill first: an output
/// computed element by element is written once, not twice.
pub(crate) fn fill_chunks<T: Copy + Send>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Send + Sync,
) -> Vec<T> {
    filled_later(n, |v| {
        v.par_chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c))
    })
}

/// A vector of `n` values that `fill` writes completely before anything reads it: no zero-fill
/// first (a memset of every output and buffer).
pub(crate) fn filled_later<T: Copy>(
    n: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Vec<T> {
    let mut v: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(n) };
    fill(&mut v);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `fill` wrote every element (the callers' contract); MaybeUninit<T> and T share
    // their layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), n, v.capacity()) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fill_chunks_writes_every_element_once_in_place() {
        // Freed non-zero memory first, so an element left unwritten would show.
        for (n, chunk) in [(0, 4), (1, 4), (7, 3), (100_000, 1 << 15), (65_537, 1000)] {
            drop(vec![7.5f32; n]);
            let v = super::fill_chunks::<f32>(n, chunk, |i, c| {
                for (j, o) in c.iter_mut().enumerate() {
                    o.write((i * chunk + j) as f32);
                }
            });
            assert_eq!(v.len(), n);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32), "n = {n}");
        }
    }

    #[test]
    fn zeroed_is_zero_at_every_size() {
        // Below the threshold, at it, and uneven chunk counts above it; memory reused from a
        // freed non-zero buffer must not leak through.
        for n in [
            0,
            1,
            1000,
            super::PAR_ZERO_MIN - 1,
            super::PAR_ZERO_MIN,
            300_001,
        ] {
            drop(vec![7.5f32; n]);
            let v = super::zeroed::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "n = {n}");
            let d = super::zeroed::<f64>(n);
            assert!(d.iter().all(|&x| x.to_bits() == 0), "n = {n}");
        }
    }
}
