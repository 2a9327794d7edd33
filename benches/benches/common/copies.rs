//! Counts the bytes that `memcpy` and `memmove` move while [`counted`]
//! runs, in this thread or any other: the build script links every
//! benchmark with `--wrap=memcpy,--wrap=memmove`, so each call, from Rust,
//! std, rustls or the C in its crypto, comes here first. Copies that the
//! compiler inlines (a few bytes, of known size) are not seen; they are
//! not where a byte stream's time goes. Nor are copies inside glibc
//! itself (`realloc` moving a growing buffer calls its own `memcpy`), so
//! the counts are a floor.

#![allow(dead_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static COUNTING: AtomicBool = AtomicBool::new(false);
static COPIED: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    fn __real_memcpy(d: *mut c_void, s: *const c_void, n: usize) -> *mut c_void;
    fn __real_memmove(d: *mut c_void, s: *const c_void, n: usize) -> *mut c_void;
}

/// The linker sends every `memcpy` here.
///
/// # Safety
/// `memcpy`'s contract, passed on unchanged.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __wrap_memcpy(d: *mut c_void, s: *const c_void, n: usize) -> *mut c_void {
    if COUNTING.load(Ordering::Relaxed) {
        COPIED.fetch_add(n as u64, Ordering::Relaxed);
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { __real_memcpy(d, s, n) }
}

/// The linker sends every `memmove` here.
///
/// # Safety
/// `memmove`'s contract, passed on unchanged.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __wrap_memmove(d: *mut c_void, s: *const c_void, n: usize) -> *mut c_void {
    if COUNTING.load(Ordering::Relaxed) {
        COPIED.fetch_add(n as u64, Ordering::Relaxed);
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { __real_memmove(d, s, n) }
}

/// Runs `f` and returns what it returned with the bytes copied meanwhile.
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = COPIED.load(Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let r = f();
    COUNTING.store(false, Ordering::Relaxed);
    (r, COPIED.load(Ordering::Relaxed) - before)
}
