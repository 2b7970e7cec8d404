//! Process-wide policy: the allocator keeps freed memory, and how many threads a run uses.

use crate::experiment::Experiment;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h` of mimalloc v3; libmimalloc-sys 0.1.49
/// names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the memory mimalloc frees for reuse instead of handing it back to the OS 10 ms later
/// (its default). An image model's training step frees and allocates the same large buffers
/// every step; each hand-back cost a page fault and a cleared page per 4 KiB on reuse (19% of a
/// U-Net step, 15,000 faults a run of the bench, 370 without). Peak memory is unchanged.
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option, which mimalloc allows at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Whether RAYON_NUM_THREADS came from the user (then it is kept as it is).
static THREADS_SET_BY_USER: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// An image run on its own uses every core: its convolutions split the batch over threads,
/// with the same bits for any count (the lesson U-Net: 3.5 -> 5.4 steps/s on 2 cores). 2-D runs
/// stay on one thread, where their small models run fastest, unless RAYON_NUM_THREADS says
/// otherwise.
pub fn threads_for(exp: &Experiment) {
    if exp.dim() > 2 && !THREADS_SET_BY_USER.load(std::sync::atomic::Ordering::Relaxed) {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Fails only if the pool already exists; the run then keeps one thread.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// Runs `f` on a worker thread of the current rayon pool (the global one, unless the caller
/// already is a worker, as in a sweep). The CPU ops' parallel loops then run from that worker:
/// on one thread inline, on more split by work stealing. Called from the main thread instead,
/// every loop hands its work to a sleeping worker and puts the main thread to sleep until it
/// is done, twice a context switch per op (a U-Net's training step on one thread: 131 -> 121
/// ms). The work and its bits are the same.
///
/// `f` must not wait on another thread that runs ops on the same pool (a prefetching pairing
/// worker): the waiting worker may hold part of that thread's parallel loop, which then never
/// ends.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Sets the thread policy before anything runs: small models run fastest on one candle
/// thread, and sweeps parallelise across runs instead (their rayon pool is sized explicitly),
/// unless RAYON_NUM_THREADS says otherwise.
pub fn init() {
    keep_freed_memory();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    } else {
        THREADS_SET_BY_USER.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
