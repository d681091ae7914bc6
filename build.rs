//! Generates the ONNX message types from the vendored proto2 `proto/onnx.proto` with
//! prost-build, parsed by protox (pure Rust: no system `protoc` needed).

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["proto/onnx.proto"], ["proto"]).expect("parse proto/onnx.proto");
    let mut config = prost_build::Config::new();
    // Weights decode as `bytes::Bytes`: a model decoded from a memory map shares the
    // map's memory instead of copying every tensor.
    config.bytes([".onnx.TensorProto.raw_data"]);
    config.compile_fds(fds).expect("generate Rust types from proto/onnx.proto");
}
