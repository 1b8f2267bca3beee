//! A seeded, parallel, prefetching batch loader shared by detection and classification.
//!
//! A background thread builds batches (items decoded and augmented in parallel with rayon) and
//! hands them over through a bounded channel, so the next `prefetch` batches are being prepared
//! while the model works on the current one. Every random choice comes from a per-item RNG
//! seeded with `(seed, epoch, dataset index)`, the shuffle from `(seed, epoch)` and a choice
//! made once per batch (its size in multi-scale training) from `(seed, epoch, batch index)`, so
//! results do not depend on thread scheduling, and a run resumed at `(epoch, batch)` or a rank
//! of a data-parallel run sees the same batches.
//!
//! Items of one batch may differ in size (whole-image evaluation): the batch is then a canvas
//! of the largest height and width, each item at its top-left corner with zeros around it, and
//! the batch says each item's size.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::error::{DatasetError, Result};

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Items per batch.
    pub batch_size: usize,
    /// Shuffle the items every epoch (seeded by `(seed, epoch)`).
    pub shuffle: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// Drop the last, incomplete batch of an epoch.
    pub drop_last: bool,
    /// How many finished batches may wait ahead of the consumer.
    pub prefetch: usize,
    /// Skip items whose image cannot be read instead of failing: each file is reported once
    /// ([`Loader::take_new_skips`], [`Loader::skip_summary`]) and counted. A full epoch in which
    /// no item at all can be read is an error all the same.
    pub skip_bad: bool,
    /// Data parallelism: this loader yields share `shard_rank` of `shard_count` of every batch
    /// (`batch_size` is the global batch, which the shards divide evenly when `drop_last`). Every
    /// rank draws the same epoch order and per-item randomness, so the shards of a batch are
    /// disjoint, cover it, and hold exactly what one loader with the whole batch would. A batch
    /// whose share is all skipped is yielded empty, not dropped, so the ranks stay in step.
    pub shard_rank: usize,
    /// Number of shards (ranks); 1 for one process.
    pub shard_count: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 16,
            shuffle: true,
            seed: 0,
            drop_last: false,
            prefetch: 2,
            skip_bad: false,
            shard_rank: 0,
            shard_count: 1,
        }
    }
}

impl LoaderConfig {
    /// A config with this batch size and seed, the other fields at their defaults.
    pub fn new(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            seed,
            ..Default::default()
        }
    }
}

/// Where batches come from: implemented for detection and classification datasets.
///
/// Items write their image data (planar RGB, `[3, H, W]`) straight into their slot of the batch
/// buffer (no per-item image allocation, no copy when collating).
pub trait ItemSource: Send + Sync + 'static {
    /// What an item returns besides its image data (boxes, labels, ...).
    type Meta: Send;
    /// A collated batch.
    type Batch: Send + 'static;
    /// Number of items.
    fn len(&self) -> usize;
    /// True when there is no item.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(H, W)` of item `index`'s image data in batch `batch` of `epoch` of a loader seeded
    /// with `seed` (a size chosen per batch must be a function of these alone). An error is
    /// treated as a load error of the item.
    fn item_size(
        &self,
        index: usize,
        seed: u64,
        epoch: usize,
        batch: usize,
    ) -> Result<(usize, usize)>;
    /// Loads and transforms item `index` at `size` (from [`ItemSource::item_size`]) with its
    /// own RNG into `out` (`3 * H * W` values).
    fn load_into(
        &self,
        index: usize,
        size: (usize, usize),
        rng: &mut StdRng,
        out: &mut [f32],
    ) -> Result<Self::Meta>;
    /// The file item `index` is read from, for naming it when it is skipped.
    fn item_path(&self, _index: usize) -> Option<PathBuf> {
        None
    }
    /// Items already known to be unusable before loading starts (e.g. images found missing
    /// when the dataset was opened): the loader reports them like its own skips.
    fn initial_skips(&self) -> Vec<Skip> {
        Vec::new()
    }
    /// Builds a batch from the image data of `metas.len()` items (in order, each on a
    /// `[3, canvas.0, canvas.1]` slot, top-left) and their metadata with their dataset indices
    /// and sizes.
    fn collate(
        &self,
        data: Vec<f32>,
        canvas: (usize, usize),
        metas: Vec<ItemMeta<Self::Meta>>,
        epoch: usize,
        batch: usize,
    ) -> Result<Self::Batch>;
}

