//! Storage for packed weights, cut from large chunks in 2-MiB pages where the OS grants them.
//!
//! Decode reads every weight once a token. A model's weights are many buffers of a few hundred
//! KiB (SmolLM2-135M: 210 matrices of 0.07 to 1.1 MiB beside its 30-MiB output head). Each in its
//! own allocation sits in 4-KiB pages, and streaming 96 MB a token walks the page tables about
//! 24,000 times. Cut from chunks in 2-MiB pages, the same bytes take about 50 TLB entries.
//! Measured on a 2-core Zen 3 VM: the 30-MiB head alone (a single allocation the OS could back with
//! huge pages) decoded in 0.93-1.08 ms with them and 1.36-1.64 ms without.
//!
//! A [`Slab`] owns its range of a chunk exclusively; the chunk lives while any slab in it does.
//! Chunks are bump-allocated and never reused piecemeal: after a model is dropped, its chunks go
//! back to the OS once every slab in them is gone, except the chunk that is still being filled.
//! Elsewhere than Linux (no transparent huge pages to ask for) a slab is a plain vector, and so it
//! is under the fuzzer, whose AddressSanitizer guards each allocation's bounds: a read past a
//! piece's end would land in its chunk unnoticed.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Weights in the process's shared chunks (Linux) or in a vector of their own.
pub(crate) struct Slab<T: bytemuck::Pod> {
    store: Store<T>,
}

enum Store<T> {
    Own(Vec<T>),
    #[cfg(all(target_os = "linux", not(fuzzing)))]
    Chunk(chunks::Piece<T>),
}

impl<T: bytemuck::Pod> Slab<T> {
    /// `len` zeroed elements.
    pub fn zeroed(len: usize) -> Self {
        #[cfg(all(target_os = "linux", not(fuzzing)))]
        if let Some(piece) = chunks::Piece::zeroed(len) {
            return Self { store: Store::Chunk(piece) };
        }
        Self { store: Store::Own(vec![T::zeroed(); len]) }
    }
}

impl<T: bytemuck::Pod> Default for Slab<T> {
    fn default() -> Self {
        Self { store: Store::Own(Vec::new()) }
    }
}

impl<T: bytemuck::Pod> Deref for Slab<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.store {
            Store::Own(v) => v,
            #[cfg(all(target_os = "linux", not(fuzzing)))]
            Store::Chunk(p) => p.as_slice(),
        }
    }
}

impl<T: bytemuck::Pod> DerefMut for Slab<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.store {
            Store::Own(v) => v,
            #[cfg(all(target_os = "linux", not(fuzzing)))]
            Store::Chunk(p) => p.as_mut_slice(),
        }
    }
}

impl<T: bytemuck::Pod> Clone for Slab<T> {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len());
        copy.copy_from_slice(self);
        copy
    }
}

impl<T: bytemuck::Pod> fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Slab({} x {})", self.len(), std::any::type_name::<T>())
    }
}

#[cfg(all(target_os = "linux", not(fuzzing)))]
mod chunks {
    use std::marker::PhantomData;
    use std::ptr::NonNull;
    use std::sync::{Arc, Mutex};

    use memmap2::{Advice, MmapMut};

    const HUGE_PAGE: usize = 2 << 20;
    /// Chunk size: small requests share one. Only touched pages are committed, so a small model
    /// costs its own bytes rounded up to a huge page, not the chunk.
    const CHUNK: usize = 64 << 20;
    /// Requests above this get a chunk of their own: a shared chunk then wastes at most this much
    /// at its end.
    const OWN_CHUNK_ABOVE: usize = 4 << 20;
    /// Every piece starts on a cache line.
    const ALIGN: usize = 64;

    /// An anonymous mapping whose usable part starts on a huge-page boundary.
    struct Chunk {
        /// Kept for its `Drop` (the unmapping).
        _map: MmapMut,
        /// The usable part's first byte, taken from the mapping while it was ours alone.
        base: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is only written through pieces, each of which has a range of its own.
    unsafe impl Send for Chunk {}
    unsafe impl Sync for Chunk {}

    impl Chunk {
        /// A zeroed mapping of at least `len` bytes, advised for huge pages before its first touch.
        /// `None` where the OS refuses the mapping (the caller falls back to a vector).
        fn map(len: usize) -> Option<Self> {
            let len = len.checked_next_multiple_of(HUGE_PAGE)?;
            let mut map = MmapMut::map_anon(len.checked_add(HUGE_PAGE)?).ok()?;
            let start = (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize;
            // Advice only: where the OS has no huge pages, the chunk still works in small ones.
            let _ = map.advise_range(Advice::HugePage, start, len);
            let base = map.as_mut_ptr().wrapping_add(start);
            Some(Self { _map: map, base, len })
        }

        fn base(&self) -> *mut u8 {
            self.base
        }
    }

    /// The chunk being filled and how many of its bytes are taken.
    static CURRENT: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

