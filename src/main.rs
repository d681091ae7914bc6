fn main() {
    // glibc's allocator as the command line runs it (src/alloc.rs says why)
    acnet_onnx::tune_allocator(true);
    std::process::exit(acnet_onnx::cli::main(std::env::args_os()));
}
