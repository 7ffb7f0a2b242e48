//! Work distribution: a rayon pool on native targets, a plain loop on wasm32 (no threads there).

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

/// Maps `f` over `items`, giving each worker its own reusable [`Scratch`].
pub(crate) fn map_items<T: Sync, R: Send>(items: &[T], f: impl Fn(&T, &mut Scratch) -> R + Sync + Send) -> Vec<R> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        items.par_iter().map(|it| with_scratch(|sc| f(it, sc))).collect()
    }
    #[cfg(target_arch = "wasm32")]
    {
        items.iter().map(|it| with_scratch(|sc| f(it, sc))).collect()
    }
}

/// Worker threads available to the engine.
pub(crate) fn worker_count() -> usize {
    #[cfg(not(target_arch = "wasm32"))]
    {
        rayon::current_num_threads()
    }
    #[cfg(target_arch = "wasm32")]
    {
        1
    }
}
