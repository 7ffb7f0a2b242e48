//! Transparent huge pages for the big buffers that decode streams through.
//!
//! A KV pool of hundreds of MiB in 4-KiB pages costs a page walk for every few rows that decode
//! reads (far beyond the TLB's reach); in 2-MiB pages it costs almost none. Linux grants them to
//! memory that asks with `madvise(MADV_HUGEPAGE)` when its setting is `madvise`, the common
//! default, and to all memory under `always`. Measured on a 2-core AVX-512 VM, f16 KV at 32K keys:
//! batch 8 read 22.4-22.6 GB/s in 4-KiB pages and 24.7-26.0 in 2-MiB pages, one-token pages at
//! batch 8 12.5-15.8 against 19.1-19.2.

/// Asks the OS to back the whole 2-MiB pages inside `buf` with huge pages. Call it before the
/// buffer is first written, while its pages are still unmapped (zeroed allocations of this size
/// come from `mmap` untouched), so that the first write maps huge pages directly. Advice only:
/// where the OS refuses or has none, nothing changes.
pub(crate) fn advise<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last > first {
            // SAFETY: [first, last) lies inside `buf`, which this call borrows mutably; the
            // advice changes how the kernel backs those pages, never their contents.
            unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// `len` values `f(0), f(1), ...` in a buffer advised as [`advise`] does before they are written:
/// benchmark inputs laid out in memory as the engine's own KV pool is.
pub(crate) fn vec_from<T>(len: usize, f: impl FnMut(usize) -> T) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    advise(v.spare_capacity_mut());
    v.extend((0..len).map(f));
    v
}
