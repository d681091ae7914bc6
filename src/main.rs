/// glibc's allocator returns freed memory above 128 KiB (adaptively up to 32 MiB) to the system
/// and trims the heap's top, so every kernel-sized array the rewrite allocates is page-faulted
/// (and zeroed by the kernel) anew. Keeping freed memory for reuse makes `fuse` ~15% faster
/// on ImageNet-scale models without raising its peak (measured in benches/perf.rs).
/// One arena for every thread: the check's threads (samples, tract's matrix products, rayon)
/// would each keep freed memory in an arena of their own, which the check's phases (one model's
/// weights at a time, free memory returned between them) could not hand back; ~10% lower peak
/// on ResNet-50, no slower.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() {
    tune_allocator();
    std::process::exit(acnet_onnx::cli::main(std::env::args_os()));
}
