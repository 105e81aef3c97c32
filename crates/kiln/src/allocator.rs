//! How the `kiln` processes' allocator (glibc's malloc) keeps memory it
//! has been given back.
//!
//! Left to itself, glibc raises its mmap threshold to the largest block
//! freed so far and trims a heap whose free top grows past twice that. A
//! server receiving blobs, and a client reading them back, free their
//! receive buffers (megabytes a batch) as fast as they take new ones, so
//! their heaps were trimmed again and again and the next buffers were
//! fresh pages, each faulted in and zeroed inside the socket's copy into
//! it (and, in a VM, backed by the host again). With both thresholds
//! fixed, freed buffers are taken again: for 1.2 GiB of 64 KiB
//! BatchUpdateBlobs the server faulted 94–153k times before and 28–33k
//! after, the benchmark client 334k and 21k, and a 1 GiB blob read right
//! after its upload went from 2.3 to 3.2 GB/s (medians;
//! benchmarks/allocator-thresholds.md).
//!
//! The price is memory: after a burst a heap keeps up to [`TRIM_THRESHOLD`]
//! free at its top, for the next burst, instead of handing it back at once.

/// Blocks up to this size come from the heaps; larger ones are mapped and
/// unmapped on their own. glibc's largest allowed value on 64-bit.
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// A heap's free top goes back to the system only past this size.
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Fixes both thresholds, before the runtime's threads start (every command
/// but the single-threaded launcher, which allocates next to nothing).
/// Where the C library is not glibc it does nothing.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt changes only the allocator's parameters, under its
        // own lock, and both values are within the ranges glibc accepts.
        let set = |param, value| unsafe { libc::mallopt(param, value) } == 1;
        if !(set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            && set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        {
            // glibc's own policy stays: slower, never wrong.
            eprintln!(
                "kiln: malloc refused the fixed mmap and trim thresholds; keeping its defaults"
            );
        }
    }
}
