//! The CPU engine's worker threads: a pool that spins between the parallel regions of a step and
//! parks when the engine goes idle (llama.cpp's threadpool does the same).
//!
//! A decoder step is about 120 short parallel regions (4 projections and attention per layer).
//! A pool whose workers sleep between them (rayon's) pays a futex wake-up and a context switch
//! per region: a quarter of a Q4_1 decode step on this 2-core machine went to the scheduler. Here
//! the calling thread works too, idle workers spin for [`SPIN`] before parking, and a job is
//! announced by bumping an epoch that spinning workers watch.
//!
//! Jobs are index ranges `0..count`, claimed one index at a time from a shared counter, so the
//! load balances itself; what a task computes must not depend on which thread runs it (every
//! kernel here writes disjoint outputs with fixed arithmetic). A job submitted while another runs
//! (a second engine thread, or a task that parallelizes inside) runs on the caller's thread.
//!
//! In the threaded wasm build there is no `std::thread::spawn`: the JavaScript side starts Web
//! Workers on the module's shared memory, and each enters [`serve_as_worker`]. The submitting
//! thread must itself be a worker there (a page's main thread may not block on a lock).

use std::any::Any;
use std::panic::AssertUnwindSafe;
#[cfg(target_arch = "wasm32")]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How long an idle worker spins before it parks: longer than the gap between two regions of a
/// step, far shorter than the gap between requests.
const SPIN: Duration = Duration::from_millis(2);

/// Whether this build starts its workers itself (`std::thread`) or is given them (threaded wasm).
const SPAWNS_THREADS: bool = !cfg!(target_arch = "wasm32");