/// One loaded item as [`ItemSource::collate`] gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemMeta<M> {
    /// The dataset index.
    pub index: usize,
    /// `(H, W)` of its image data on the batch's canvas.
    pub size: (usize, usize),
    /// What the source returned.
    pub meta: M,
}

/// Makes glibc's `malloc` keep freed large blocks for reuse instead of unmapping them.
///
/// Batches at training sizes are tens of megabytes (16 x 3 x 641 x 641 f32 = 79 MB). glibc
/// serves blocks above 32 MB with a fresh `mmap` each time and unmaps them on free, so every
/// batch (and every large activation of the model) pays for page faults on all of its pages;
/// on virtual machines that can cost more than decoding and augmenting the images. This call
/// (`mallopt(M_MMAP_MAX, 0)`, a large `M_TRIM_THRESHOLD` and one arena, since batches are
/// allocated on the loader thread and freed on the consumer's) makes such blocks come from the
/// heap, where freed memory is reused. It affects the whole process, so it is opt-in: call it
/// once at program start. Returns `true` when applied (Linux with glibc), `false` elsewhere.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_MAX: std::ffi::c_int = -4;
        const M_ARENA_MAX: std::ffi::c_int = -8;
        // SAFETY: mallopt only changes allocator tunables; the parameters are valid for glibc.
        unsafe {
            mallopt(M_MMAP_MAX, 0) == 1
                && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
                && mallopt(M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// SplitMix64 finaliser: decorrelates nearby seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The RNG of item `index` in `epoch`: a pure function of `(seed, epoch, index)`.
pub fn item_rng(seed: u64, epoch: usize, index: usize) -> StdRng {
    StdRng::seed_from_u64(mix(mix(mix(seed) ^ epoch as u64) ^ index as u64))
}

/// The RNG of batch `batch` of `epoch`, for choices made once per batch (its size in
/// multi-scale training): a pure function of `(seed, epoch, batch)`, independent of the items'.
pub fn batch_rng(seed: u64, epoch: usize, batch: usize) -> StdRng {
    StdRng::seed_from_u64(mix(
        mix(mix(seed ^ 0x4241_5443_4853_495a) ^ epoch as u64) ^ batch as u64
    ))
}

/// The order of the items in `epoch`: a seeded shuffle, or `0..len`.
pub fn epoch_order(len: usize, shuffle: bool, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        use rand::seq::SliceRandom;
        let mut rng = StdRng::seed_from_u64(mix(mix(seed ^ 0x5348_5546_464c_4521) ^ epoch as u64));
        order.shuffle(&mut rng);
    }
    order
}

/// A file skipped as unreadable (with `skip_bad`), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// The file.
    pub path: PathBuf,
    /// What was wrong with it (the error message).
    pub reason: String,
}

/// Items that could not be loaded and were skipped (with `skip_bad`).
#[derive(Debug, Default)]
struct SkipLog {
    state: Mutex<SkipState>,
    /// Every skip, counting repeats across epochs.
    count: AtomicUsize,
}

#[derive(Debug, Default)]
struct SkipState {
    /// Each skipped file once, in the order first met.
    files: Vec<Skip>,
    seen: HashSet<PathBuf>,
    /// How many of `files` [`Loader::take_new_skips`] has handed out.
    taken: usize,
    /// Dataset index -> error message (first occurrence).
    items: BTreeMap<usize, String>,
}

impl SkipLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, SkipState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, index: Option<usize>, skip: Skip, message: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(i) = index {
            st.items.entry(i).or_insert(message);
        }
        if st.seen.insert(skip.path.clone()) {
            st.files.push(skip);
        }
    }
}

/// A batch loader over an [`ItemSource`]. See the module documentation.
pub struct Loader<S: ItemSource> {
    source: Arc<S>,
    config: LoaderConfig,
    skips: Arc<SkipLog>,
}

