use clap::Parser;

/// glibc's allocator returns freed memory above 128 KiB (adaptively up to 32 MiB) to the system
/// and trims the heap's top, so every kernel-sized array the passes allocate is page-faulted
/// (and zeroed by the kernel) anew. Keeping freed memory for reuse makes `fuse` ~15% faster
/// on ImageNet-scale models without raising its peak (measured in benches/perf.rs).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    // No backtraces for users: a panic (a bug) is reported as one line and exit code 2, and
    // unwinding still removes any staged output.
    acnet_onnx::cli::install_panic_hook();
    let cli = match acnet_onnx::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if !e.use_stderr() {
                // --help, --version
                let _ = e.print();
                std::process::exit(0);
            }
            // one line: clap's first line (`error: ...`) without the usage block that follows
            let text = e.render().to_string();
            let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
            let first = lines.next().unwrap_or("bad arguments");
            let mut first = first.trim().strip_prefix("error: ").unwrap_or(first.trim()).to_string();
            // `... were not provided:` is followed by the arguments, indented
            if first.ends_with(':') {
                let more: Vec<&str> = lines.take_while(|l| l.starts_with(' ') && !l.trim().is_empty()).map(str::trim).collect();
                if !more.is_empty() {
                    first = format!("{} {}", first, more.join(", "));
                }
            }
            eprintln!("acnet-onnx: {} (see --help)", acnet_onnx::cli::one_line(&first));
            std::process::exit(2);
        }
    };
    let code = match std::panic::catch_unwind(|| acnet_onnx::cli::main_with(cli)) {
        Ok(c) => c,
        Err(p) => {
            let msg = acnet_onnx::cli::panic_message(&*p);
            eprintln!("acnet-onnx: internal error: {} (this is a bug in acnet-onnx: please report it)", acnet_onnx::cli::one_line(&msg));
            2
        }
    };
    std::process::exit(code);
}
