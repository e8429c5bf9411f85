//! Process-level performance settings for CPU training: the worker thread count and the
//! allocator's behaviour.

/// Keeps glibc's malloc from returning freed memory to the OS after every op and from serving
/// large tensors with fresh (zero-filled, page-faulting) mmaps; measured at about 1.5× faster
/// training steps in dfdx. One arena for every thread: [`trim_allocator`] can give back the
/// free top of the main arena but not of the others, so with per-thread arenas a burst of
/// large buffers on other threads (decoded images) would stay resident; one arena measured no
/// slower for the `tiny` step (4.82/4.74 s against 4.72/4.88 s, alternated). A no-op on other C
/// libraries. Call once, early, before other threads start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before heavy allocation.
    unsafe {
        const M_TRIM_THRESHOLD: libc::c_int = -1;
        const M_TOP_PAD: libc::c_int = -2;
        const M_MMAP_THRESHOLD: libc::c_int = -3;
        const M_MMAP_MAX: libc::c_int = -4;
        const M_ARENA_MAX: libc::c_int = -8;
        // glibc refuses thresholds above 32 MiB, and a ResNet step's im2col buffers are larger:
        // serving no allocation by mmap at all keeps them in the reused heap too.
        libc::mallopt(M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(M_MMAP_MAX, 0);
        libc::mallopt(M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(M_TOP_PAD, 256 << 20);
        libc::mallopt(M_ARENA_MAX, 1);
    }
}

/// Gives memory that [`tune_allocator`] keeps in the heap back to the OS (glibc's
/// `malloc_trim`, every arena): for a process that trains and also has bursts of other work,
/// called when such a burst is over. Returns whether anything was released; a no-op (false) on
/// other C libraries.
pub fn trim_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's arenas to the OS.
    unsafe {
        libc::malloc_trim(0) != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// A pool of `threads` workers (0 = one per core) for dfdx's CPU matrix products: run the
/// training or embedding inside `pool.install(|| ...)`.
///
/// # Errors
/// The pool could not be created.
pub fn thread_pool(threads: usize) -> crate::Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("plip-cpu-{i}"))
        .build()
        .map_err(|e| crate::Error::Config(format!("thread pool of {threads}: {e}")))
}

/// Runs `f` on `pool` (so dfdx's CPU products use its threads) and waits for it — also for work
/// on a CUDA model: dfdx 0.13's `Cuda` device is not `Send` only because cudarc 0.9's stream
/// handle lacks the marker.
///
/// Sound because `install` blocks the calling thread until `f` has finished on one pool thread:
/// `f` and what it borrows are used by one thread at a time, never concurrently; and cudarc
/// binds the device's context to the calling thread before every driver call, and CUDA streams
/// may be used from any thread of the process.
pub fn install<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R) -> R {
    struct Handoff<F>(F);
    // SAFETY: see above — a handoff to one thread while the owner waits, not shared access.
    unsafe impl<F> Send for Handoff<F> {}
    impl<F: FnOnce() -> R, R> Handoff<F> {
        fn call(self) -> R {
            (self.0)()
        }
    }
    let f = Handoff(f);
    pool.install(move || f.call())
}
