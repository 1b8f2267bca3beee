//! Sums that vectorise.

use candle_core::WithDType;

/// `Σ f(v)` over `p` in 16 interleaved partial sums: a single running sum is a chain of
/// dependent float additions (4 cycles each) that the compiler may not reorder; 16 independent
/// lanes vectorise and run at memory speed.
#[inline]
pub(crate) fn lane_sum<T: WithDType>(p: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 16];
    let chunks = p.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut s = tail.iter().fold(T::zero(), |a, &v| a + f(v));
    for a in acc {
        s += a;
    }
    s
}

/// [`lane_sum`] of two functions at once.
#[inline]
pub(crate) fn lane_sum2<T: WithDType>(
    p: &[T],
    q: &[T],
    f: impl Fn(T, T) -> T,
    g: impl Fn(T, T) -> T,
) -> (T, T) {
    let (mut a, mut b) = ([T::zero(); 16], [T::zero(); 16]);
    let (pc, qc) = (p.chunks_exact(16), q.chunks_exact(16));
    let (pt, qt) = (pc.remainder(), qc.remainder());
    for (cp, cq) in pc.zip(qc) {
        for (((a, b), &x), &y) in a.iter_mut().zip(b.iter_mut()).zip(cp).zip(cq) {
            *a += f(x, y);
            *b += g(x, y);
        }
    }
    let (mut sa, mut sb) = (T::zero(), T::zero());
    for (&x, &y) in pt.iter().zip(qt) {
        sa += f(x, y);
        sb += g(x, y);
    }
    for (x, y) in a.into_iter().zip(b) {
        sa += x;
        sb += y;
    }
    (sa, sb)
}
