//! Process-wide settings every binary applies first thing.

/// Fixes the thread count and tunes the allocator; call at the very start of `main`, before
/// any thread exists.
///
/// - `RAYON_NUM_THREADS` (if unset) is set to the machine's parallelism: candle otherwise asks
///   the OS for the CPU count on every parallel operation (a read of `/proc/cpuinfo` each time,
///   which made training steps 2.5x slower here).
/// - [`retinanet_dataset::tune_allocator`]: freed batch-sized blocks are reused instead of
///   mapped afresh (page faults cost more than decoding on small VMs).
pub fn init_runtime() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: called at program start, before any other thread reads the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    retinanet_dataset::tune_allocator();
}
