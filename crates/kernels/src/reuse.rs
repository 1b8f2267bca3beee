//! Derived forms of weights kept while the weights do not change: Winograd's transformed
//! kernels and the direct kernel's packed weights (f32 blocks, bf16 pairs). A detector head runs each of its convolutions on every pyramid level with the same
//! weights, and inference runs every layer on every image with the same weights; the transform
//! of a 256 -> 256 kernel (36 x 256 x 256 floats) costs about as much as the products of one
//! small level. An entry is found by the weights' content — a fingerprint of sampled values,
//! then a full comparison — never by their address, so weights updated in place (the SGD step)
//! or a freed buffer reused for other weights can never return a stale transform.
//!
//! The cache holds at most `RETINANET_TRANSFORM_CACHE_MB` MiB (default a sixteenth of the
//! memory, 128 to 256; 0 turns it off),
//! least recently used entries evicted first, but for those in a cycle of reuse (see
//! [`Cache::buffer`]); evicted buffers are recycled for the next entries so that steady training
//! does not map (and page-fault) fresh memory on every call.

use std::sync::{Arc, Mutex, OnceLock};

/// What was derived from the weights, and their shape: entries match only with equal tags.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Tag {
    pub kind: &'static str,
    pub dims: [usize; 4],
}

struct Entry {
    tag: Tag,
    fp: u64,
    /// Length of the derived form at the front of `buf`; the weights' copy follows it.
    len: usize,
    buf: Arc<Vec<f32>>,
    used: u64,
    /// Lookups between its last two uses, once it has been reused.
    gap: Option<u64>,
    /// Derived in one pass over the weights ([`Cache::derived`]'s `cheap`): evicted first.
    cheap: bool,
}

/// 32-bit values stored in the transform cache's f32 buffers as bits: f32, u32 (bf16 pairs).
pub(crate) trait Word: Copy + Default + Send + Sync {
    fn from_f32s(s: &mut [f32]) -> &mut [Self];
    fn from_f32s_ref(s: &[f32]) -> &[Self];
    /// The words as f32 bits, for code that only moves them (transposes).
    fn as_f32s(s: &[Self]) -> &[f32];
    fn as_f32s_mut(s: &mut [Self]) -> &mut [f32];
}

impl Word for f32 {
    fn from_f32s(s: &mut [f32]) -> &mut [f32] {
        s
    }
    fn from_f32s_ref(s: &[f32]) -> &[f32] {
        s
    }
    fn as_f32s(s: &[f32]) -> &[f32] {
        s
    }
    fn as_f32s_mut(s: &mut [f32]) -> &mut [f32] {
        s
    }
}

impl Word for u32 {
    fn from_f32s(s: &mut [f32]) -> &mut [u32] {
        // SAFETY: same size and alignment, every bit pattern valid for both; the words are only
        // moved, never used as floats.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u32>(), s.len()) }
    }
    fn from_f32s_ref(s: &[f32]) -> &[u32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u32>(), s.len()) }
    }
    fn as_f32s(s: &[u32]) -> &[f32] {
        // SAFETY: as above; the floats are only moved, never computed with (a NaN's payload
        // survives a move).
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) }
    }
    fn as_f32s_mut(s: &mut [u32]) -> &mut [f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) }
    }
}

/// Evicted transforms remembered ([`Cache::buffer`]).
const GHOSTS: usize = 1024;

/// What [`Cache::find`] found: the entry's buffer, room for a new one (and the weights'
/// fingerprint), or neither.
enum Found {
    Hit(Arc<Vec<f32>>),
    Room(Vec<f32>, u64),
    Full,
}

/// A derived form from [`Cache::derived`]: the cache's entry (or the caller's own buffer).
pub(crate) struct Derived {
    buf: Arc<Vec<f32>>,
    len: usize,
}

impl Derived {
    /// Derived into a buffer of its own, not kept.
    pub(crate) fn new(len: usize, derive: impl FnOnce(&mut [f32])) -> Self {
        let mut buf = vec![0.0; len];
        derive(&mut buf);
        Derived {
            buf: Arc::new(buf),
            len,
        }
    }

