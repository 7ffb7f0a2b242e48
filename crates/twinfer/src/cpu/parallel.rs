//! Work distribution: the engine's spinning pool ([`super::pool`]) on native targets and in the
//! threaded wasm build, a plain loop in the single-threaded wasm build.

use crate::cpu::block::Scratch;

use std::cell::RefCell;

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

/// Calls `f(i)` for every `i` in `0..count`, in parallel where there are threads.
pub(crate) fn for_each(count: usize, f: impl Fn(usize) + Sync) {
    #[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
    super::pool::pool().for_each(count, &f);
    #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
    (0..count).for_each(f);
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
