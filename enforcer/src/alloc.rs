//! The daemon's memory allocator, jemalloc (the binary declares it global), told to give
//! back what it no longer uses.
//!
//! Why jemalloc: flow records (and handshake-mode connections' state) are made on one
//! thread and freed on another, which cost glibc's arenas a quarter of the enforcer's CPU on
//! the fast path (docs/handshake.md). Why this module: jemalloc keeps freed pages for reuse
//! and returns them only as its decay clock advances, and without background threads that
//! clock advances only while the process allocates. So the peak of starting (loading the
//! eBPF programs against the kernel's BTF) stayed resident in an idle enforcer: 38 MiB
//! against 24 MiB once returned (`cargo xtask bench --only memory`, docs/wire.md).
use std::{ffi::c_char, io};

/// `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused pages back to the kernel now.
const PURGE_ALL: &[u8] = b"arena.4096.purge\0";

/// Returns every page jemalloc holds but does not use (all arenas) to the kernel: called
/// once the enforcer is ready, when the peak of starting is over.
pub fn return_unused() -> io::Result<()> {
    // SAFETY: a NUL-terminated name of a control that reads and writes nothing, with
    // null old/new pointers and lengths, as jemalloc's mallctl(3) requires for it.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr() as *const c_char,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Lets jemalloc's background threads return unused pages on a timer (its decay: about
/// 10 s after they were freed), so an enforcer that idles after a burst of connections
/// shrinks back without allocating.
pub fn purge_in_background() -> io::Result<()> {
    tikv_jemalloc_ctl::background_thread::write(true).map_err(|e| io::Error::other(e.to_string()))
}