    pub(crate) fn get(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

/// The cache of one budget (the process has one, [`global`]; tests make their own).
pub(crate) struct Cache {
    budget: usize,
    entries: Vec<Entry>,
    /// Evicted buffers no caller holds, for reuse.
    spare: Vec<Vec<f32>>,
    /// `(tag, fingerprint, last use)` of the most recently evicted transforms: one derived
    /// again was evicted too early, and its reuse distance is known.
    ghosts: std::collections::VecDeque<(Tag, u64, u64)>,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl Cache {
    pub(crate) fn new(budget_bytes: usize) -> Self {
        Cache {
            budget: budget_bytes,
            entries: Vec::new(),
            spare: Vec::new(),
            ghosts: std::collections::VecDeque::new(),
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    fn bytes(&self) -> usize {
        let e: usize = self.entries.iter().map(|e| e.buf.capacity()).sum();
        let s: usize = self.spare.iter().map(Vec::capacity).sum();
        (e + s) * 4
    }

    /// Entries whose tag and fingerprint match (the caller compares their weights outside the
    /// lock).
    fn candidates(&self, tag: Tag, fp: u64) -> Vec<(usize, Arc<Vec<f32>>)> {
        self.entries
            .iter()
            .filter(|e| e.tag == tag && e.fp == fp)
            .map(|e| (e.len, e.buf.clone()))
            .collect()
    }

    /// Counts a lookup, marking the entry holding `hit` (if any) as just used.
    fn record(&mut self, hit: Option<&Arc<Vec<f32>>>) {
        self.clock += 1;
        let clock = self.clock;
        match hit {
            Some(buf) => {
                self.hits += 1;
                if let Some(e) = self.entries.iter_mut().find(|e| Arc::ptr_eq(&e.buf, buf)) {
                    e.gap = Some(clock - e.used);
                    e.used = clock;
                }
            }
            None => self.misses += 1,
        }
    }

    /// A buffer of `n` floats for a new entry (contents unspecified: the caller overwrites
    /// them), with room made for it: least recently used entries evicted into the spares until
    /// it fits beside the others, then the smallest spare large enough reused, the rest of the
    /// spares dropped while over the budget. `None`: the entry is not to be kept.
    ///
    /// An entry in a cycle of reuse — reused before, or derived again after its eviction (a
    /// ghost), and last used less than twice that reuse distance ago — is not evicted for a new
    /// one: when inference cycles through more transforms per image than the budget holds
    /// (ResNet-50 in bf16 at 641 px: 327 MiB against 256), plain LRU evicts each one just
    /// before it is needed again (91 of 455 lookups hit); keeping the cycle's entries that fit
    /// and deriving the rest per call keeps the budget's worth hitting, while a training
    /// step's stale entries (never reused, or last reused long ago) still go.
    ///
    /// A `cheap` entry (one pass to derive again) gets only free room and the others evict
    /// the cheap entries first: where a model's weights outgrow the budget, the transforms stay
    /// and the cheap forms do not push each other out on every call.
    fn buffer(&mut self, n: usize, cheap: bool) -> Option<Vec<f32>> {
        // Bytes the entries hold, kept up to date below (one sum, not one per eviction).
        let mut held = self.entries.iter().map(|e| e.buf.capacity()).sum::<usize>() * 4;
        if cheap && held + n * 4 > self.budget {
            return None;
        }
        let clock = self.clock;
        let cycling = |e: &Entry| !e.cheap && e.gap.is_some_and(|g| clock - e.used <= 2 * g.max(1));
        let evictable: usize = self
            .entries
            .iter()
            .filter(|e| !cycling(e))
            .map(|e| e.buf.capacity() * 4)
            .sum();
        if held - evictable + n * 4 > self.budget {
            return None;
        }
        while held + n * 4 > self.budget {
            let victim = (0..self.entries.len())
                .filter(|&i| !cycling(&self.entries[i]))
                .min_by_key(|&i| {
                    let e = &self.entries[i];
                    (!e.cheap, e.used)
                });
            let Some(i) = victim else {
                break;
            };
            let e = self.entries.swap_remove(i);
            held -= e.buf.capacity() * 4;
            if !e.cheap {
                if self.ghosts.len() == GHOSTS {
                    self.ghosts.pop_front();
                }
                self.ghosts.push_back((e.tag, e.fp, e.used));
            }
            if let Ok(v) = Arc::try_unwrap(e.buf) {
                self.spare.push(v);
            }
        }
        let best = (0..self.spare.len())
            .filter(|&i| self.spare[i].capacity() >= n)
            .min_by_key(|&i| self.spare[i].capacity());
        let mut v = best.map_or_else(Vec::new, |i| self.spare.swap_remove(i));
        while self.bytes() + n.max(v.capacity()) * 4 > self.budget && !self.spare.is_empty() {
            let i = (0..self.spare.len())
                .max_by_key(|&i| self.spare[i].capacity())
                .expect("not empty");
            self.spare.swap_remove(i);
        }
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        Some(v)
    }

    fn insert(&mut self, tag: Tag, fp: u64, len: usize, buf: Arc<Vec<f32>>, cheap: bool) {
        // Derived again after an eviction: in a cycle of reuse from now on (see `buffer`).
        let ghost = self
            .ghosts
            .iter()
            .position(|g| g.0 == tag && g.1 == fp)
            .and_then(|i| self.ghosts.remove(i));
        let gap = ghost.map(|g| self.clock - g.2);
        self.clock += 1;
        self.entries.push(Entry {
            tag,
            fp,
            len,
            buf,
            used: self.clock,
            gap,
            cheap,
        });
    }

    /// `use_(d)` with `d` the `len` floats that `derive` writes from `src` (all of them): from
    /// an entry of equal tag and weights if there is one, else derived now and kept where
    /// [`Cache::buffer`] makes room (else derived into a scratch buffer).
    pub(crate) fn with_derived<R>(
        cache: &Mutex<Cache>,
        tag: Tag,
        src: &[f32],
        len: usize,
        derive: impl FnOnce(&mut [f32]),
        use_: impl FnOnce(&[f32]) -> R,
    ) -> R {
        if Self::over_budget(cache, src, len) {
            return in_scratch(len, derive, use_);
        }
        match Self::find(cache, tag, src, len, false) {
            Found::Hit(buf) => use_(&buf[..len]),
            Found::Room(buf, fp) => {
                use_(Self::keep(cache, tag, fp, src, len, buf, false, derive).get())
            }
            Found::Full => in_scratch(len, derive, use_),
        }
    }

    fn over_budget(cache: &Mutex<Cache>, src: &[f32], len: usize) -> bool {
        let budget = cache.lock().unwrap_or_else(|e| e.into_inner()).budget;
        (len + src.len()) * 4 > budget
    }

    /// The `len` floats that `derive` writes from `src`, as [`Cache::with_derived`], held for as
    /// long as the caller needs them (not kept: derived into a buffer of their own).
    /// `cheap`: `derive` is one pass over the weights (a packing, not a transform), so the
    /// entry is kept only in free room and evicted first ([`Cache::buffer`]).
    pub(crate) fn derived(
        cache: &Mutex<Cache>,
        tag: Tag,
        src: &[f32],
        len: usize,
        cheap: bool,
        derive: impl FnOnce(&mut [f32]),
    ) -> Derived {
        if Self::over_budget(cache, src, len) {
            return Derived::new(len, derive);
        }
        match Self::find(cache, tag, src, len, cheap) {
            Found::Hit(buf) => Derived { buf, len },
            Found::Room(buf, fp) => Self::keep(cache, tag, fp, src, len, buf, cheap, derive),
            Found::Full => Derived::new(len, derive),
        }
    }

    /// The entry of equal tag and weights, or else a buffer for a new one if it is to be kept.
    fn find(cache: &Mutex<Cache>, tag: Tag, src: &[f32], len: usize, cheap: bool) -> Found {
        let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
        let fp = fingerprint(src);
        // The full comparison (bit for bit: -0.0 is not 0.0 to a transform) runs outside the
        // lock and on all threads: a ResNet-50 compares ~100 MB of weights per image.
        let hit = lock()
            .candidates(tag, fp)
            .into_iter()
            .find(|(l, b)| *l == len && same_bits(&b[len..], src))
            .map(|(_, b)| b);
        let mut c = lock();
        c.record(hit.as_ref());
        match hit {
            Some(buf) => Found::Hit(buf),
            None => match c.buffer(len + src.len(), cheap) {
                Some(buf) => Found::Room(buf, fp),
                None => Found::Full,
            },
        }
    }

    /// Derives into `buf` (with the weights' copy after it) and keeps it as a new entry.
    #[allow(clippy::too_many_arguments)]
    fn keep(
        cache: &Mutex<Cache>,
        tag: Tag,
        fp: u64,
        src: &[f32],
        len: usize,
        mut buf: Vec<f32>,
        cheap: bool,
        derive: impl FnOnce(&mut [f32]),
    ) -> Derived {
        derive(&mut buf[..len]);
        buf[len..].copy_from_slice(src);
        let buf = Arc::new(buf);
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        c.insert(tag, fp, len, buf.clone(), cheap);
        Derived { buf, len }
    }

    /// `(hits, misses)` so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

/// `use_(d)` with `d` a scratch buffer of `len` floats that `derive` wrote: a form not kept.
fn in_scratch<R>(len: usize, derive: impl FnOnce(&mut [f32]), use_: impl FnOnce(&[f32]) -> R) -> R {
    crate::par::with_scratch(len, |d: &mut [f32]| {
        derive(d);
        use_(d)
    })
}

/// Whether `a` and `b` hold the same bits, compared in parallel for large slices.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    // As words, so the comparison is one memcmp per chunk.
    let words = |x: &[f32]| {
        // SAFETY: u32 has f32's size and alignment, and every bit pattern is a u32.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u32>(), x.len()) }
    };
    let eq = |(x, y): (&[f32], &[f32])| words(x) == words(y);
    a.len() == b.len()
        && if a.len() <= CHUNK {
            eq((a, b))
        } else {
            a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).all(eq)
        }
}

/// FNV-1a over the length and 64 values spread over `src`: differing weights almost always
/// differ here (a full comparison decides).
fn fingerprint(src: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut mix = |v: u64| {
        h ^= v;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    mix(src.len() as u64);
    let step = src.len().div_ceil(64).max(1);
    for v in src.iter().step_by(step) {
        mix(u64::from(v.to_bits()));
    }
    h
}

/// The process's cache (budget from `RETINANET_TRANSFORM_CACHE_MB`, default
/// [`default_budget_mb`]).
pub(crate) fn global() -> &'static Mutex<Cache> {
    static C: OnceLock<Mutex<Cache>> = OnceLock::new();
    C.get_or_init(|| {
        let mb = std::env::var("RETINANET_TRANSFORM_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or_else(|| default_budget_mb(std::fs::read_to_string("/proc/meminfo").ok()));
        Mutex::new(Cache::new(mb << 20))
    })
}

/// A sixteenth of the memory (`MemTotal` of `/proc/meminfo`), from 128 to 256 MiB; 256 where
/// it is unknown. (ResNet-50's transforms and packings for bf16 inference at 641 px take 327
/// MiB, of which the cycle policy of [`Cache::buffer`] keeps what fits; a budget of 512 made
/// the small model's first ~25 training steps up to 2.5x slower while the cache filled with
/// the stale entries of weights that change every step, 86,000 more page faults, Zen 5.)
fn default_budget_mb(meminfo: Option<String>) -> usize {
    let kib = meminfo.as_deref().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<usize>().ok()
    });
    kib.map_or(256, |k| (k / 1024 / 16).clamp(128, 256))
}

/// `"transformed kernels reused in 40 of 58 calls (cache 180 MiB)"`, or `None` before any.
pub(crate) fn summary() -> Option<String> {
    let c = global().lock().unwrap_or_else(|e| e.into_inner());
    let (hits, misses) = c.counts();
    (hits + misses > 0).then(|| {
        format!(
            "transformed kernels reused in {hits} of {} calls (cache {} MiB)",
            hits + misses,
            c.bytes() >> 20
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: Tag = Tag {
        kind: "test",
        dims: [1, 2, 3, 4],
    };

    /// `d[i] = 2 src[i] + 1`, counting the calls.
    fn derive_into(src: &[f32], calls: &std::cell::Cell<usize>) -> impl FnOnce(&mut [f32]) {
        move |d: &mut [f32]| {
            calls.set(calls.get() + 1);
            for (d, &s) in d.iter_mut().zip(src) {
                *d = 2.0 * s + 1.0;
            }
        }
    }

    fn get(c: &Mutex<Cache>, tag: Tag, src: &[f32], calls: &std::cell::Cell<usize>) -> Vec<f32> {
        Cache::with_derived(
            c,
            tag,
            src,
            src.len(),
            derive_into(src, calls),
            <[f32]>::to_vec,
        )
    }

    /// Cheap entries (packings) take only free room and go first: cycling through more of them
    /// than the budget holds keeps a fixed set (instead of each pushing out the next one needed)
    /// and never pushes out a transform.
    #[test]
    fn cheap_entries_take_free_room_and_go_first() {
        // Each entry: 1,000 derived + 1,000 copied floats = 8,000 bytes; room for 3.
        let c = Mutex::new(Cache::new(3 * 8_000 + 100));
        let calls = std::cell::Cell::new(0);
        let weights: Vec<Vec<f32>> = (0..5)
            .map(|j| (0..1000).map(|i| (i + 1000 * j) as f32).collect())
            .collect();
        let cheap = |w: &[f32]| {
            let want: Vec<f32> = w.iter().map(|&s| 2.0 * s + 1.0).collect();
            let d = Cache::derived(&c, TAG, w, w.len(), true, derive_into(w, &calls));
            assert_eq!(d.get(), &want[..]);
        };
        // A transform first, then four packings cycled twice: the transform and the first two
        // packings stay; packings 2 and 3 are derived on every call.
        get(&c, TAG, &weights[4], &calls);
        for _ in 0..2 {
            for w in &weights[..4] {
                cheap(w);
            }
        }
        assert_eq!(calls.get(), 1 + 4 + 2);
        assert_eq!(c.lock().unwrap().counts(), (2, 7));
        // The transform is still there; a second transform evicts a packing, not it.
        let other = Tag {
            kind: "other",
            ..TAG
        };
        get(&c, other, &weights[0], &calls);
        get(&c, TAG, &weights[4], &calls);
        assert_eq!(calls.get(), 8, "the first transform was kept");
        assert_eq!(c.lock().unwrap().counts(), (3, 8));
    }

    /// Cycling through more transforms than the budget holds (inference, image after image)
    /// keeps the ones that fit hitting instead of evicting each just before its next use; a
    /// new set of weights (the next training step's) still replaces the cycle's entries.
    #[test]
    fn a_cycle_larger_than_the_budget_keeps_what_fits() {
        // Each entry 8,000 bytes (1,000 derived + 1,000 copied floats): room for 3.
        let c = Mutex::new(Cache::new(3 * 8_000 + 100));
        let calls = std::cell::Cell::new(0);
        let ws: Vec<Vec<f32>> = (0..8)
            .map(|j| (0..1000).map(|i| (i + 1000 * j) as f32).collect())
            .collect();
        let pass = |set: &[Vec<f32>]| {
            let before = c.lock().unwrap().counts().0;
            for w in set {
                let want: Vec<f32> = w.iter().map(|&s| 2.0 * s + 1.0).collect();
                assert_eq!(get(&c, TAG, w, &calls), want);
            }
            c.lock().unwrap().counts().0 - before
        };
        // Plain LRU would hit none of 5 in every pass; the first two passes find the cycle.
        let hits: Vec<u64> = (0..4).map(|_| pass(&ws[..5])).collect();
        assert_eq!(hits, [0, 0, 3, 3]);
        assert_eq!(calls.get(), 5 + 5 + 2 + 2);
        assert!(c.lock().unwrap().bytes() <= 3 * 8_000 + 100);
        // New weights: the old cycle's entries go stale and the new set is kept.
        let hits: Vec<u64> = (0..4).map(|_| pass(&ws[5..])).collect();
        assert_eq!(*hits.last().unwrap(), 3, "{hits:?}");
    }

    #[test]
    fn default_budget_follows_the_memory() {
        let mem = |kib: usize| Some(format!("MemFree: 5 kB\nMemTotal:       {kib} kB\n"));
        assert_eq!(default_budget_mb(mem(24 << 20)), 256);
        assert_eq!(default_budget_mb(mem(3 << 20)), 192);
        assert_eq!(default_budget_mb(mem(1 << 20)), 128);
        assert_eq!(default_budget_mb(None), 256);
        assert_eq!(default_budget_mb(Some("MemTotal: lots".into())), 256);
    }

    #[test]
    fn reuses_only_for_equal_weights_and_tag() {
        let c = Mutex::new(Cache::new(1 << 20));
        let calls = std::cell::Cell::new(0);
        let mut w: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let want: Vec<f32> = w.iter().map(|&s| 2.0 * s + 1.0).collect();
        assert_eq!(get(&c, TAG, &w, &calls), want);
        assert_eq!(get(&c, TAG, &w, &calls), want);
        assert_eq!(calls.get(), 1, "the second call reuses the first");
        // A value the fingerprint does not sample (index 1: samples are 16 apart) changes: the
        // full comparison sees it.
        w[1] = -7.0;
        let got = get(&c, TAG, &w, &calls);
        assert_eq!(got[1], -13.0);
        assert_eq!(calls.get(), 2);
        // Same weights, another tag (a flipped kernel, other dims): derived anew.
        let other = Tag {
            kind: "other",
            ..TAG
        };
        get(&c, other, &w, &calls);
        assert_eq!(calls.get(), 3);
        assert_eq!(c.lock().unwrap().counts(), (1, 3));
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        // Room for two entries of 1,000 derived floats + 1,000 weights (8 KB each).
        let c = Mutex::new(Cache::new(20_000));
        let calls = std::cell::Cell::new(0);
        let ws: Vec<Vec<f32>> = (0..3)
            .map(|k| (0..1000).map(|i| (i * (k + 1)) as f32).collect())
            .collect();
        get(&c, TAG, &ws[0], &calls);
        get(&c, TAG, &ws[1], &calls);
        get(&c, TAG, &ws[0], &calls); // hit; ws[1] is now the least recent
        get(&c, TAG, &ws[2], &calls); // evicts ws[1]
        assert_eq!(calls.get(), 3);
        get(&c, TAG, &ws[0], &calls);
        assert_eq!(calls.get(), 3, "ws[0] stayed");
        get(&c, TAG, &ws[1], &calls);
        assert_eq!(calls.get(), 4, "ws[1] was evicted");
        let cache = c.lock().unwrap();
        assert!(cache.bytes() <= 20_000, "{}", cache.bytes());
        // Above the budget nothing is kept, and the result is still right.
        drop(cache);
        let big: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        let got = get(&c, TAG, &big, &calls);
        assert_eq!(got[9_999], 19_999.0);
        get(&c, TAG, &big, &calls);
        assert_eq!(calls.get(), 6);
    }

    #[test]
    fn compares_bits_not_values() {
        let c = Mutex::new(Cache::new(1 << 22));
        let calls = std::cell::Cell::new(0);
        // Large enough for the parallel comparison; -0.0 == 0.0 as floats, not as bits.
        let mut w = vec![0.0f32; 100_000];
        get(&c, TAG, &w, &calls);
        w[50_001] = -0.0;
        let got = get(&c, TAG, &w, &calls);
        assert_eq!(calls.get(), 2, "-0.0 must not match 0.0");
        assert_eq!(got[50_001].to_bits(), 1.0f32.to_bits());
        get(&c, TAG, &w, &calls);
        assert_eq!(calls.get(), 2, "the same bits match");
        // A NaN matches itself bit for bit.
        w[7] = f32::NAN;
        get(&c, TAG, &w, &calls);
        get(&c, TAG, &w, &calls);
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn zero_budget_derives_every_time() {
        let c = Mutex::new(Cache::new(0));
        let calls = std::cell::Cell::new(0);
        let w = vec![1.5f32; 100];
        assert_eq!(get(&c, TAG, &w, &calls), vec![4.0; 100]);
        get(&c, TAG, &w, &calls);
        assert_eq!(calls.get(), 2);
    }
}
