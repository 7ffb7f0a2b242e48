//! Work distribution: the engine's spinning pool ([`super::pool`]) on native targets and in the
//! threaded wasm build, a plain loop in the single-threaded wasm build.

use crate::cpu::block::Scratch;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    /// Each worker keeps its tiles between calls: zeroing fresh ones per item would cost as
    /// much memory traffic as a short decode chunk itself.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sc) => f(&mut sc),
        // Re-entered on this thread (a nested pool call): use a private one.
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Runs `f` on `len` floats of this thread's staging buffer, which keeps its memory between
/// calls (of whatever it held before: callers overwrite what they read). A nested call on the
/// same thread gets a buffer of its own.
pub(crate) fn with_staging<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static STAGING: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    STAGING.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Calls `f(i)` for every `i` in `0..count`, in parallel where there are threads.
pub(crate) fn for_each(count: usize, f: impl Fn(usize) + Sync) {
    #[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
    super::pool::pool().for_each(count, &f);
    #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
    (0..count).for_each(f);
}

/// Calls `f(i)` for every `i` in `0..count`: each thread walks a contiguous share of the indices
/// from the front and, once done, takes indices from the back of the others' shares. Where tasks
/// read consecutive memory, each thread streams one run of it while the threads keep pace, and
/// the load still balances where they do not (a late or slow core).
pub(crate) fn for_each_in_shares(count: usize, f: impl Fn(usize) + Sync) {
    let threads = worker_count().min(count);
    if threads <= 1 {
        return (0..count).for_each(f);
    }
    let shares: Vec<Share> = (0..threads).map(|s| Share::new(count * s / threads, count * (s + 1) / threads)).collect();
    for_each(threads, |s| {
        while let Some(i) = shares[s].take_front() {
            f(i);
        }
        for other in (1..threads).map(|d| (s + d) % threads) {
            while let Some(i) = shares[other].take_back() {
                f(i);
            }
        }
    });
}

/// The indices `front..back` not yet taken, as `front << 32 | back`.
struct Share(AtomicU64);

impl Share {
    fn new(front: usize, back: usize) -> Self {
        let fits = u32::try_from(back).expect("fewer than 2^32 tasks");
        Self(AtomicU64::new((front as u64) << 32 | u64::from(fits)))
    }

    fn take(&self, from_front: bool) -> Option<usize> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (front, back) = (cur >> 32, cur & u64::from(u32::MAX));
            if front >= back {
                return None;
            }
            let (next, taken) = if from_front { (cur + (1 << 32), front) } else { (cur - 1, back - 1) };
            match self.0.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(taken as usize),
                Err(now) => cur = now,
            }
        }
    }

    fn take_front(&self) -> Option<usize> {
        self.take(true)
    }

    fn take_back(&self) -> Option<usize> {
        self.take(false)
    }
}

/// Calls `f(i, chunk)` for the `i`-th run of `chunk_len` elements of `data` (the last may be
/// shorter), in parallel where there are threads.
pub(crate) fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunks: Vec<std::sync::Mutex<&mut [T]>> =
        data.chunks_mut(chunk_len.max(1)).map(std::sync::Mutex::new).collect();
    for_each(chunks.len(), |i| f(i, &mut chunks[i].lock().unwrap_or_else(|e| e.into_inner())));
}

/// `[f(0), .., f(count - 1)]`, computed in parallel where there are threads.
pub(crate) fn map_indices<R: Send>(count: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let slots: Vec<Slot<R>> = (0..count).map(|_| Slot(std::cell::UnsafeCell::new(None))).collect();
    for_each(count, |i| {
        let value = f(i);
        // SAFETY: each index runs exactly once, so slot i has one writer and no reader until
        // `for_each` returns.
        unsafe { *slots[i].0.get() = Some(value) };
    });
    slots.into_iter().map(|s| s.0.into_inner().expect("every index ran")).collect()
}

/// One result, written by the one task that computes it.
struct Slot<R>(std::cell::UnsafeCell<Option<R>>);
// SAFETY: a slot is written by one thread (its task) and read only after all tasks finished.
unsafe impl<R: Send> Sync for Slot<R> {}

/// Maps `f` over `items`, giving each worker its own reusable [`Scratch`].
pub(crate) fn map_items<T: Sync, R: Send>(items: &[T], f: impl Fn(&T, &mut Scratch) -> R + Sync + Send) -> Vec<R> {
    map_indices(items.len(), |i| with_scratch(|sc| f(&items[i], sc)))
}

/// Worker threads available to the engine (the calling thread included).
pub(crate) fn worker_count() -> usize {
    #[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
    {
        super::pool::pool().threads()
    }
    #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
    {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn shares_run_every_index_exactly_once() {
        for count in [0, 1, 2, 3, 7, 64, 1001] {
            let runs: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            for_each_in_shares(count, |i| {
                runs[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1), "count {count}");
        }
    }

    #[test]
    fn a_share_gives_its_indices_from_both_ends_once() {
        let share = Share::new(3, 7);
        assert_eq!((share.take_front(), share.take_back(), share.take_back()), (Some(3), Some(6), Some(5)));
        assert_eq!((share.take_front(), share.take_front(), share.take_back()), (Some(4), None, None));
    }
}
