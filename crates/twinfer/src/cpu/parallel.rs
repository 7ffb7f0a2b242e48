//! Work distribution: a rayon pool on native targets, a plain loop on wasm32 (no threads there).

use crate::cpu::block::Scratch;

/// Maps `f` over `items`, giving each worker its own reusable [`Scratch`].
pub(crate) fn map_items<T: Sync, R: Send>(items: &[T], f: impl Fn(&T, &mut Scratch) -> R + Sync + Send) -> Vec<R> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        items.par_iter().map_init(Scratch::default, |sc, it| f(it, sc)).collect()
    }
    #[cfg(target_arch = "wasm32")]
    {
        let mut sc = Scratch::default();
        items.iter().map(|it| f(it, &mut sc)).collect()
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