/// A job's tasks, claimed by index. `f` is erased to `'static` but only called for an index
/// below `count`, and the submitter waits until every such call has returned (`done == count`),
/// so it is never called after the closure it points to is gone.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    count: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// The first panic of a task: caught (so the task still counts as done and nothing waits
    /// forever), then resumed on the submitting thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `f` points to a `Sync` closure that outlives every call made through it (see `Job`).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Runs tasks until none is left to claim.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return;
            }
            // SAFETY: i < count, so the submitter is still waiting and `f` is alive.
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| unsafe { (*self.f)(i) }));
            if let Err(p) = run {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Shared {
    /// Bumped when a job is published.
    epoch: AtomicU64,
    current: Mutex<Option<Arc<Job>>>,
    /// Workers parked on `wake`.
    parked: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

pub(crate) struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    /// Held by the thread whose job is running.
    submit: Mutex<()>,
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            current: Mutex::new(None),
            parked: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 1;
        for i in 1..threads {
            if !SPAWNS_THREADS {
                // The workers arrive through `serve_as_worker`; until they do, the submitting
                // thread runs every task itself.
                started = threads;
                break;
            }
            let shared = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("twinfer-cpu-{i}")).spawn(move || worker(&shared));
            if spawned.is_ok() {
                started += 1;
            }
        }
        Self { threads: started, shared, submit: Mutex::new(()) }
    }

    /// Calls `f(i)` for every `i` in `0..count`, on this thread and the workers.
    pub fn for_each(&self, count: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.submit.try_lock() {
            Ok(g) if self.threads > 1 && count > 1 => g,
            _ => return (0..count).for_each(f),
        };
        // SAFETY: erasing the lifetime is sound because this function returns only after every
        // call through the pointer has returned (see `Job`).
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job =
            Arc::new(Job { f, count, next: AtomicUsize::new(0), done: AtomicUsize::new(0), panic: Mutex::new(None) });
        *self.shared.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) > 0 {
            let _sleep = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        job.work();
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < count {
            // wasm aborts on panic: a worker that panicked never finishes its task.
            #[cfg(target_arch = "wasm32")]
            if WORKER_PANICKED.load(Ordering::SeqCst) {
                panic!("a CPU pool worker panicked (a bug in twinfer), so its task will never finish");
            }
            // A worker holding a claimed task may have been descheduled: spin, then yield.
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *self.shared.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        drop(guard);
        if let Some(p) = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::panic::resume_unwind(p);
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn worker(shared: &Shared) -> ! {
    // One behind, so that the first look takes the job already running, if any: a worker that
    // arrives late (a Web Worker starting up) joins it instead of waiting for the next.
    let mut seen = shared.epoch.load(Ordering::SeqCst).wrapping_sub(1);
    let mut idle_since = IdleClock::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            seen = epoch;
            let job = shared.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(job) = job {
                job.work();
            }
            idle_since = IdleClock::now();
            continue;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(256) || idle_since.spun_less_than(SPIN) {
            std::hint::spin_loop();
            continue;
        }
        // Park until the next job. `parked` is raised before the epoch is read again under the
        // lock, and a submitter bumps the epoch before it reads `parked`: no wake-up is lost.
        let mut guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
        shared.parked.fetch_add(1, Ordering::SeqCst);
        while shared.epoch.load(Ordering::SeqCst) == seen {
            guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        shared.parked.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        idle_since = IdleClock::now();
    }
}

/// When a worker went idle. wasm32 has no clock in `std` (`Instant::now` panics there), so the
/// threaded wasm build counts its checks instead: 2^20 of them (each an atomic load and a compare,
/// 1-2 ns on current CPUs) stand in for the native [`SPIN`] of 2 ms.
#[cfg(not(target_arch = "wasm32"))]
struct IdleClock(std::time::Instant);

#[cfg(not(target_arch = "wasm32"))]
impl IdleClock {
    fn now() -> Self {
        Self(std::time::Instant::now())
    }
    fn spun_less_than(&mut self, spin: Duration) -> bool {
        self.0.elapsed() < spin
    }
}

#[cfg(target_arch = "wasm32")]
struct IdleClock(u32);

#[cfg(target_arch = "wasm32")]
impl IdleClock {
    fn now() -> Self {
        Self(0)
    }
    /// Called every 256 checks.
    fn spun_less_than(&mut self, _spin: Duration) -> bool {
        self.0 += 1;
        self.0 < (1 << 20) / 256
    }
}

/// Set from the threaded wasm build's panic hook (see [`note_panic`]).
#[cfg(target_arch = "wasm32")]
static WORKER_PANICKED: AtomicBool = AtomicBool::new(false);

#[cfg(target_arch = "wasm32")]
thread_local! {
    /// Whether this thread serves the pool. (Comparing `std::thread::current` ids instead killed
    /// the Web Worker without running the panic hook: std did not start that thread.)
    static IN_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Records that some thread panicked. wasm has no unwinding, so a pool worker that panics aborts
/// in place and its task never counts as done; the thread waiting for the job sees this and
/// panics too, rather than waiting forever.
#[cfg(target_arch = "wasm32")]
pub(crate) fn note_panic() {
    WORKER_PANICKED.store(true, Ordering::SeqCst);
}

/// For the package's tests: a parallel region whose tasks panic on the workers, while the calling
/// thread finishes none of its own until one has; the call then panics (see [`note_panic`]).
/// Panics at once where the pool has no workers.
#[cfg(target_arch = "wasm32")]
pub(crate) fn panic_on_a_worker_for_test() {
    let pool = pool();
    assert!(pool.threads > 1, "the pool has no worker threads to panic on");
    pool.for_each(64, &|_| {
        if IN_WORKER.get() {
            panic!("a deliberate panic on a CPU pool worker");
        }
        while !WORKER_PANICKED.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
    });
}

/// The threads the pool is built with where it cannot count cores itself (wasm32): set once,
/// before the first parallel call, by [`set_threads`].
static CONFIGURED_THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

#[cfg(target_arch = "wasm32")]
/// Sets the pool's size (the calling thread included) before its first use, for a build that is
/// given its workers rather than starting them (threaded wasm). Fails once the pool exists.
pub(crate) fn set_threads(threads: usize) -> crate::Result<()> {
    CONFIGURED_THREADS.store(threads.max(1), Ordering::SeqCst);
    let pool = pool();
    if pool.threads != threads.max(1) {
        return Err(crate::TwinferError::InvalidParameter(format!(
            "the CPU pool already runs with {} threads; set its size before the first model call",
            pool.threads
        )));
    }
    Ok(())
}

#[cfg(target_arch = "wasm32")]
/// Runs this thread as one of the pool's workers, forever: the entry point of the Web Workers that
/// the threaded wasm build is given (see the module's notes).
pub(crate) fn serve_as_worker() -> ! {
    IN_WORKER.set(true);
    worker(&pool().shared)
}

/// The process's pool: `TWINFER_THREADS` threads (the calling thread included), else one per
/// core the OS grants this process.
pub(crate) fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let configured = CONFIGURED_THREADS.load(Ordering::SeqCst);
        if configured > 0 {
            return Pool::new(configured);
        }
        let threads = std::env::var("TWINFER_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&t| t >= 1)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Pool::new(threads)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_even_nested_and_from_many_threads() {
        let pool = Pool::new(3);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for count in [0, 1, 2, 7, 100] {
                        let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                        pool.for_each(count, &|i| {
                            // A nested job runs inline on this thread.
                            let inner = AtomicUsize::new(0);
                            pool.for_each(3, &|_| {
                                inner.fetch_add(1, Ordering::Relaxed);
                            });
                            assert_eq!(inner.load(Ordering::Relaxed), 3);
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_others_finish() {
        let pool = Pool::new(2);
        let ran = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool.for_each(50, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(i != 17, "task 17 fails");
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 50);
        // The pool still works.
        let sum = AtomicUsize::new(0);
        pool.for_each(10, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = Pool::new(2);
        for _ in 0..3 {
            let sum = AtomicUsize::new(0);
            pool.for_each(64, &|i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
            std::thread::sleep(SPIN * 3);
        }
        // Parking takes the worker's SPIN plus however long a loaded machine takes to run it:
        // poll rather than trust one sleep (6 ms failed beside two fuzzers on two cores).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.shared.parked.load(Ordering::SeqCst) != 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(SPIN);
        }
        assert_eq!(pool.shared.parked.load(Ordering::SeqCst), 1, "the idle worker parked");
    }
}
