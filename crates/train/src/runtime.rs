//! Process-wide settings every binary applies first thing.

/// Fixes the thread counts and tunes the allocator; call at the very start of `main`, before
/// any thread exists.
///
/// [`retinanet_kernels::configure_runtime`]: `RAYON_NUM_THREADS` (if unset) to the CPUs this
/// process may use — candle otherwise parses `/proc/cpuinfo` on every matrix product — and
/// `CANDLE_NUM_THREADS` to 1 (candle's element-wise pool spins while waiting and takes cores from
/// the convolutions); glibc's allocator reuses freed batch-sized blocks instead of mapping them
/// afresh (page faults cost more than decoding on small VMs).
pub fn init_runtime() {
    retinanet_kernels::configure_runtime();
}

/// [`retinanet_kernels::check_settings`]: a mistyped `RAYON_NUM_THREADS`, `RETINANET_ISA`,
/// or `RETINANET_TRANSFORM_CACHE_MB` is an error naming it and its value.
pub fn check_settings() -> anyhow::Result<()> {
    retinanet_kernels::check_settings().map_err(anyhow::Error::msg)
}