impl<S: ItemSource> Loader<S> {
    /// A loader over `source`. Errors on an empty source or a zero batch size.
    pub fn with_source(source: S, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(DatasetError::Invalid(
                "batch size must be at least 1".into(),
            ));
        }
        if source.is_empty() {
            return Err(DatasetError::Empty(
                "the loader's dataset has no item".into(),
            ));
        }
        if config.shard_count == 0 || config.shard_rank >= config.shard_count {
            return Err(DatasetError::Invalid(format!(
                "shard {} of {} does not exist",
                config.shard_rank, config.shard_count
            )));
        }
        if config.drop_last && !config.batch_size.is_multiple_of(config.shard_count) {
            return Err(DatasetError::Invalid(format!(
                "batch size {} cannot be split evenly over {} shards",
                config.batch_size, config.shard_count
            )));
        }
        if config.drop_last && source.len() < config.batch_size {
            return Err(DatasetError::Invalid(format!(
                "drop_last with batch size {} leaves no batch of {} items",
                config.batch_size,
                source.len()
            )));
        }
        let skips = SkipLog::default();
        for skip in source.initial_skips() {
            let message = skip.reason.clone();
            skips.record(None, skip, message);
        }
        Ok(Loader {
            source: Arc::new(source),
            config,
            skips: Arc::new(skips),
        })
    }

    /// The item source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.source.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The dataset indices of batch `batch` of `epoch` (before any skipping): this loader's
    /// shard of it.
    pub fn batch_indices(&self, epoch: usize, batch: usize) -> Vec<usize> {
        let order = epoch_order(
            self.source.len(),
            self.config.shuffle,
            self.config.seed,
            epoch,
        );
        shard_of(&order, &self.config, batch).to_vec()
    }

    /// Builds one batch synchronously (no background thread): batch `batch` of `epoch`.
    pub fn batch(&self, epoch: usize, batch: usize) -> Result<S::Batch> {
        let indices = self.batch_indices(epoch, batch);
        build_batch(
            &*self.source,
            &self.config,
            &self.skips,
            &indices,
            epoch,
            batch,
        )?
        .ok_or_else(|| {
            DatasetError::Empty(format!(
                "every item of batch {batch} of epoch {epoch} was skipped"
            ))
        })
    }

    /// The batches of one epoch, prepared in the background.
    pub fn epoch(&self, epoch: usize) -> Batches<S::Batch> {
        self.spawn(epoch, 0, Some(epoch + 1))
    }

    /// Every batch from batch `batch` of epoch `epoch` on, epoch after epoch, without end (for
    /// resuming: the batches are the same as in an uninterrupted run). Each batch knows its
    /// epoch and index.
    pub fn from_position(&self, epoch: usize, batch: usize) -> Batches<S::Batch> {
        self.spawn(epoch, batch, None)
    }

    /// The rest of epoch `epoch` from batch `batch` on (for resuming within an epoch): the
    /// same batches as in an uninterrupted run, ending with the epoch.
    pub fn epoch_from(&self, epoch: usize, batch: usize) -> Batches<S::Batch> {
        self.spawn(epoch, batch, Some(epoch + 1))
    }

    /// Items skipped so far as unreadable (with `skip_bad`): `(dataset index, error)`, each
    /// item once. Files dropped before loading (see [`ItemSource::initial_skips`]) are in
    /// [`Loader::skips`] only.
    pub fn skipped(&self) -> Vec<(usize, String)> {
        let st = self.skips.lock();
        st.items.iter().map(|(&i, m)| (i, m.clone())).collect()
    }

    /// Every file skipped so far, each once, in the order first met.
    pub fn skips(&self) -> Vec<Skip> {
        self.skips.lock().files.clone()
    }

    /// The files skipped since the last call (each file once over the loader's life, however
    /// many epochs skip it): for logging them as they happen.
    pub fn take_new_skips(&self) -> Vec<Skip> {
        let mut st = self.skips.lock();
        let new = st.files[st.taken..].to_vec();
        st.taken = st.files.len();
        new
    }

    /// A report of the skipped files for the end of a run (`None` when nothing was skipped):
    /// how many, and each file with its error.
    pub fn skip_summary(&self) -> Option<String> {
        let files = self.skips();
        if files.is_empty() {
            return None;
        }
        let mut s = format!(
            "{} unreadable file(s) skipped ({} skips in all):",
            files.len(),
            self.skipped_count()
        );
        for f in files {
            s.push_str("\n  ");
            s.push_str(&f.reason);
        }
        Some(s)
    }

    /// Number of skips so far, counting an item again in every epoch it was skipped (and each
    /// file dropped before loading once).
    pub fn skipped_count(&self) -> usize {
        self.skips.count.load(Ordering::Relaxed)
    }

    /// Number of distinct files skipped so far.
    pub fn skipped_files(&self) -> usize {
        self.skips.lock().files.len()
    }

    fn spawn(&self, epoch: usize, batch: usize, end_epoch: Option<usize>) -> Batches<S::Batch> {
        let (tx, rx) = std::sync::mpsc::sync_channel(self.config.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let source = Arc::clone(&self.source);
        let skips = Arc::clone(&self.skips);
        let config = self.config;
        let nb = self.batches_per_epoch();
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("retinanet-loader".into())
            .spawn(move || {
                producer(
                    source, config, skips, nb, epoch, batch, end_epoch, tx, stop2,
                )
            })
            .expect("spawn the loader thread");
        Batches {
            rx: Some(rx),
            handle: Some(handle),
            stop,
        }
    }
}

