//! glibc's allocator as the command line's process runs it ([`tune`]), and the check's own
//! setting while it runs ([`check_phase`]). A process that never calls [`tune`] (a program using
//! the library) keeps its allocator as it set it: nothing here changes it.
//!
//! - The rewrite: glibc returns freed memory above 128 KiB (adaptively up to 32 MiB) to the
//!   system and trims the heap's top, so every kernel-sized array the rewrite allocates would be
//!   page-faulted (and zeroed by the kernel) anew. Keeping freed blocks below 32 MiB for reuse
//!   makes `fuse` ~15% faster on ImageNet-scale models without raising its peak.
//! - One arena for every thread (the command line only): the check's threads (samples, tract's
//!   matrix products, rayon) would each keep freed memory in an arena of their own, which the
//!   check's phases (one model's weights at a time, free memory returned between them) could not
//!   hand back; ~10% lower peak on ResNet-50, no slower.
//! - The check: tract's un-optimised runs allocate and free a copy of every weight and an im2col
//!   buffer per convolution, two samples side by side; kept for reuse, the blocks of 4–32 MiB
//!   fragment the heap and the peak spreads from run to run (ResNet-50 ACNet, BN nodes:
//!   six `fuse` runs peaked at 245–284 MiB, 1.09–1.27× the two models). While a check runs,
//!   blocks from 4 MiB are mapped and returned on their own: 232–253 MiB (1.04–1.13×), `fuse`
//!   ~4% slower (medians 2.62 → 2.73 s).

use std::sync::Mutex;

/// Blocks from this size are mapped on their own while no check runs (see the module docs).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// ... and while a check runs.
const CHECK_MMAP_THRESHOLD: i32 = 4 << 20;
/// The heap's top is trimmed beyond this much free memory.
const TRIM_THRESHOLD: i32 = 256 << 20;

/// `None` until [`tune`]; then how many checks are running.
static CHECKS: Mutex<Option<usize>> = Mutex::new(None);

fn set_mmap_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (under the allocator's own lock)
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Set the allocator as the command line runs it (see the module docs); `one_arena` when no
/// other thread has started yet (the binary's `main`). Checks from then on use their own setting.
pub fn tune(one_arena: bool) {
    let mut checks = CHECKS.lock().unwrap_or_else(|e| e.into_inner());
    set_mmap_threshold(MMAP_THRESHOLD);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        if one_arena {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (one_arena, TRIM_THRESHOLD);
    checks.get_or_insert(0);
}

/// The check's allocator setting, for as long as the value lives (checks on several threads
/// share it; the last one to end sets the rewrite's back). Does nothing unless [`tune`] was called.
pub struct CheckPhase {
    counted: bool,
}

pub fn check_phase() -> CheckPhase {
    let mut checks = CHECKS.lock().unwrap_or_else(|e| e.into_inner());
    match checks.as_mut() {
        None => CheckPhase { counted: false },
        Some(n) => {
            if *n == 0 {
                set_mmap_threshold(CHECK_MMAP_THRESHOLD);
            }
            *n += 1;
            CheckPhase { counted: true }
        }
    }
}

impl Drop for CheckPhase {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut checks = CHECKS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = checks.as_mut() {
            *n -= 1;
            if *n == 0 {
                set_mmap_threshold(MMAP_THRESHOLD);
            }
        }
    }
}