    /// `len` elements of a chunk, owned by this piece alone.
    pub(super) struct Piece<T> {
        /// Keeps the chunk mapped while the piece lives.
        #[cfg_attr(not(test), allow(dead_code))]
        chunk: Arc<Chunk>,
        ptr: NonNull<T>,
        len: usize,
        _owns: PhantomData<T>,
    }

    // SAFETY: a piece owns its elements exclusively (no other piece overlaps them), so it is as
    // thread-safe as a `Vec<T>`.
    unsafe impl<T: Send> Send for Piece<T> {}
    unsafe impl<T: Sync> Sync for Piece<T> {}

    impl<T: bytemuck::Pod> Piece<T> {
        pub(super) fn zeroed(len: usize) -> Option<Self> {
            const { assert!(std::mem::align_of::<T>() <= ALIGN) };
            let bytes = len.checked_mul(std::mem::size_of::<T>())?;
            if bytes == 0 {
                return None;
            }
            let (chunk, at) = carve(bytes.checked_next_multiple_of(ALIGN)?)?;
            // Fresh anonymous pages read as zero, and no piece ever had these bytes before
            // (chunks are bump-allocated), so they are zeroed `T`s (`Pod`: every bit pattern is
            // one, zero included).
            let ptr = NonNull::new(chunk.base().wrapping_add(at).cast::<T>())?;
            Some(Self { chunk, ptr, len, _owns: PhantomData })
        }

        pub(super) fn as_slice(&self) -> &[T] {
            // SAFETY: `len` elements at `ptr` lie inside the chunk, which this piece keeps mapped.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }

        pub(super) fn as_mut_slice(&mut self) -> &mut [T] {
            // SAFETY: as above, and no other piece overlaps these elements.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }
    }

    /// `bytes` (a multiple of [`ALIGN`]) of a chunk: the chunk and the offset in it. `None` where
    /// the OS refuses a mapping or the size overflows (the caller falls back to a vector, which
    /// reports an impossible size as a vector does).
    fn carve(bytes: usize) -> Option<(Arc<Chunk>, usize)> {
        if bytes > OWN_CHUNK_ABOVE {
            return Some((Arc::new(Chunk::map(bytes)?), 0));
        }
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let fits = matches!(&*current, Some((c, used)) if used + bytes <= c.len);
        if !fits {
            *current = Some((Arc::new(Chunk::map(CHUNK)?), 0));
        }
        let (chunk, used) = current.as_mut()?;
        let at = *used;
        *used += bytes;
        Some((chunk.clone(), at))
    }

    #[cfg(test)]
    pub(super) fn same_chunk<T>(a: &Piece<T>, b: &Piece<T>) -> bool {
        Arc::ptr_eq(&a.chunk, &b.chunk)
    }

    #[cfg(test)]
    pub(super) fn chunk_start<T>(p: &Piece<T>) -> usize {
        p.chunk.base() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slabs_are_zeroed_and_keep_what_is_written() {
        let mut slabs: Vec<Slab<u32>> = (0..200).map(|i| Slab::zeroed(1000 + 37 * i)).collect();
        for (i, s) in slabs.iter_mut().enumerate() {
            assert!(s.iter().all(|&x| x == 0), "slab {i} is not zeroed");
            s.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 100_000 + j) as u32);
        }
        // A neighbour overlapping another would have overwritten its values.
        for (i, s) in slabs.iter().enumerate() {
            assert!(s.iter().enumerate().all(|(j, &x)| x == (i * 100_000 + j) as u32), "slab {i} was overwritten");
        }
    }

    #[test]
    fn large_small_empty_and_cloned_slabs() {
        let mut big: Slab<half::f16> = Slab::zeroed(3 << 20);
        big[(3 << 20) - 1] = half::f16::ONE;
        let mut copy = big.clone();
        copy[0] = half::f16::ONE;
        assert_eq!((big[0], big[(3 << 20) - 1]), (half::f16::ZERO, half::f16::ONE));
        assert_eq!((copy[0], copy[(3 << 20) - 1]), (half::f16::ONE, half::f16::ONE));
        let empty: Slab<i8> = Slab::zeroed(0);
        assert!(empty.is_empty() && Slab::<i8>::default().is_empty());
        assert_eq!(Slab::<i8>::zeroed(1).len(), 1);
    }

    #[cfg(all(target_os = "linux", not(fuzzing)))]
    #[test]
    fn small_slabs_share_a_chunk_that_starts_on_a_huge_page() {
        let (a, b) = (Slab::<u8>::zeroed(4096), Slab::<u8>::zeroed(4096));
        let (Store::Chunk(pa), Store::Chunk(pb)) = (&a.store, &b.store) else {
            panic!("a slab fell back to a vector on Linux (the OS refused a 64-MiB anonymous mapping)");
        };
        // Another test's slabs may have started a new chunk between the two.
        if chunks::same_chunk(pa, pb) {
            assert!(
                b.as_ptr() as usize >= a.as_ptr() as usize + 4096 || a.as_ptr() as usize >= b.as_ptr() as usize + 4096
            );
        }
        assert_eq!(chunks::chunk_start(pa) % (2 << 20), 0);
        assert_eq!(a.as_ptr() as usize % 64, 0);
    }
}