/// This loader's shard of batch `batch` of an epoch in `order`: contiguous, the shards' sizes
/// differing by at most one (only an incomplete last batch does not split evenly).
fn shard_of<'a>(order: &'a [usize], config: &LoaderConfig, batch: usize) -> &'a [usize] {
    let b = config.batch_size;
    let start = (batch * b).min(order.len());
    let whole = &order[start..(start + b).min(order.len())];
    let (r, n) = (config.shard_rank, config.shard_count);
    &whole[whole.len() * r / n..whole.len() * (r + 1) / n]
}

fn build_batch<S: ItemSource>(
    source: &S,
    config: &LoaderConfig,
    skips: &SkipLog,
    indices: &[usize],
    epoch: usize,
    batch: usize,
) -> Result<Option<S::Batch>> {
    let sizes: Vec<Result<(usize, usize)>> = indices
        .par_iter()
        .map(|&i| source.item_size(i, config.seed, epoch, batch))
        .collect();
    // A placeholder canvas when no size is known, so every item still reports its error.
    let canvas = sizes
        .iter()
        .flatten()
        .fold((0, 0), |c, s| (c.0.max(s.0), c.1.max(s.1)));
    let canvas = if canvas.0 * canvas.1 == 0 {
        (1, 1)
    } else {
        canvas
    };
    let len = 3 * canvas.0 * canvas.1;
    let mut data = vec![0f32; len * indices.len()];
    let loaded: Vec<Result<(usize, usize, S::Meta)>> = data
        .par_chunks_mut(len.max(1))
        .zip(indices.par_iter().zip(sizes))
        .map(|(out, (&i, size))| {
            let (h, w) = size?;
            let meta = source.load_into(
                i,
                (h, w),
                &mut item_rng(config.seed, epoch, i),
                &mut out[..3 * h * w],
            )?;
            if (h, w) != canvas {
                spread_on_canvas(out, (h, w), canvas);
            }
            Ok((h, w, meta))
        })
        .collect();
    let mut items = Vec::with_capacity(loaded.len());
    for (k, (r, &i)) in loaded.into_iter().zip(indices).enumerate() {
        match r {
            Ok((h, w, meta)) => {
                // Close the gaps left by skipped items.
                let slot = items.len();
                if slot != k {
                    data.copy_within(k * len..(k + 1) * len, slot * len);
                }
                items.push(ItemMeta {
                    index: i,
                    size: (h, w),
                    meta,
                });
            }
            Err(e)
                if config.skip_bad
                    && matches!(e, DatasetError::Image { .. } | DatasetError::Io { .. }) =>
            {
                let path = e
                    .path()
                    .map(PathBuf::from)
                    .or_else(|| source.item_path(i))
                    .unwrap_or_else(|| PathBuf::from(format!("item #{i}")));
                let message = e.to_string();
                let skip = Skip {
                    path,
                    reason: message.clone(),
                };
                skips.record(Some(i), skip, message);
            }
            Err(e) => return Err(e),
        }
    }
    data.truncate(items.len() * len);
    if items.is_empty() && config.shard_count == 1 {
        return Ok(None);
    }
    // A canvas as large as the items that were read (skipped ones may have been larger).
    let tight = items
        .iter()
        .fold((0, 0), |c, m| (c.0.max(m.size.0), c.1.max(m.size.1)));
    if tight != canvas && !items.is_empty() {
        data = shrink_canvas(&data, items.len(), canvas, tight);
        return source.collate(data, tight, items, epoch, batch).map(Some);
    }
    source.collate(data, canvas, items, epoch, batch).map(Some)
}

