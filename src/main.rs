fn main() {
    // before any other thread exists: one arena too (see the function)
    acnet_onnx::tune_allocator(true);
    std::process::exit(acnet_onnx::cli::main(std::env::args_os()));
}