/// Moves a planar `[3, h, w]` image written at the start of `slot` to its place on a
/// `[3, H, W]` canvas (top-left, zeros around it), in place.
fn spread_on_canvas(slot: &mut [f32], (h, w): (usize, usize), (ch, cw): (usize, usize)) {
    // Rows move to higher offsets only: going from the last row back never overwrites a row
    // not yet moved.
    for c in (0..3).rev() {
        for y in (0..h).rev() {
            let src = (c * h + y) * w;
            let dst = (c * ch + y) * cw;
            slot.copy_within(src..src + w, dst);
            slot[dst + w..dst + cw].fill(0.0);
        }
        slot[(c * ch + h) * cw..(c + 1) * ch * cw].fill(0.0);
    }
}

/// The batch `data` of `n` items on a `from` canvas, cut to the smaller `to` canvas.
fn shrink_canvas(data: &[f32], n: usize, from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * 3 * to.0 * to.1);
    for item in data.chunks_exact(3 * from.0 * from.1) {
        for plane in item.chunks_exact(from.0 * from.1) {
            for row in plane.chunks_exact(from.1).take(to.0) {
                out.extend_from_slice(&row[..to.1]);
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn producer<S: ItemSource>(
    source: Arc<S>,
    config: LoaderConfig,
    skips: Arc<SkipLog>,
    batches_per_epoch: usize,
    mut epoch: usize,
    mut batch: usize,
    end_epoch: Option<usize>,
    tx: SyncSender<Result<S::Batch>>,
    stop: Arc<AtomicBool>,
) {
    loop {
        if end_epoch.is_some_and(|e| epoch >= e) {
            return;
        }
        let order = epoch_order(source.len(), config.shuffle, config.seed, epoch);
        // An epoch read from its start that yields no batch means nothing is readable: with
        // `skip_bad` that would otherwise loop over empty epochs forever.
        let whole_epoch = batch == 0;
        let mut built = 0usize;
        while batch < batches_per_epoch {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let indices = shard_of(&order, &config, batch);
            let result = build_batch(&*source, &config, &skips, indices, epoch, batch);
            let failed = result.is_err();
            let msg = match result {
                Ok(None) => {
                    batch += 1;
                    continue;
                }
                Ok(Some(x)) => {
                    built += 1;
                    Ok(x)
                }
                Err(e) => Err(e),
            };
            if !send(&tx, &stop, msg) || failed {
                return;
            }
            batch += 1;
        }
        if whole_epoch && built == 0 {
            let st = skips.lock();
            let first = st
                .files
                .first()
                .map(|f| format!("; the first: {}", f.reason))
                .unwrap_or_default();
            let e = DatasetError::Empty(format!(
                "no item of epoch {epoch} could be read: all {} items were skipped as unreadable ({} files{first})",
                (batches_per_epoch * config.batch_size).min(order.len()),
                st.files.len()
            ));
            drop(st);
            send(&tx, &stop, Err(e));
            return;
        }
        batch = 0;
        epoch += 1;
    }
}

/// Hands `msg` to the consumer; false when the consumer is gone. Polls so that a dropped
/// consumer (stop flag) ends the thread promptly.
fn send<B>(tx: &SyncSender<Result<B>>, stop: &AtomicBool, msg: Result<B>) -> bool {
    let mut msg = Some(msg);
    loop {
        match tx.try_send(msg.take().expect("message")) {
            Ok(()) => return true,
            Err(TrySendError::Full(m)) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                msg = Some(m);
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
}

/// Iterator over batches prepared in the background. Dropping it stops the thread.
pub struct Batches<B: Send + 'static> {
    rx: Option<Receiver<Result<B>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl<B: Send + 'static> Iterator for Batches<B> {
    type Item = Result<B>;
    fn next(&mut self) -> Option<Result<B>> {
        match self.rx.as_ref()?.recv() {
            Ok(item) => Some(item),
            Err(_) => {
                // The producer is gone: normally the end of the batches, but a panic in it (a
                // bug, not bad data) must not pass for a short epoch.
                self.rx = None;
                let panicked = self.handle.take().map(|h| h.join());
                match panicked {
                    Some(Err(payload)) => {
                        let msg = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Some(Err(DatasetError::Invalid(format!(
                            "the loader thread panicked: {msg}"
                        ))))
                    }
                    _ => None,
                }
            }
        }
    }
}

impl<B: Send + 'static> Drop for Batches<B> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panicky;
    impl ItemSource for Panicky {
        type Meta = ();
        type Batch = usize;
        fn len(&self) -> usize {
            4
        }
        fn item_size(&self, _: usize, _: u64, _: usize, _: usize) -> Result<(usize, usize)> {
            Ok((1, 1))
        }
        fn load_into(
            &self,
            index: usize,
            _: (usize, usize),
            _: &mut StdRng,
            out: &mut [f32],
        ) -> Result<()> {
            assert!(index != 3, "item three is broken");
            out[0] = index as f32;
            Ok(())
        }
        fn collate(
            &self,
            data: Vec<f32>,
            _: (usize, usize),
            _: Vec<ItemMeta<()>>,
            _: usize,
            _: usize,
        ) -> Result<usize> {
            Ok(data.len() / 3)
        }
    }

    #[test]
    fn a_panicking_producer_is_an_error_not_a_short_epoch() {
        let cfg = LoaderConfig {
            shuffle: false,
            ..LoaderConfig::new(2, 0)
        };
        let loader = Loader::with_source(Panicky, cfg).unwrap();
        let out: Vec<_> = loader.epoch(0).collect();
        assert_eq!(out.len(), 2);
        assert_eq!(*out[0].as_ref().unwrap(), 2);
        let e = out[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("item three is broken"), "{e}");
    }

    #[test]
    fn items_spread_on_a_canvas_and_back() {
        // Two planes of 2x3 values on a 3x4 canvas: each row in place, zeros around.
        let mut slot = vec![9f32; 3 * 3 * 4];
        for (i, v) in slot[..18].iter_mut().enumerate() {
            *v = i as f32 + 1.0;
        }
        spread_on_canvas(&mut slot, (2, 3), (3, 4));
        let plane0 = [1., 2., 3., 0., 4., 5., 6., 0., 0., 0., 0., 0.];
        assert_eq!(&slot[..12], &plane0);
        assert_eq!(&slot[12..16], &[7., 8., 9., 0.]);
        assert_eq!(&slot[32..36], &[0.; 4]);
        assert_eq!(
            shrink_canvas(&slot, 1, (3, 4), (2, 3))[..6],
            [1., 2., 3., 4., 5., 6.]
        );
        assert_eq!(shrink_canvas(&slot, 1, (3, 4), (2, 3)).len(), 18);
    }

    #[test]
    fn allocator_tuning_applies_on_glibc() {
        assert_eq!(
            tune_allocator(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
        // Large blocks still work afterwards.
        let v = vec![1f32; 40 << 20];
        assert_eq!(v[v.len() - 1], 1.0);
    }

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(100, true, 7, 3);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, true, 7, 3));
        assert_ne!(a, epoch_order(100, true, 7, 4));
        assert_ne!(a, epoch_order(100, true, 8, 3));
        assert_eq!(epoch_order(5, false, 7, 3), vec![0, 1, 2, 3, 4]);
    }
}
