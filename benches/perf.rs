//! Performance benchmark of acnet-onnx: what issue 15 asks, each figure a ratio of two times (or
//! sizes) measured in the same run.
//!
//! ```sh
//! cargo bench --bench perf                            # ResNet-50 + ResNet-152, the block chain, latency
//! cargo bench --bench perf -- resnet50                # ResNet-50 only (and the chain, latency)
//! ACNET_BENCH_SECTIONS=chain cargo bench --bench perf # the block chain only
//! ACNET_BENCH_MODELS=big cargo bench --bench perf     # ResNet-152 at 3x width (~2.8 GB, ~10 GB of disk)
//! ```
//!
//! Sections (the Markdown tables it prints, in this order; `ACNET_BENCH_SECTIONS` or words on the
//! command line pick some: `fuse`, `check`, `chain`, `latency`):
//!
//! 1. **fuse** — per model and export style (ResNet-50 / ResNet-152 ACNet, BN folded and BN nodes,
//!    inline and external data): `acnet-onnx fuse --no-verify` wall time against a *durable copy*
//!    of the same bytes (`cat` of the `.onnx` and its `.data`, then fsync of each copy) and
//!    against the plain `cat` (coreutils copies with copy_file_range); peak RSS against the
//!    model's size. Targets: fuse <= 2x durable copy, peak <= 1.5x size.
//! 2. **check** — the default `acnet-onnx fuse` (with the check: 3 samples, the noise criterion)
//!    against the *plain inferences* the check needs, run one after the other in a fresh process
//!    (this binary, `--plain-tract`): tract load + `into_typed().into_runnable()` (un-optimised,
//!    as the check) + 3 runs, for the reference and then for the fused model. Reported
//!    separately: the *noise inferences* the criterion adds (`--noise-tract`: a perturbed copy of
//!    the already loaded reference, every float constant moved one ulp, typed and run on the 3
//!    samples, twice). Peak RSS of the default fuse and of `acnet-onnx verify` against the two
//!    models' combined size. Targets: fuse <= 1.5x plain inferences, peak <= 1.25x combined.
//!    Also, once per model (`--batch-tract`): the reference's samples in rounds of one per core
//!    against one run of the samples stacked on axis 0 (the check stacks them when the weights
//!    are at least 4x what a run computes: the at-scale model, not the ResNets at 224x224).
//! 3. **chain** — a chain of tiny ACNet blocks (4 channels, 8x8 input; per block a 3x3, a 3x1 and
//!    a 1x3 conv with bias, `Add(Add(sq, ver), hor)`, `Relu`) at `ACNET_BENCH_CHAIN` blocks
//!    (default 1000,4000,16000): `fuse --no-verify` wall time per block. Target: time per block
//!    within 2x across the sizes (largest / smallest per-block time). Runs longer than
//!    `ACNET_BENCH_TIMEOUT` seconds are killed and reported as `timeout` (larger sizes are then
//!    skipped).
//! 4. **at scale** (opt-in: `ACNET_BENCH_MODELS=big` or `resnet152x3`) — a ResNet-152 ACNet at 3x
//!    width, BN nodes, external data (~2.8 GB), input Bx3x64x64: sections 1 and 2 on it.
//!    Generated streaming (weights written to the data file as they are drawn). Needs ~10 GB in
//!    the models folder and ~8 GB of RAM for the check.
//! 5. **latency** — tract latency (`into_optimized`, batch 1, 224x224) of the ACNet, fused and
//!    baseline models, run in turns. Target: fused within 5% of the baseline.
//!
//! Then a `targets` list: met / MISSED and the worst ratio of each target, and the machine (cores,
//! CPU, RAM, kernel, file system of the models folder, load average at the start and the end).
//!
//! How it measures: the release binary runs as a child process (spawn to exit), wrapped in GNU
//! time for its `%M` peak RSS when `/usr/bin/time` works (else the highest VmHWM polled from
//! /proc); the `cat` copies are wrapped the same way, so both pay the same process start. Every
//! timed run starts after a `sync`, so no write-back of an earlier run competes with it. Each
//! figure is the median of `ACNET_BENCH_RUNS` runs (chain runs longer than 20 s are not
//! repeated). The rows' phases (`load+rewrite`, `stage+check`, `write`) come from one extra run
//! of `acnet_onnx::fuse_file_with` in a child process (this binary, `--phases`), timed at its
//! events.
//!
//! Environment:
//! * `ACNET_BENCH_MODELS` — `resnet50`, `resnet152`, `big` (= `resnet152x3`), comma-separated, or
//!   `none` (default `resnet50,resnet152`); model names on the command line add to it.
//! * `ACNET_BENCH_SECTIONS` — `fuse,check,chain,latency` (default all).
//! * `ACNET_BENCH_CHAIN` — block counts of the chain (default `1000,4000,16000`; `none` skips).
//! * `ACNET_BENCH_RUNS` — repetitions of each timed child (default 3, median taken).
//! * `ACNET_BENCH_LATENCY_RUNS` — timed rounds of tract runs (default 9, after a warm-up round).
//! * `ACNET_BENCH_TIMEOUT` — seconds before a child is killed (default 300; 4x for the big model).
//! * `ACNET_BENCH_DIR` — where models are generated (default `<target>/bench-models`).
//! * `ACNET_BENCH_REGEN=1` — regenerate the models even if a previous run left them.
//!
//! Not part of `cargo test`: the target has `test = false`, and the binary does nothing unless
//! cargo bench's `--bench` flag is on its command line.

use acnet_onnx::proto::{
    tensor_proto::{DataLocation, DataType},
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    ValueInfoProto,
};
use acnet_onnx::{fuse_file_with, save, DataMode, Event, FuseOptions, Model};

#[path = "../tests/support/mod.rs"]
mod support;
use bytes::Bytes;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::{attr_float, attr_int, attr_ints, tensor_info};
use tract_onnx::prelude::*;

/// Bump when the generated ResNets change, so that cached models are regenerated.
const GEN_VERSION: u32 = 2;
/// The same for the block chain and the 3x-width ResNet-152.
const CHAIN_VERSION: u32 = 1;
const BIG_VERSION: u32 = 2;
const SEED: u64 = 0xAC_4E7;
const BIN: &str = env!("CARGO_BIN_EXE_acnet-onnx");
/// What the check runs by default (see src/verify/mod.rs): 3 samples, 2 perturbed references.
const CHECK_SAMPLES: usize = 3;
const NOISE_DRAWS: usize = 2;
/// Chain runs longer than this are not repeated (nor run again for their phases).
const CHAIN_REPEAT_LIMIT: f64 = 20.0;

// ---------------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// BN folded at export: every conv (every ACB branch) is a Conv with bias.
    Folded,
    /// BatchNormalization (inference) after every conv, convs without bias.
    Bn,
}

impl Style {
    fn tag(self) -> &'static str {
        match self {
            Style::Folded => "fold",
            Style::Bn => "bn",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Style::Folded => "BN folded",
            Style::Bn => "BN nodes",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    ResNet50,
    ResNet152,
    /// ResNet-152 with every bottleneck 3x as wide (~2.8 GB with ACBs), input 64x64.
    ResNet152x3,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::ResNet50 => "resnet50",
            Arch::ResNet152 => "resnet152",
            Arch::ResNet152x3 => "resnet152x3",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Arch::ResNet50 => "ResNet-50",
            Arch::ResNet152 => "ResNet-152",
            Arch::ResNet152x3 => "ResNet-152 3x width",
        }
    }
    fn blocks(self) -> [usize; 4] {
        match self {
            Arch::ResNet50 => [3, 4, 6, 3],
            Arch::ResNet152 | Arch::ResNet152x3 => [3, 8, 36, 3],
        }
    }
    fn width(self) -> usize {
        if self == Arch::ResNet152x3 {
            3
        } else {
            1
        }
    }
    /// The input's side (declared 1x3xSxS): what the check and the plain inferences run.
    fn side(self) -> usize {
        if self == Arch::ResNet152x3 {
            64
        } else {
            224
        }
    }
    fn big(self) -> bool {
        self == Arch::ResNet152x3
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(v.len() * 4);
    for x in v {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    raw
}

fn f32_tensor(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(Bytes::from(f32_bytes(v))),
        ..Default::default()
    }
}

/// Weights written straight to an external data file as they are generated (the big model is
/// never held in memory).
struct ExtSink {
    file: BufWriter<File>,
    location: String,
    offset: u64,
}

impl ExtSink {
    fn tensor(&mut self, name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
        let raw = f32_bytes(v);
        self.file.write_all(&raw).expect("write the generated data file");
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        let t = TensorProto {
            name: Some(name.into()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Float as i32),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", self.offset.to_string()),
                entry("length", raw.len().to_string()),
            ],
            ..Default::default()
        };
        self.offset += raw.len() as u64;
        t
    }
}

/// Builds one model. `acb = false` gives the plain baseline (one 3x3 conv per block, BN folded).
struct Gen<'a> {
    rng: StdRng,
    style: Style,
    acb: bool,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// when set, tensors of 1 KiB or more go to this data file
    sink: Option<&'a mut ExtSink>,
}

impl Gen<'_> {
    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(lo..hi)).collect()
    }

    fn node(&mut self, op: &str, name: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        let out = format!("{name}_output_0");
        self.nodes.push(NodeProto {
            name: Some(name.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute,
            ..Default::default()
        });
        out
    }

    fn init(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        let t = match self.sink.as_deref_mut() {
            Some(sink) if v.len() * 4 >= 1024 => sink.tensor(name, dims, v),
            _ => f32_tensor(name, dims, v),
        };
        self.inits.push(t);
        name.to_string()
    }

    /// A conv with its own (inference) BatchNormalization: emitted as Conv + BN, or with the BN
    /// folded into a Conv with bias. `gamma` is the range of the BN scales. Returns its output.
    #[allow(clippy::too_many_arguments)]
    fn conv_bn(
        &mut self,
        p: &str,
        x: &str,
        cin: usize,
        cout: usize,
        k: [usize; 2],
        stride: usize,
        pads: [i64; 4],
        gamma: (f32, f32),
    ) -> String {
        let fan_in = cin * k[0] * k[1];
        let a = (6.0 / fan_in as f32).sqrt(); // He-uniform
        let mut w = self.uniform(cout * fan_in, -a, a);
        let g = self.uniform(cout, gamma.0, gamma.1);
        let beta = self.uniform(cout, -0.1, 0.1);
        let mean = self.uniform(cout, -0.1, 0.1);
        let var = self.uniform(cout, 0.5, 1.5);
        let eps = 1e-5f32;
        let node = format!("/{}", p.replace('.', "/"));
        let attrs = vec![
            attr_ints("kernel_shape", &[k[0] as i64, k[1] as i64]),
            attr_ints("pads", &pads),
            attr_ints("strides", &[stride as i64, stride as i64]),
            attr_ints("dilations", &[1, 1]),
            attr_int("group", 1),
        ];
        let wdims = [cout, cin, k[0], k[1]];
        match self.style {
            Style::Folded => {
                let mut b = vec![0f32; cout];
                for o in 0..cout {
                    let s = g[o] as f64 / (var[o] as f64 + eps as f64).sqrt();
                    for v in &mut w[o * fan_in..(o + 1) * fan_in] {
                        *v = (*v as f64 * s) as f32;
                    }
                    b[o] = (beta[o] as f64 - mean[o] as f64 * s) as f32;
                }
                let wn = self.init(&format!("{p}.weight"), &wdims, &w);
                let bn = self.init(&format!("{p}.bias"), &[cout], &b);
                self.node("Conv", &format!("{node}/Conv"), &[x, &wn, &bn], attrs)
            }
            Style::Bn => {
                let wn = self.init(&format!("{p}.weight"), &wdims, &w);
                let y = self.node("Conv", &format!("{node}/Conv"), &[x, &wn], attrs);
                let sn = self.init(&format!("{p}.bn.weight"), &[cout], &g);
                let bn = self.init(&format!("{p}.bn.bias"), &[cout], &beta);
                let mn = self.init(&format!("{p}.bn.running_mean"), &[cout], &mean);
                let vn = self.init(&format!("{p}.bn.running_var"), &[cout], &var);
                self.node(
                    "BatchNormalization",
                    &format!("{node}/BatchNormalization"),
                    &[&y, &sn, &bn, &mn, &vn],
                    vec![attr_float("epsilon", eps), attr_float("momentum", 0.9)],
                )
            }
        }
    }

    /// The block's 3x3 conv: an ACB (3x3 + 3x1 + 1x3, each with its BN, summed) or, for the
    /// baseline, one 3x3 conv.
    fn conv3x3(&mut self, p: &str, x: &str, cin: usize, cout: usize, stride: usize) -> String {
        let g = (0.5, 1.5);
        if !self.acb {
            return self.conv_bn(p, x, cin, cout, [3, 3], stride, [1, 1, 1, 1], g);
        }
        // three branches of one conv: keep the sum's scale near a single conv's
        let g3 = (0.3, 0.9);
        let sq = self.conv_bn(&format!("{p}.square"), x, cin, cout, [3, 3], stride, [1, 1, 1, 1], g3);
        let ver = self.conv_bn(&format!("{p}.ver"), x, cin, cout, [3, 1], stride, [1, 0, 1, 0], g3);
        let hor = self.conv_bn(&format!("{p}.hor"), x, cin, cout, [1, 3], stride, [0, 1, 0, 1], g3);
        let node = format!("/{}", p.replace('.', "/"));
        let s = self.node("Add", &format!("{node}/Add"), &[&sq, &ver], vec![]);
        self.node("Add", &format!("{node}/Add_1"), &[&s, &hor], vec![])
    }

    fn relu(&mut self, p: &str, x: &str) -> String {
        self.node("Relu", &format!("/{}/Relu", p.replace('.', "/")), &[x], vec![])
    }
}

/// `v` with its first dimension the symbol `batch`, as `torch.onnx.export(..., dynamic_axes=
/// {"input": {0: "batch"}, ...})` declares it: the check may then run its samples as one batch.
fn batch_axis(mut v: ValueInfoProto) -> ValueInfoProto {
    use acnet_onnx::proto::{tensor_shape_proto::dimension::Value, type_proto};
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(d) = t.shape.as_mut().and_then(|s| s.dim.first_mut()) {
            d.value = Some(Value::DimParam("batch".into()));
        }
    }
    v
}

fn model_proto(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        producer_name: Some("acnet-onnx-bench".into()),
        producer_version: Some(GEN_VERSION.to_string()),
        graph: Some(graph),
        ..Default::default()
    }
}

/// A ResNet (v1.5, torchvision layout) of bottleneck blocks, `arch.width()` times as wide
/// (the stem stays 64 channels, as torchvision's wide ResNets).
fn resnet(arch: Arch, style: Style, acb: bool, seed: u64, sink: Option<&mut ExtSink>) -> ModelProto {
    let mut g = Gen { rng: StdRng::seed_from_u64(seed), style, acb, nodes: vec![], inits: vec![], sink };
    let x = g.conv_bn("conv1", "input", 3, 64, [7, 7], 2, [3, 3, 3, 3], (0.5, 1.5));
    let x = g.relu("conv1", &x);
    let mut x = g.node(
        "MaxPool",
        "/maxpool/MaxPool",
        &[&x],
        vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1]), attr_ints("strides", &[2, 2])],
    );
    let mut cin = 64;
    for (li, (&n, width)) in arch.blocks().iter().zip([64usize, 128, 256, 512]).enumerate() {
        let width = width * arch.width();
        for bi in 0..n {
            let p = format!("layer{}.{}", li + 1, bi);
            let stride = if bi == 0 && li > 0 { 2 } else { 1 };
            let cout = width * 4;
            let y = g.conv_bn(&format!("{p}.conv1"), &x, cin, width, [1, 1], 1, [0, 0, 0, 0], (0.5, 1.5));
            let y = g.relu(&format!("{p}.conv1"), &y);
            let y = g.conv3x3(&format!("{p}.conv2"), &y, width, width, stride);
            let y = g.relu(&format!("{p}.conv2"), &y);
            // small scales on the last BN of a block keep the residual stream bounded
            let y = g.conv_bn(&format!("{p}.conv3"), &y, width, cout, [1, 1], 1, [0, 0, 0, 0], (0.05, 0.25));
            let short = if bi == 0 {
                g.conv_bn(&format!("{p}.downsample"), &x, cin, cout, [1, 1], stride, [0, 0, 0, 0], (0.5, 1.5))
            } else {
                x.clone()
            };
            let s = g.node("Add", &format!("/{}/Add", p.replace('.', "/")), &[&y, &short], vec![]);
            x = g.relu(&p, &s);
            cin = cout;
        }
    }
    let x = g.node("GlobalAveragePool", "/avgpool/GlobalAveragePool", &[&x], vec![]);
    let x = g.node("Flatten", "/Flatten", &[&x], vec![attr_int("axis", 1)]);
    let a = 1.0 / (cin as f32).sqrt();
    let w = g.uniform(1000 * cin, -a, a);
    let b = g.uniform(1000, -0.1, 0.1);
    let wn = g.init("fc.weight", &[1000, cin], &w);
    let bn = g.init("fc.bias", &[1000], &b);
    g.nodes.push(NodeProto {
        name: Some("/fc/Gemm".into()),
        op_type: Some("Gemm".into()),
        input: vec![x, wn, bn],
        output: vec!["output".into()],
        attribute: vec![attr_float("alpha", 1.0), attr_float("beta", 1.0), attr_int("transB", 1)],
        ..Default::default()
    });
    let side = arch.side() as i64;
    model_proto(GraphProto {
        name: Some(format!("{}_{}", arch.name(), if acb { "acnet" } else { "baseline" })),
        node: g.nodes,
        initializer: g.inits,
        input: vec![batch_axis(tensor_info("input", DataType::Float, &[1, 3, side, side]))],
        output: vec![batch_axis(tensor_info("output", DataType::Float, &[1, 1000]))],
        ..Default::default()
    })
}

/// A chain of `n` tiny ACNet blocks: 4 channels, 8x8; per block a 3x3, a 3x1 and a 1x3 conv with
/// bias, `Add(Add(sq, ver), hor)`, then a Relu.
fn chain(n: usize, seed: u64) -> ModelProto {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        style: Style::Folded,
        acb: true,
        nodes: vec![],
        inits: vec![],
        sink: None,
    };
    let c = 4;
    let mut x = "input".to_string();
    for i in 0..n {
        let p = format!("blocks.{i}");
        let branch = |g: &mut Gen, b: &str, k: [usize; 2], pads: [i64; 4]| {
            let fan_in = c * k[0] * k[1];
            let a = 0.5 * (6.0 / fan_in as f32).sqrt();
            let w = g.uniform(c * fan_in, -a, a);
            let bias = g.uniform(c, -0.1, 0.1);
            let wn = g.init(&format!("{p}.{b}.weight"), &[c, c, k[0], k[1]], &w);
            let bn = g.init(&format!("{p}.{b}.bias"), &[c], &bias);
            let attrs = vec![
                attr_ints("kernel_shape", &[k[0] as i64, k[1] as i64]),
                attr_ints("pads", &pads),
                attr_ints("strides", &[1, 1]),
                attr_ints("dilations", &[1, 1]),
                attr_int("group", 1),
            ];
            g.node("Conv", &format!("/blocks.{i}/{b}/Conv"), &[&x, &wn, &bn], attrs)
        };
        let sq = branch(&mut g, "square", [3, 3], [1, 1, 1, 1]);
        let ver = branch(&mut g, "ver", [3, 1], [1, 0, 1, 0]);
        let hor = branch(&mut g, "hor", [1, 3], [0, 1, 0, 1]);
        let s = g.node("Add", &format!("/blocks.{i}/Add"), &[&sq, &ver], vec![]);
        let s = g.node("Add", &format!("/blocks.{i}/Add_1"), &[&s, &hor], vec![]);
        x = g.relu(&format!("blocks.{i}"), &s);
    }
    if let Some(last) = g.nodes.last_mut() {
        last.output[0] = "output".into();
    }
    model_proto(GraphProto {
        name: Some(format!("acnet_chain_{n}")),
        node: g.nodes,
        initializer: g.inits,
        input: vec![tensor_info("input", DataType::Float, &[1, c as i64, 8, 8])],
        output: vec![tensor_info("output", DataType::Float, &[1, c as i64, 8, 8])],
        ..Default::default()
    })
}

/// One ACNet model file the bench measures.
#[derive(Clone, Debug)]
struct Variant {
    arch: Arch,
    style: Style,
    external: bool,
    path: PathBuf,
}

impl Variant {
    fn tag(&self) -> String {
        format!("{}-{}-{}", self.arch.name(), self.style.tag(), if self.external { "ext" } else { "inline" })
    }
    fn weights(&self) -> &'static str {
        if self.external {
            "external"
        } else {
            "inline"
        }
    }
}

/// The generated files of one architecture.
struct Models {
    acnet: Vec<Variant>,
    /// the plain network (none for the big model)
    baseline: Option<PathBuf>,
}

fn model_path(dir: &Path, arch: Arch, what: &str, external: bool) -> PathBuf {
    dir.join(format!("{}-{what}-{}.onnx", arch.name(), if external { "ext" } else { "inline" }))
}

fn regen() -> bool {
    std::env::var("ACNET_BENCH_REGEN").is_ok_and(|v| v == "1")
}

/// Whether files generated earlier under `stamp` (with the contents `want`) can be reused.
fn cached(stamp: &Path, want: &str, files: &[&Path]) -> bool {
    !regen() && std::fs::read_to_string(stamp).is_ok_and(|s| s == want) && files.iter().all(|p| p.is_file())
}

fn generate(dir: &Path, arch: Arch) -> Models {
    if arch.big() {
        return generate_big(dir);
    }
    let stamp = dir.join(format!("{}.stamp", arch.name()));
    let want = format!("gen {GEN_VERSION} seed {SEED}\n");
    let mut models = Models { acnet: vec![], baseline: Some(model_path(dir, arch, "baseline", false)) };
    for style in [Style::Folded, Style::Bn] {
        for external in [false, true] {
            let path = model_path(dir, arch, &format!("acnet-{}", style.tag()), external);
            models.acnet.push(Variant { arch, style, external, path });
        }
    }
    let files: Vec<&Path> = models.acnet.iter().map(|m| m.path.as_path()).chain(models.baseline.as_deref()).collect();
    if cached(&stamp, &want, &files) {
        eprintln!("[{}] using the models generated earlier in {}", arch.label(), dir.display());
        return models;
    }
    let _ = std::fs::remove_file(&stamp);
    for (i, style) in [Style::Folded, Style::Bn].into_iter().enumerate() {
        let t = Instant::now();
        let m = Model::from_proto(resnet(arch, style, true, SEED + i as u64, None)).unwrap();
        for external in [false, true] {
            let path = model_path(dir, arch, &format!("acnet-{}", style.tag()), external);
            save(&m, &path, if external { DataMode::External } else { DataMode::Inline })
                .expect("save a generated model");
        }
        eprintln!("[{}] generated ACNet ({}) in {:.1} s", arch.label(), style.tag(), t.elapsed().as_secs_f64());
    }
    let m = Model::from_proto(resnet(arch, Style::Folded, false, SEED + 7, None)).unwrap();
    save(&m, models.baseline.as_ref().unwrap(), DataMode::Inline).expect("save the baseline");
    std::fs::write(&stamp, want).unwrap();
    models
}

/// The 3x-width ResNet-152 ACNet (BN nodes, external data), written streaming: every weight goes
/// to the data file as it is drawn, only the graph is held in memory.
fn generate_big(dir: &Path) -> Models {
    let arch = Arch::ResNet152x3;
    let stamp = dir.join(format!("{}.stamp", arch.name()));
    let want = format!("big {BIG_VERSION} seed {SEED}\n");
    let path = model_path(dir, arch, "acnet-bn", true);
    let data = data_file(&path);
    let models =
        Models { acnet: vec![Variant { arch, style: Style::Bn, external: true, path: path.clone() }], baseline: None };
    if cached(&stamp, &want, &[&path, &data]) {
        eprintln!("[{}] using the model generated earlier in {}", arch.label(), dir.display());
        return models;
    }
    let _ = std::fs::remove_file(&stamp);
    let t = Instant::now();
    let location = data.file_name().unwrap().to_string_lossy().into_owned();
    let mut sink = ExtSink {
        file: BufWriter::with_capacity(8 << 20, File::create(&data).expect("create the data file")),
        location,
        offset: 0,
    };
    let proto = resnet(arch, Style::Bn, true, SEED + 11, Some(&mut sink));
    let file = sink.file.into_inner().expect("flush the data file");
    file.sync_all().unwrap();
    std::fs::write(&path, proto.encode_to_vec()).expect("write the generated model");
    File::open(&path).unwrap().sync_all().unwrap();
    eprintln!(
        "[{}] generated ACNet (bn, external, {} MiB) in {:.1} s",
        arch.label(),
        mib(sink.offset),
        t.elapsed().as_secs_f64()
    );
    std::fs::write(&stamp, want).unwrap();
    models
}

fn generate_chain(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join(format!("chain-{n}.onnx"));
    let stamp = dir.join(format!("chain-{n}.stamp"));
    let want = format!("chain {CHAIN_VERSION} seed {SEED}\n");
    if cached(&stamp, &want, &[&path]) {
        return path;
    }
    let _ = std::fs::remove_file(&stamp);
    std::fs::write(&path, chain(n, SEED + n as u64).encode_to_vec()).expect("write the chain model");
    std::fs::write(&stamp, want).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// Measuring child processes
// ---------------------------------------------------------------------------------------------

/// How a measured child ended.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Ok,
    /// non-zero exit: the last line of its stderr
    Failed(String),
    /// killed after the timeout
    Timeout,
}

struct ProcStat {
    wall: f64,
    /// Peak RSS of the program, bytes: GNU time's `%M` (its wait4 rusage) when /usr/bin/time is
    /// there, else the highest VmHWM polled from /proc/<pid>/status.
    max_rss: u64,
    /// Highest RssAnon (heap, not file-backed pages) seen while polling, bytes (0 if unavailable).
    peak_anon: u64,
    outcome: Outcome,
}

impl ProcStat {
    /// Its wall time, or what went wrong.
    fn time(&self) -> Meas {
        match &self.outcome {
            Outcome::Ok => Ok(self.wall),
            Outcome::Timeout => Err(format!("timeout ({:.0} s)", self.wall)),
            Outcome::Failed(m) => Err(format!("failed: {m}")),
        }
    }
}

/// A time in seconds, or why there is none ("timeout ...", "failed: ...").
type Meas = Result<f64, String>;

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Whether `/usr/bin/time -f %M -o FILE` (GNU time) works here.
///
/// Why not wait4 on our own child: Rust spawns with vfork/posix_spawn, and Linux records the
/// max RSS of the pre-exec image (this whole benchmark process) in the child's `ru_maxrss`. GNU
/// time forks from a small process, so its `%M` is the program's own peak.
fn gnu_time() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        let Ok(f) = tempfile::NamedTempFile::new() else { return false };
        Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(f.path())
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && std::fs::read_to_string(f.path()).is_ok_and(|s| s.trim().parse::<u64>().is_ok())
    })
}

/// Kill the process group `pgid` (a child this bench spawned as the leader of its own group,
/// with whatever it started: GNU time and the program it runs).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
}

/// Run `program args`; wall time from spawn to exit, and its peak memory (see [`ProcStat`]).
/// Killed (with everything it started) after `timeout`.
fn run_measured(program: &Path, args: &[&OsStr], stdout: Stdio, timeout: Duration) -> ProcStat {
    let err_file = tempfile::NamedTempFile::new().unwrap();
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let wrapped = gnu_time();
    let mut cmd = if wrapped {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%M", "-o"]).arg(rss_file.path()).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).stdout(stdout).stderr(err_file.reopen().unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let wall = t0.elapsed().as_secs_f64();
        let _ = tx.send(());
        (status, wall)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut hwm, mut anon) = (0u64, 0u64);
            let mut target = if wrapped { None } else { Some(pid) };
            while !stop.load(Ordering::Relaxed) {
                if target.is_none() {
                    // the program is GNU time's only child
                    target = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                        .ok()
                        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
                }
                if let Some(t) = target {
                    hwm = hwm.max(status_kib(t, "VmHWM:").unwrap_or(0));
                    anon = anon.max(status_kib(t, "RssAnon:").unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (hwm * 1024, anon * 1024)
        })
    };
    let timed_out = rx.recv_timeout(timeout).is_err();
    if timed_out {
        kill_group(pid);
    }
    let (status, wall) = waiter.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let (hwm, peak_anon) = poll.join().unwrap();
    let max_rss = if wrapped {
        std::fs::read_to_string(rss_file.path())
            .ok()
            .and_then(|s| s.lines().last().and_then(|l| l.trim().parse::<u64>().ok()))
            .map(|k| k * 1024)
            .unwrap_or(hwm)
    } else {
        hwm
    };
    let stderr = std::fs::read_to_string(err_file.path()).unwrap_or_default();
    let outcome = if timed_out {
        Outcome::Timeout
    } else if status.is_ok_and(|s| s.success()) {
        Outcome::Ok
    } else {
        // GNU time adds "Command exited with non-zero status N" as the last line
        let last = stderr
            .lines()
            .rev()
            .find(|l| {
                !l.trim().is_empty() && !l.starts_with("Command exited with") && !l.starts_with("Command terminated")
            })
            .unwrap_or("(no message)");
        Outcome::Failed(last.chars().take(200).collect())
    };
    ProcStat { wall, max_rss, peak_anon, outcome }
}

/// Run this bench binary in one of its child modes; (stats, its stdout).
fn run_self(args: &[&OsStr], timeout: Duration) -> (ProcStat, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let s = run_measured(&std::env::current_exe().unwrap(), args, Stdio::from(out.reopen().unwrap()), timeout);
    (s, std::fs::read_to_string(out.path()).unwrap_or_default())
}

fn run_bin(args: &[&OsStr], timeout: Duration) -> ProcStat {
    run_measured(Path::new(BIN), args, Stdio::null(), timeout)
}

fn data_file(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".data");
    PathBuf::from(s)
}

/// The files of a model: itself and its `.data` if any.
fn files_of(p: &Path) -> Vec<PathBuf> {
    let d = data_file(p);
    let mut v = vec![p.to_path_buf()];
    if d.is_file() {
        v.push(d);
    }
    v
}

fn size_of(p: &Path) -> u64 {
    files_of(p).iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
}

fn remove_model(p: &Path) {
    let _ = std::fs::remove_file(p);
    let _ = std::fs::remove_file(data_file(p));
}

/// Flush every file system (`sync`), so that no write-back of an earlier run competes with the
/// next timed one.
fn settle() {
    let _ = Command::new("sync").status();
}

/// `cat f > copy` for every file of the model (each a measured child, as fuse is), then fsync of
/// the copy; returns (cat seconds, cat + fsync seconds). The copies are removed.
fn copy_model(src: &Path, dst_dir: &Path, timeout: Duration) -> (Meas, Meas) {
    let (mut cat, mut synced) = (0.0, 0.0);
    for f in files_of(src) {
        let dst = dst_dir.join(format!("copy-{}", f.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_file(&dst);
        let out = File::create(&dst).unwrap();
        let s = run_measured(Path::new("cat"), &[f.as_os_str()], Stdio::from(out), timeout);
        if let Err(e) = s.time() {
            let _ = std::fs::remove_file(&dst);
            return (Err(e.clone()), Err(e));
        }
        let t = Instant::now();
        File::open(&dst).unwrap().sync_all().unwrap();
        cat += s.wall;
        synced += s.wall + t.elapsed().as_secs_f64();
        std::fs::remove_file(&dst).unwrap();
    }
    (Ok(cat), Ok(synced))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of the runs, or the first failure among them.
fn median_meas(v: &[Meas]) -> Meas {
    let mut ok = vec![];
    for m in v {
        ok.push(m.clone()?);
    }
    if ok.is_empty() {
        return Err("not run".into());
    }
    Ok(median(&mut ok))
}

// ---------------------------------------------------------------------------------------------
// Child modes: tract alone, and the library's phases
// ---------------------------------------------------------------------------------------------

fn parse_shape(s: &str) -> Vec<usize> {
    s.split(',').map(|d| d.trim().parse().expect("a shape like 1,3,224,224")).collect()
}

/// `n` standard normal inputs of `shape` (seeded), as the check draws them.
fn normal_inputs(shape: &[usize], n: usize, seed: u64) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let len: usize = shape.iter().product();
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..len)
                .map(|_| {
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect();
            Tensor::from_shape(shape, &v).unwrap()
        })
        .collect()
}

/// Type (un-optimised, as the check) and run on every input: (type seconds, run seconds).
fn type_and_run(mut m: InferenceModel, shape: &[usize], inputs: &[Tensor]) -> (f64, f64) {
    let t0 = Instant::now();
    m.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape.iter().copied())).unwrap();
    let plan = m.into_typed().unwrap().into_runnable().unwrap();
    let t1 = Instant::now();
    for x in inputs {
        let out = plan.run(tvec![x.clone().into_tvalue()]).unwrap();
        assert!(!out.is_empty());
    }
    ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64())
}

/// `--plain-tract SHAPE SAMPLES MODEL...`: for each model in turn, tract load + typed
/// (un-optimised) plan + SAMPLES runs; prints `load type run` seconds per model.
fn child_plain(args: &[String]) {
    let shape = parse_shape(&args[0]);
    let samples: usize = args[1].parse().unwrap();
    let inputs = normal_inputs(&shape, samples, 0);
    for p in &args[2..] {
        let t0 = Instant::now();
        let m = tract_onnx::onnx().model_for_path(p).unwrap();
        let load = t0.elapsed().as_secs_f64();
        let (ty, run) = type_and_run(m, &shape, &inputs);
        println!("{load} {ty} {run}");
    }
}

/// Every float32 constant of `m` moved one unit in the last place, up or down at random: the
/// noise criterion's perturbed reference (src/tract/perturb.rs moves the weights the same way).
fn perturb_consts(m: &mut InferenceModel, seed: u64) {
    use tract_onnx::tract_core::ops::konst::Const;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids: Vec<(String, usize)> = m
        .nodes()
        .iter()
        .filter(|n| n.op_as::<Const>().is_some_and(|c| c.val().datum_type() == f32::datum_type()))
        .map(|n| (n.name.clone(), n.id))
        .collect();
    ids.sort();
    for (_, id) in ids {
        let node = m.node_mut(id);
        let t = node.op_as::<Const>().unwrap().val().clone();
        let v: Vec<f32> = t
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|&x| {
                let up: bool = rng.random();
                if x == 0.0 || !x.is_finite() {
                    x
                } else {
                    f32::from_bits((x.to_bits() as i64 + if up { 1 } else { -1 }) as u32)
                }
            })
            .collect();
        let p = Tensor::from_shape(t.shape(), &v).unwrap().into_arc_tensor();
        node.outputs[0].fact = InferenceFact::from(TypedFact::try_from(p.clone()).unwrap());
        node.op = Box::new(Const::new(p).unwrap());
    }
}

/// `--noise-tract SHAPE SAMPLES DRAWS MODEL`: load the reference once (`load S`), then DRAWS
/// times: a perturbed copy, typed and run on SAMPLES inputs (`draw perturb type run`).
fn child_noise(args: &[String]) {
    let shape = parse_shape(&args[0]);
    let samples: usize = args[1].parse().unwrap();
    let draws: usize = args[2].parse().unwrap();
    let inputs = normal_inputs(&shape, samples, 0);
    let t0 = Instant::now();
    let m = tract_onnx::onnx().model_for_path(&args[3]).unwrap();
    println!("load {}", t0.elapsed().as_secs_f64());
    for k in 0..draws {
        let t0 = Instant::now();
        let mut p = m.clone();
        perturb_consts(&mut p, 0x9e37_79b9 + k as u64);
        let perturb = t0.elapsed().as_secs_f64();
        let (ty, run) = type_and_run(p, &shape, &inputs);
        println!("draw {perturb} {ty} {run}");
    }
}

/// `--batch-tract SHAPE SAMPLES MODEL`: the model's SAMPLES runs as the check makes them (rounds of
/// one per core; a last round of fewer spreads each run's matrix products over the cores left
/// over) and as one run of the samples stacked on axis 0 (its matrix products on every core);
/// each with its plan typed (un-optimised) first; prints `rounds batched` seconds.
fn child_batch(args: &[String]) {
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let shape = parse_shape(&args[0]);
    let samples: usize = args[1].parse().unwrap();
    let m = tract_onnx::onnx().with_ignore_value_info(true).model_for_path(&args[2]).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan_of = |n: usize| {
        let mut m = m.clone();
        let mut s = shape.clone();
        s[0] *= n;
        m.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), s)).unwrap();
        m.into_typed().unwrap().into_runnable().unwrap()
    };
    let on = |threads: usize, f: &(dyn Fn() + Sync)| {
        if threads > 1 {
            multithread_tract_scope(Executor::multithread(threads), f)
        } else {
            f()
        }
    };
    let inputs = normal_inputs(&shape, samples, 0);
    let t = Instant::now();
    let plan = plan_of(1);
    for round in inputs.chunks(cores) {
        let per_run = cores / round.len();
        std::thread::scope(|scope| {
            for x in round {
                let plan = &plan;
                let on = &on;
                scope.spawn(move || {
                    on(per_run, &|| assert!(!plan.run(tvec![x.clone().into_tvalue()]).unwrap().is_empty()))
                });
            }
        });
    }
    let rounds = t.elapsed().as_secs_f64();
    drop(plan);
    let t = Instant::now();
    let plan = plan_of(samples);
    let x = Tensor::stack_tensors(0, &inputs).unwrap();
    on(cores, &|| assert!(!plan.run(tvec![x.clone().into_tvalue()]).unwrap().is_empty()));
    println!("{rounds} {}", t.elapsed().as_secs_f64());
}

/// `--phases verify|no-verify IN OUT`: `acnet_onnx::fuse_file_with` (what the CLI runs), timed at
/// its events; prints `key value` lines (see [`Phases`]).
fn child_phases(args: &[String]) {
    let opts = FuseOptions { no_verify: args[0] == "no-verify", ..Default::default() };
    let t0 = Instant::now();
    let mut marks: Vec<(&'static str, f64)> = vec![];
    let res = fuse_file_with(Path::new(&args[1]), Path::new(&args[2]), &opts, &mut |e| {
        let at = t0.elapsed().as_secs_f64();
        match e {
            Event::Fused(_) => marks.push(("fused", at)),
            Event::Checked(_) => marks.push(("checked", at)),
            Event::Wrote(_) => marks.push(("wrote", at)),
            _ => {}
        }
    });
    let total = t0.elapsed().as_secs_f64();
    let r = match res {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", acnet_onnx::one_line(&e.to_string()));
            std::process::exit(2);
        }
    };
    let at = |k: &str| marks.iter().find(|m| m.0 == k).map(|m| m.1);
    let fused = at("fused").unwrap_or(f64::NAN);
    println!("rewrite {fused}");
    if let Some(c) = at("checked") {
        println!("check {}", c - fused);
    }
    println!("write {}", at("wrote").unwrap_or(total) - at("checked").unwrap_or(fused));
    println!("total {total}");
    println!("merged {}", r.fuse.blocks_merged);
    println!("folded {}", r.fuse.bns_folded);
    println!("refused {}", r.fuse.refused.len());
    if let Some(c) = &r.check {
        println!("passed {}", c.passed);
    }
}

/// One run of `fuse_file_with` in a child process, timed at its events.
#[derive(Clone, Debug, Default)]
struct Phases {
    /// load + validate + rewrite (start to the `Fused` event)
    rewrite: f64,
    /// stage + check (`Fused` to `Checked`), with the check
    check: Option<f64>,
    /// stage + commit (without the check) or commit (with it)
    write: f64,
    total: f64,
    merged: usize,
    folded: usize,
    refused: usize,
    passed: Option<bool>,
}

fn phases(verify: bool, input: &Path, output: &Path, timeout: Duration) -> Result<Phases, String> {
    remove_model(output);
    settle();
    let (s, out) = run_self(
        &[
            "--phases".as_ref(),
            if verify { "verify" } else { "no-verify" }.as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ],
        timeout,
    );
    s.time()?;
    let mut p = Phases::default();
    for l in out.lines() {
        let Some((k, v)) = l.split_once(' ') else { continue };
        let f = || v.parse::<f64>().unwrap_or(f64::NAN);
        let u = || v.parse::<usize>().unwrap_or(0);
        match k {
            "rewrite" => p.rewrite = f(),
            "check" => p.check = Some(f()),
            "write" => p.write = f(),
            "total" => p.total = f(),
            "merged" => p.merged = u(),
            "folded" => p.folded = u(),
            "refused" => p.refused = u(),
            "passed" => p.passed = Some(v == "true"),
            _ => {}
        }
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// tract latency (in this process)
// ---------------------------------------------------------------------------------------------

fn input_tensor() -> Tensor {
    let mut rng = StdRng::seed_from_u64(1);
    let v: Vec<f32> = (0..3 * 224 * 224).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    tract_ndarray::Array4::from_shape_vec((1, 3, 224, 224), v).unwrap().into_tensor()
}

/// Optimised tract latency of several models: every plan is built first (optimise seconds), then
/// the models are run in turns (round-robin, one warm-up round), so that a change in the
/// machine's load hits them all alike. Returns (optimise seconds, run seconds of each round) per
/// model.
fn tract_latency(paths: &[&Path], input: &Tensor, runs: usize) -> Vec<(f64, Vec<f64>)> {
    let mut plans = vec![];
    let mut preps = vec![];
    for path in paths {
        let t0 = Instant::now();
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .with_input_fact(0, f32::fact([1usize, 3, 224, 224]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        preps.push(t0.elapsed().as_secs_f64());
        plans.push(plan);
    }
    let mut times: Vec<Vec<f64>> = vec![vec![]; plans.len()];
    for round in 0..=runs {
        for (plan, t) in plans.iter().zip(&mut times) {
            let t0 = Instant::now();
            plan.run(tvec![input.clone().into_tvalue()]).unwrap();
            if round > 0 {
                t.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    preps.into_iter().zip(times).collect()
}

// ---------------------------------------------------------------------------------------------
// The sections
// ---------------------------------------------------------------------------------------------

struct Config {
    runs: usize,
    lat_runs: usize,
    timeout: Duration,
    work: PathBuf,
}

impl Config {
    fn timeout_for(&self, arch: Arch) -> Duration {
        if arch.big() {
            self.timeout * 4
        } else {
            self.timeout
        }
    }
}

/// Section 1: one model file, `fuse --no-verify` against copying it.
struct FuseRow {
    v: Variant,
    size: u64,
    out_size: u64,
    cat: Meas,
    durable: Meas,
    fuse: Meas,
    max_rss: u64,
    peak_anon: u64,
    phases: Result<Phases, String>,
}

/// Section 2: the default fuse against the inferences the check needs.
struct CheckRow {
    v: Variant,
    /// the two models' combined size (input + fused output)
    combined: u64,
    fuse: Meas,
    fuse_rss: u64,
    /// reference then fused: (load, type, run) seconds, medians
    plain_parts: Option<[(f64, f64, f64); 2]>,
    /// wall time of the process doing the plain inferences
    plain: Meas,
    plain_rss: u64,
    /// the criterion's extra inferences: perturb + type + runs, for all draws (load not counted)
    noise: Meas,
    /// (perturb, type, run) of all draws, medians
    noise_parts: Option<(f64, f64, f64)>,
    verify: Meas,
    verify_rss: u64,
    phases: Result<Phases, String>,
    /// the reference's samples run as the check runs them, and as one batch: (rounds, batched) s
    batch: Option<(f64, f64)>,
}

/// The fused output of `fuse --no-verify` of a variant, kept for sections 2 and 5.
fn fused_path(cfg: &Config, v: &Variant) -> PathBuf {
    cfg.work.join(format!("{}-fused.onnx", v.tag()))
}

fn section_fuse(cfg: &Config, v: &Variant) -> FuseRow {
    let out = fused_path(cfg, v);
    let timeout = cfg.timeout_for(v.arch);
    let (mut cats, mut durables, mut fuses) = (vec![], vec![], vec![]);
    let (mut max_rss, mut peak_anon) = (0, 0);
    for _ in 0..cfg.runs {
        // each timed run starts with no dirty pages of an earlier one being written back
        settle();
        let (c, d) = copy_model(&v.path, &cfg.work, timeout);
        cats.push(c);
        durables.push(d);
        remove_model(&out);
        settle();
        let s = run_bin(
            &["fuse".as_ref(), "--no-verify".as_ref(), v.path.as_os_str(), "-o".as_ref(), out.as_os_str()],
            timeout,
        );
        fuses.push(s.time());
        max_rss = max_rss.max(s.max_rss);
        peak_anon = peak_anon.max(s.peak_anon);
        if s.outcome != Outcome::Ok {
            break;
        }
    }
    let out_size = size_of(&out);
    let fuse = median_meas(&fuses);
    // the library's phases, in a child: it writes the same output
    let phases = if fuse.is_ok() { phases(false, &v.path, &out, timeout) } else { Err("not run".into()) };
    let row = FuseRow {
        v: v.clone(),
        size: size_of(&v.path),
        out_size,
        cat: median_meas(&cats),
        durable: median_meas(&durables),
        fuse,
        max_rss,
        peak_anon,
        phases,
    };
    eprintln!(
        "[{}] {} MiB: fuse --no-verify {}, durable copy {}, cat {}, peak RSS {} MiB",
        v.tag(),
        mib(row.size),
        secs(&row.fuse),
        secs(&row.durable),
        secs(&row.cat),
        mib(row.max_rss)
    );
    row
}

/// The fused output for sections 2 and 5 when section 1 did not make it.
fn ensure_fused(cfg: &Config, v: &Variant) -> bool {
    let out = fused_path(cfg, v);
    if out.is_file() {
        return true;
    }
    let s = run_bin(
        &["fuse".as_ref(), "--no-verify".as_ref(), v.path.as_os_str(), "-o".as_ref(), out.as_os_str()],
        cfg.timeout_for(v.arch),
    );
    if let Err(e) = s.time() {
        eprintln!("[{}] fuse --no-verify {e}", v.tag());
        return false;
    }
    true
}

fn parse_plain(out: &str) -> Option<[(f64, f64, f64); 2]> {
    let rows: Vec<Vec<f64>> =
        out.lines().map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect()).collect();
    if rows.len() != 2 || rows.iter().any(|r| r.len() != 3) {
        return None;
    }
    Some([(rows[0][0], rows[0][1], rows[0][2]), (rows[1][0], rows[1][1], rows[1][2])])
}

/// The noise child's draws: (perturb, type, run) seconds, summed over the draws.
fn parse_noise(out: &str) -> Option<(f64, f64, f64)> {
    let draws: Vec<Vec<f64>> = out
        .lines()
        .filter_map(|l| l.strip_prefix("draw "))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse::<f64>().ok()).collect())
        .collect();
    if draws.len() != NOISE_DRAWS || draws.iter().any(|d| d.len() != 3) {
        return None;
    }
    Some(draws.iter().fold((0.0, 0.0, 0.0), |a, d| (a.0 + d[0], a.1 + d[1], a.2 + d[2])))
}

fn section_check(cfg: &Config, v: &Variant) -> CheckRow {
    let timeout = cfg.timeout_for(v.arch);
    let fused = fused_path(cfg, v);
    let checked = cfg.work.join(format!("{}-checked.onnx", v.tag()));
    let shape = format!("1,3,{0},{0}", v.arch.side());
    let samples = CHECK_SAMPLES.to_string();
    let draws = NOISE_DRAWS.to_string();
    let mut row = CheckRow {
        v: v.clone(),
        combined: size_of(&v.path) + size_of(&fused),
        fuse: Err("not run".into()),
        fuse_rss: 0,
        plain_parts: None,
        plain: Err("not run".into()),
        plain_rss: 0,
        noise: Err("not run".into()),
        noise_parts: None,
        verify: Err("not run".into()),
        verify_rss: 0,
        phases: Err("not run".into()),
        batch: None,
    };
    if !fused.is_file() {
        row.fuse = Err("no fused model".into());
        return row;
    }
    let (mut fuses, mut plains, mut noises) = (vec![], vec![], vec![]);
    let mut parts: Vec<[(f64, f64, f64); 2]> = vec![];
    let mut noise_parts: Vec<(f64, f64, f64)> = vec![];
    for _ in 0..cfg.runs {
        // the three in turns, so that a change in the machine's load hits them alike
        remove_model(&checked);
        settle();
        let s = run_bin(&["fuse".as_ref(), v.path.as_os_str(), "-o".as_ref(), checked.as_os_str()], timeout);
        fuses.push(s.time());
        row.fuse_rss = row.fuse_rss.max(s.max_rss);
        remove_model(&checked);
        settle();
        let (s, out) = run_self(
            &["--plain-tract".as_ref(), shape.as_ref(), samples.as_ref(), v.path.as_os_str(), fused.as_os_str()],
            timeout,
        );
        row.plain_rss = row.plain_rss.max(s.max_rss);
        match (s.time(), parse_plain(&out)) {
            (Ok(t), Some(p)) => {
                plains.push(Ok(t));
                parts.push(p);
            }
            (Ok(_), None) => plains.push(Err(format!("unreadable output {out:?}"))),
            (Err(e), _) => plains.push(Err(e)),
        }
        settle();
        let (s, out) = run_self(
            &["--noise-tract".as_ref(), shape.as_ref(), samples.as_ref(), draws.as_ref(), v.path.as_os_str()],
            timeout,
        );
        match (s.time(), parse_noise(&out)) {
            (Ok(_), Some(p)) => {
                noises.push(Ok(p.0 + p.1 + p.2));
                noise_parts.push(p);
            }
            (Ok(_), None) => noises.push(Err(format!("unreadable output {out:?}"))),
            (Err(e), _) => noises.push(Err(e)),
        }
        if fuses.iter().chain(&plains).chain(&noises).any(|m| m.is_err()) {
            break;
        }
    }
    row.fuse = median_meas(&fuses);
    row.plain = median_meas(&plains);
    row.noise = median_meas(&noises);
    if !parts.is_empty() {
        let comp =
            |m: usize, f: fn(&(f64, f64, f64)) -> f64| median(&mut parts.iter().map(|p| f(&p[m])).collect::<Vec<_>>());
        row.plain_parts = Some([0, 1].map(|m| (comp(m, |p| p.0), comp(m, |p| p.1), comp(m, |p| p.2))));
    }
    if !noise_parts.is_empty() {
        let comp = |f: fn(&(f64, f64, f64)) -> f64| median(&mut noise_parts.iter().map(f).collect::<Vec<_>>());
        row.noise_parts = Some((comp(|p| p.0), comp(|p| p.1), comp(|p| p.2)));
    }
    // the check alone (once): its time and peak memory
    settle();
    let s = run_bin(&["verify".as_ref(), v.path.as_os_str(), fused.as_os_str()], timeout);
    row.verify = s.time();
    row.verify_rss = s.max_rss;
    // batching the samples (once): what it would save
    settle();
    let (s, out) = run_self(&["--batch-tract".as_ref(), shape.as_ref(), samples.as_ref(), v.path.as_os_str()], timeout);
    let t: Vec<f64> = out.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    row.batch = (s.time().is_ok() && t.len() == 2).then(|| (t[0], t[1]));
    if row.fuse.is_ok() {
        row.phases = phases(true, &v.path, &checked, timeout);
        if let Ok(p) = &row.phases {
            if p.passed == Some(false) {
                row.fuse = Err("the check failed".into());
            }
        }
    }
    remove_model(&checked);
    eprintln!(
        "[{}] fuse {} vs plain inferences {} (noise inferences {}), verify {}, peak RSS fuse {} / verify {} MiB",
        v.tag(),
        secs(&row.fuse),
        secs(&row.plain),
        secs(&row.noise),
        secs(&row.verify),
        mib(row.fuse_rss),
        mib(row.verify_rss)
    );
    row
}

struct ChainRow {
    blocks: usize,
    size: u64,
    fuse: Meas,
    runs: usize,
    max_rss: u64,
    phases: Result<Phases, String>,
}

fn section_chain(cfg: &Config, dir: &Path, sizes: &[usize]) -> Vec<ChainRow> {
    let mut rows: Vec<ChainRow> = vec![];
    for &n in sizes {
        if let Some(prev) = rows.iter().find(|r| r.fuse.as_ref().is_err_and(|e| e.starts_with("timeout"))) {
            rows.push(ChainRow {
                blocks: n,
                size: 0,
                fuse: Err(format!("skipped ({} blocks timed out)", prev.blocks)),
                runs: 0,
                max_rss: 0,
                phases: Err("not run".into()),
            });
            continue;
        }
        let t = Instant::now();
        let path = generate_chain(dir, n);
        eprintln!("[chain-{n}] model ready in {:.1} s", t.elapsed().as_secs_f64());
        let out = cfg.work.join(format!("chain-{n}-fused.onnx"));
        let (mut fuses, mut max_rss) = (vec![], 0);
        for _ in 0..cfg.runs {
            remove_model(&out);
            settle();
            let s = run_bin(
                &["fuse".as_ref(), "--no-verify".as_ref(), path.as_os_str(), "-o".as_ref(), out.as_os_str()],
                cfg.timeout,
            );
            fuses.push(s.time());
            max_rss = max_rss.max(s.max_rss);
            if s.outcome != Outcome::Ok || s.wall > CHAIN_REPEAT_LIMIT {
                break;
            }
        }
        let fuse = median_meas(&fuses);
        // the phases need one more run: not for the slow sizes
        let phases = match fuse {
            Ok(t) if t <= CHAIN_REPEAT_LIMIT => phases(false, &path, &out, cfg.timeout),
            Ok(_) => Err("(slow: not run)".into()),
            Err(_) => Err("-".into()),
        };
        remove_model(&out);
        eprintln!("[chain-{n}] fuse --no-verify {} ({} run(s))", secs(&fuse), fuses.len());
        rows.push(ChainRow { blocks: n, size: size_of(&path), fuse, runs: fuses.len(), max_rss, phases });
    }
    rows
}

struct LatRow {
    arch: Arch,
    what: String,
    prep: f64,
    median: f64,
    min: f64,
    /// median over rounds of (this model's time / the baseline's time in the same round)
    vs_base: f64,
}

fn section_latency(cfg: &Config, models: &Models, input: &Tensor) -> Vec<LatRow> {
    let Some(baseline) = &models.baseline else { return vec![] };
    let mut lat_models: Vec<(String, PathBuf)> = vec![];
    for v in models.acnet.iter().filter(|v| !v.external) {
        if !ensure_fused(cfg, v) {
            continue;
        }
        lat_models.push((format!("ACNet ({})", v.style.label()), v.path.clone()));
        lat_models.push((format!("fused ({})", v.style.label()), fused_path(cfg, v)));
    }
    lat_models.push(("baseline".into(), baseline.clone()));
    let paths: Vec<&Path> = lat_models.iter().map(|m| m.1.as_path()).collect();
    let res = tract_latency(&paths, input, cfg.lat_runs);
    let base = res.last().unwrap().1.clone(); // the baseline is the last model
    let arch = models.acnet[0].arch;
    let mut rows = vec![];
    for ((what, _), (prep, times)) in lat_models.iter().zip(res) {
        // paired: this model's time over the baseline's in the same round
        let mut ratios: Vec<f64> = times.iter().zip(&base).map(|(t, b)| t / b).collect();
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let med = median(&mut times.clone());
        eprintln!("[{}] latency {what}: median {:.1} ms (optimise {:.1} s)", arch.name(), med * 1e3, prep);
        rows.push(LatRow { arch, what: what.clone(), prep, median: med, min, vs_base: median(&mut ratios) });
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

fn secs(m: &Meas) -> String {
    match m {
        Ok(s) if *s < 10.0 => format!("{s:.3}"),
        Ok(s) => format!("{s:.1}"),
        Err(e) => e.clone(),
    }
}

/// `a / b` as `x.xx`, or `-` when either is missing.
fn ratio(a: &Meas, b: &Meas) -> Option<f64> {
    match (a, b) {
        (Ok(a), Ok(b)) if *b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}"))
}

/// One target: the worst ratio measured against its limit.
struct Target {
    what: String,
    limit: f64,
    worst: Option<(f64, String)>,
    failures: Vec<String>,
    /// when the worst is only a lower bound (from a run that timed out)
    at_least: bool,
    /// a run timed out: missed whatever the ratios measured
    timed_out: bool,
}

impl Target {
    fn new(what: impl Into<String>, limit: f64) -> Target {
        Target { what: what.into(), limit, worst: None, failures: vec![], at_least: false, timed_out: false }
    }
    fn add(&mut self, r: Option<f64>, label: String) {
        match r {
            Some(r) if self.worst.as_ref().is_none_or(|w| r > w.0) => self.worst = Some((r, label)),
            Some(_) => {}
            None => self.failures.push(label),
        }
    }
    fn line(&self) -> String {
        let failed = if self.failures.is_empty() {
            String::new()
        } else {
            format!("; not measured: {}", self.failures.join(", "))
        };
        match &self.worst {
            None if self.failures.is_empty() => {
                format!("- {} (<= {}x): not measured in this run", self.what, self.limit)
            }
            None => format!("- {} (<= {}x): **MISSED**{failed}", self.what, self.limit),
            Some((w, label)) => {
                let met = *w <= self.limit && self.failures.is_empty() && !self.timed_out;
                format!(
                    "- {} (<= {}x): {} (worst {}{w:.2}x, {label}){failed}",
                    self.what,
                    self.limit,
                    if met { "met" } else { "**MISSED**" },
                    if self.at_least { ">= " } else { "" }
                )
            }
        }
    }
}

fn fmt_phases(p: &Result<Phases, String>, verify: bool) -> String {
    match p {
        Ok(p) if verify => format!("{:.3} / {:.3} / {:.3}", p.rewrite, p.check.unwrap_or(f64::NAN), p.write),
        Ok(p) => format!("{:.3} / {:.3}", p.rewrite, p.write),
        Err(e) => e.clone(),
    }
}

fn print_fuse_table(rows: &[&FuseRow], t_time: &mut Target, t_mem: &mut Target) {
    println!("| model | style | weights | size MiB | fused MiB | cat s | durable copy s | fuse s | **fuse / durable copy** | fuse / cat | peak RSS MiB | (anon) | **peak / size** | load+rewrite / write s | merged / BN folded / refused |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for r in rows {
        let label = format!("{} {} {}", r.v.arch.label(), r.v.style.label(), r.v.weights());
        let tr = ratio(&r.fuse, &r.durable);
        let mr = r.fuse.is_ok().then(|| r.max_rss as f64 / r.size as f64);
        t_time.add(tr, label.clone());
        t_mem.add(mr, label);
        let counts = match &r.phases {
            Ok(p) => format!("{} / {} / {}", p.merged, p.folded, p.refused),
            Err(_) => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | **{}** | {} | {} |",
            r.v.arch.label(),
            r.v.style.label(),
            r.v.weights(),
            mib(r.size),
            mib(r.out_size),
            secs(&r.cat),
            secs(&r.durable),
            secs(&r.fuse),
            fmt_ratio(tr),
            fmt_ratio(ratio(&r.fuse, &r.cat)),
            mib(r.max_rss),
            mib(r.peak_anon),
            fmt_ratio(mr),
            fmt_phases(&r.phases, false),
            counts
        );
    }
}

fn print_check_table(rows: &[&CheckRow], nv: &[FuseRow], t_time: &mut Target, t_mem: &mut Target) {
    println!("| model | style | weights | fuse s | fuse --no-verify s | plain inferences s | **fuse / plain** | noise inferences s | noise / plain | fuse / (plain + noise) | load+rewrite / stage+check / write s | verify s | models MiB | fuse peak MiB | **fuse peak / models** | verify peak MiB | verify peak / models | plain inferences peak MiB |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let label = format!("{} {} {}", r.v.arch.label(), r.v.style.label(), r.v.weights());
        let no_verify = nv.iter().find(|f| f.v.path == r.v.path).map_or(Err("-".into()), |f| f.fuse.clone());
        let tr = ratio(&r.fuse, &r.plain);
        let mr = r.fuse.is_ok().then(|| r.fuse_rss as f64 / r.combined as f64);
        t_time.add(tr, label.clone());
        t_mem.add(mr, label);
        let both = match (&r.plain, &r.noise) {
            (Ok(p), Ok(n)) => Ok(p + n),
            _ => Err("-".to_string()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} |",
            r.v.arch.label(),
            r.v.style.label(),
            r.v.weights(),
            secs(&r.fuse),
            secs(&no_verify),
            secs(&r.plain),
            fmt_ratio(tr),
            secs(&r.noise),
            fmt_ratio(ratio(&r.noise, &r.plain)),
            fmt_ratio(ratio(&r.fuse, &both)),
            fmt_phases(&r.phases, true),
            secs(&r.verify),
            mib(r.combined),
            mib(r.fuse_rss),
            fmt_ratio(mr),
            mib(r.verify_rss),
            fmt_ratio(r.verify.is_ok().then(|| r.verify_rss as f64 / r.combined as f64)),
            mib(r.plain_rss),
        );
    }
    println!();
    println!("Where the inferences' time goes (medians; s; measured inside the child processes):");
    println!();
    println!("| model | style | weights | plain, reference: load / type / {CHECK_SAMPLES} runs | plain, fused: load / type / {CHECK_SAMPLES} runs | noise, {NOISE_DRAWS} draws: perturb / type / {CHECK_SAMPLES} runs |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let f = |p: &(f64, f64, f64)| format!("{:.3} / {:.3} / {:.3}", p.0, p.1, p.2);
        let (a, b) = r.plain_parts.as_ref().map_or(("-".into(), "-".into()), |p| (f(&p[0]), f(&p[1])));
        let n = r.noise_parts.as_ref().map_or("-".into(), f);
        println!("| {} | {} | {} | {a} | {b} | {n} |", r.v.arch.label(), r.v.style.label(), r.v.weights());
    }
    println!();
    println!("Batching the samples (measured, not what the check does): the reference's {CHECK_SAMPLES} runs as the check makes them (rounds of one per core) against one run of the {CHECK_SAMPLES} samples stacked on axis 0 (its matrix products on every core); plans typed un-optimised, each figure once:");
    println!();
    println!("| model | style | weights | rounds s | one batched run s | batched / rounds |");
    println!("|---|---|---|---:|---:|---:|");
    for r in rows {
        let (a, b, q) = r.batch.map_or(("-".into(), "-".into(), "-".into()), |(a, b)| {
            (format!("{a:.3}"), format!("{b:.3}"), format!("{:.2}", b / a))
        });
        println!("| {} | {} | {} | {a} | {b} | {q} |", r.v.arch.label(), r.v.style.label(), r.v.weights());
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

fn gib_kib(k: Option<u64>) -> String {
    k.map_or("?".into(), |k| format!("{:.1} GiB", k as f64 / (1 << 20) as f64))
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The file system of `dir`: device, type, size, free (from `df -PT`).
fn filesystem(dir: &Path) -> String {
    let Some(out) = command_line("df", &["-PT", &dir.to_string_lossy()]) else { return "?".into() };
    let Some(line) = out.lines().nth(1) else { return "?".into() };
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 7 {
        return line.into();
    }
    let gib = |k: &str| k.parse::<f64>().map_or("?".into(), |k| format!("{:.0} GiB", k / (1 << 20) as f64));
    let rotational = Path::new(f[0])
        .file_name()
        .and_then(|d| {
            std::fs::read_to_string(format!("/sys/class/block/{}/queue/rotational", d.to_string_lossy())).ok()
        })
        .map(|r| if r.trim() == "1" { ", rotational per the kernel" } else { ", non-rotational" })
        .unwrap_or("");
    format!("{} {} mounted on {} ({} size, {} free{rotational})", f[0], f[1], f[6], gib(f[2]), gib(f[4]))
}

/// The version of a package in Cargo.lock.
fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == format!("name = \"{name}\"") {
            if let Some(v) = lines.next().and_then(|v| v.trim().strip_prefix("version = ")) {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "?".into()
}

fn machine(dir: &Path) -> Vec<String> {
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    vec![
        format!("- cores: {} ({})", cores(), cpu_model()),
        format!(
            "- RAM: {} total, {} available at the start",
            gib_kib(meminfo_kib("MemTotal:")),
            gib_kib(meminfo_kib("MemAvailable:"))
        ),
        format!("- OS: {} {kernel} {}", std::env::consts::OS, std::env::consts::ARCH),
        format!("- models folder: {} on {}", dir.display(), filesystem(dir)),
        format!(
            "- {}, tract-onnx {}, coreutils cat ({}), peak RSS from {}",
            command_line("rustc", &["-V"]).unwrap_or_else(|| "rustc ?".into()),
            locked_version("tract-onnx"),
            command_line("cat", &["--version"])
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| "?".into()),
            if gnu_time() { "GNU time %M" } else { "polled VmHWM" }
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

const SECTIONS: [&str; 4] = ["fuse", "check", "chain", "latency"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(|s| s.as_str()) {
        Some("--plain-tract") => return child_plain(&args[1..]),
        Some("--noise-tract") => return child_noise(&args[1..]),
        Some("--phases") => return child_phases(&args[1..]),
        Some("--batch-tract") => return child_batch(&args[1..]),
        _ => {}
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without --bench: nothing to do
        println!("perf: run with `cargo bench --bench perf` (skipped)");
        return;
    }
    // what to run: models and sections, from the environment and the command line
    let mut archs: Vec<Arch> = vec![];
    let mut no_models = false;
    let mut sections: Vec<&str> = vec![];
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let (models_env, sections_env) = (env("ACNET_BENCH_MODELS"), env("ACNET_BENCH_SECTIONS"));
    let words = models_env.split(',').chain(sections_env.split(',')).chain(args.iter().map(|s| s.as_str()));
    for w in words {
        let w = w.trim().to_lowercase().replace(['-', '_'], "");
        let arch = match w.as_str() {
            "resnet50" | "50" | "quick" => Some(Arch::ResNet50),
            "resnet152" | "152" => Some(Arch::ResNet152),
            "resnet152x3" | "big" | "scale" => Some(Arch::ResNet152x3),
            "none" => {
                no_models = true;
                None
            }
            "" | "bench" => None,
            s => {
                if let Some(s) = SECTIONS.iter().find(|x| **x == s) {
                    if !sections.contains(s) {
                        sections.push(s);
                    }
                } else {
                    eprintln!("perf: ignoring {s:?} (models: resnet50, resnet152, big, none; sections: {SECTIONS:?})");
                }
                None
            }
        };
        if let Some(a) = arch.filter(|a| !archs.contains(a)) {
            archs.push(a);
        }
    }
    if archs.is_empty() && !no_models {
        archs = vec![Arch::ResNet50, Arch::ResNet152];
    }
    // the big model last: it is the slowest
    archs.sort_by_key(|a| a.big());
    if sections.is_empty() {
        sections = SECTIONS.to_vec();
    }
    let on = |s: &str| sections.contains(&s);
    let chain_sizes: Vec<usize> = {
        let s = std::env::var("ACNET_BENCH_CHAIN").unwrap_or_else(|_| "1000,4000,16000".into());
        s.split(',').filter_map(|n| n.trim().parse().ok()).filter(|&n| n > 0).collect()
    };
    let dir = std::env::var_os("ACNET_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("bench-models"));
    std::fs::create_dir_all(&dir).unwrap();
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = Config {
        runs: env_usize("ACNET_BENCH_RUNS", 3),
        lat_runs: env_usize("ACNET_BENCH_LATENCY_RUNS", 9),
        timeout: Duration::from_secs(env_usize("ACNET_BENCH_TIMEOUT", 300) as u64),
        work,
    };
    let machine_lines = machine(&dir);
    for l in &machine_lines {
        eprintln!("perf: {}", &l[2..]);
    }
    eprintln!(
        "perf: models {:?}, sections {:?}, chain {:?}; {} run(s) each, {} latency round(s), timeout {} s; binary {BIN}",
        archs.iter().map(|a| a.name()).collect::<Vec<_>>(),
        sections,
        chain_sizes,
        cfg.runs,
        cfg.lat_runs,
        cfg.timeout.as_secs()
    );
    let load_start = loadavg();
    let busy = load_start.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l > 0.5);
    if busy {
        eprintln!("perf: warning: load average {load_start} at the start; other processes will skew the timings");
    }

    let t_all = Instant::now();
    let input = input_tensor();
    let (mut fuse_rows, mut check_rows, mut lat_rows) = (vec![], vec![], vec![]);
    let model_sections = on("fuse") || on("check") || on("latency");
    for &arch in archs.iter().filter(|_| model_sections) {
        let models = generate(&dir, arch);
        for v in &models.acnet {
            if on("fuse") {
                fuse_rows.push(section_fuse(&cfg, v));
            }
        }
        for v in &models.acnet {
            if on("check") && ensure_fused(&cfg, v) {
                check_rows.push(section_check(&cfg, v));
            }
        }
        if on("latency") {
            lat_rows.extend(section_latency(&cfg, &models, &input));
        }
        for v in &models.acnet {
            remove_model(&fused_path(&cfg, v));
        }
    }
    let chain_rows =
        if on("chain") && !chain_sizes.is_empty() { section_chain(&cfg, &dir, &chain_sizes) } else { vec![] };

    // ------------------------------------------------------------------ report
    let mut t_fuse = Target::new("`fuse --no-verify` / durable copy (ResNet-50/152, every style)", 2.0);
    let mut t_fuse_mem = Target::new("`fuse --no-verify` peak RSS / model size", 1.5);
    let mut t_check = Target::new("default `fuse` / its plain inferences", 1.5);
    let mut t_check_mem = Target::new("default `fuse` peak RSS / the two models' size", 1.25);
    let mut t_chain = Target::new(
        format!(
            "chain: time per block, slowest / fastest ({} blocks)",
            chain_sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" / ")
        ),
        2.0,
    );
    let mut t_big = Target::new("at scale: `fuse --no-verify` / durable copy (ResNet-152 3x width, 2.8 GB)", 2.0);
    let mut t_big_mem = Target::new("at scale: `fuse --no-verify` peak RSS / model size", 1.5);
    let mut t_big_check = Target::new("at scale: default `fuse` / its plain inferences (64x64)", 1.5);
    let mut t_big_check_mem = Target::new("at scale: default `fuse` peak RSS / the two models' size", 1.25);
    let mut t_lat = Target::new("fused latency / baseline latency (tract optimised)", 1.05);

    println!();
    println!("# acnet-onnx perf");
    println!();
    for l in &machine_lines {
        println!("{l}");
    }
    println!("- load average (1/5/15 min): {load_start} at the start, {} at the end", loadavg());
    println!(
        "- each figure: median of {} run(s) (each after `sync`); latency: median of {} round(s); timeout {} s",
        cfg.runs,
        cfg.lat_runs,
        cfg.timeout.as_secs()
    );
    if busy || cores() <= 2 {
        println!(
            "- **noisy**: {} core(s){}; ratios of runs made side by side are steadier than the times",
            cores(),
            if busy { format!(", load average {load_start} at the start") } else { String::new() }
        );
    }

    let small_fuse: Vec<&FuseRow> = fuse_rows.iter().filter(|r| !r.v.arch.big()).collect();
    if !small_fuse.is_empty() {
        println!();
        println!("## 1. `fuse --no-verify` vs copying the same bytes");
        println!();
        println!("Durable copy: `cat` of the .onnx and its .data, then fsync of each copy. Targets: fuse <= 2x durable copy, peak RSS <= 1.5x the model's size.");
        println!();
        print_fuse_table(&small_fuse, &mut t_fuse, &mut t_fuse_mem);
    }
    let small_check: Vec<&CheckRow> = check_rows.iter().filter(|r| !r.v.arch.big()).collect();
    if !small_check.is_empty() {
        println!();
        println!(
            "## 2. default `fuse` (the check: {CHECK_SAMPLES} samples, noise criterion) vs the inferences it needs"
        );
        println!();
        println!("Plain inferences: one fresh process, tract load + `into_typed().into_runnable()` + {CHECK_SAMPLES} runs of the reference, then of the fused model. Noise inferences (what the criterion adds, not in the plain inferences): a perturbed copy of the loaded reference (every float constant one ulp off), typed and run {CHECK_SAMPLES} times, x{NOISE_DRAWS}. `verify`: the check alone, once. Targets: fuse <= 1.5x plain inferences, fuse peak RSS <= 1.25x the two models' combined size.");
        println!();
        print_check_table(&small_check, &fuse_rows, &mut t_check, &mut t_check_mem);
    }
    if !chain_rows.is_empty() {
        println!();
        println!("## 3. chain of tiny ACNet blocks: `fuse --no-verify` time per block");
        println!();
        println!("4 channels, 8x8; per block a 3x3, 3x1 and 1x3 conv with bias, `Add(Add(sq, ver), hor)`, Relu. Target: time per block within 2x across the sizes.");
        println!();
        println!("| blocks | model KiB | runs | fuse s | us / block | per block vs the fastest | growth exponent (vs previous size) | load+rewrite / write s | peak RSS MiB |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---|---:|");
        let per_block: Vec<Option<f64>> =
            chain_rows.iter().map(|r| r.fuse.as_ref().ok().map(|t| t / r.blocks as f64)).collect();
        let fastest = per_block.iter().flatten().cloned().fold(f64::INFINITY, f64::min);
        let slowest = per_block.iter().flatten().cloned().fold(0.0, f64::max);
        let mut prev: Option<(usize, f64)> = None;
        for (r, pb) in chain_rows.iter().zip(&per_block) {
            let timeout = r.fuse.as_ref().is_err_and(|e| e.starts_with("timeout"));
            // a timed-out run: the time per block is at least the timeout's
            let bound = timeout.then(|| cfg.timeout.as_secs_f64() / r.blocks as f64);
            let shown = pb.or(bound);
            let exponent = match (prev, r.fuse.as_ref().ok().or(timeout.then_some(&cfg.timeout.as_secs_f64()))) {
                (Some((n0, t0)), Some(t)) => {
                    let e = (t / t0).ln() / (r.blocks as f64 / n0 as f64).ln();
                    format!("{}{e:.2}", if timeout { ">= " } else { "" })
                }
                _ => "-".into(),
            };
            if let Ok(t) = r.fuse {
                prev = Some((r.blocks, t));
            }
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.blocks,
                if r.size > 0 { format!("{:.0}", r.size as f64 / 1024.0) } else { "-".into() },
                r.runs,
                secs(&r.fuse),
                shown.map_or("-".into(), |p| format!("{}{:.1}", if timeout { ">= " } else { "" }, p * 1e6)),
                shown.filter(|_| fastest.is_finite()).map_or("-".into(), |p| format!(
                    "{}{:.2}",
                    if timeout { ">= " } else { "" },
                    p / fastest
                )),
                exponent,
                fmt_phases(&r.phases, false),
                if r.max_rss > 0 { mib(r.max_rss) } else { "-".into() }
            );
            if timeout {
                t_chain.timed_out = true;
                let b = bound.unwrap() / fastest;
                if t_chain.worst.as_ref().is_none_or(|w| b > w.0) {
                    t_chain.worst = Some((b, format!("{} blocks timed out", r.blocks)));
                    t_chain.at_least = true;
                }
            } else if r.fuse.is_err() && !r.fuse.as_ref().is_err_and(|e| e.starts_with("skipped")) {
                t_chain.failures.push(format!("{} blocks", r.blocks));
            }
        }
        if per_block.iter().flatten().count() < 2 && !t_chain.timed_out {
            t_chain.failures.push("fewer than two sizes measured".into());
        }
        if fastest.is_finite() {
            let n = chain_rows.iter().zip(&per_block).find(|(_, p)| **p == Some(slowest)).map_or(0, |(r, _)| r.blocks);
            let x = slowest / fastest;
            if t_chain.worst.as_ref().is_none_or(|w| x >= w.0) {
                t_chain.worst = Some((x, format!("{n} blocks")));
                t_chain.at_least = false;
            }
        }
    }
    let big_fuse: Vec<&FuseRow> = fuse_rows.iter().filter(|r| r.v.arch.big()).collect();
    let big_check: Vec<&CheckRow> = check_rows.iter().filter(|r| r.v.arch.big()).collect();
    if !big_fuse.is_empty() || !big_check.is_empty() {
        println!();
        println!("## 4. at scale: ResNet-152 ACNet, 3x width, BN nodes, external data, input 1x3x64x64");
        println!();
        if !big_fuse.is_empty() {
            print_fuse_table(&big_fuse, &mut t_big, &mut t_big_mem);
            println!();
        }
        if !big_check.is_empty() {
            print_check_table(&big_check, &fuse_rows, &mut t_big_check, &mut t_big_check_mem);
        }
    }
    if !lat_rows.is_empty() {
        println!();
        println!("## 5. tract latency, optimised plan (`into_optimized`), batch 1, 224x224");
        println!();
        println!("| model | network | median ms | min ms | vs baseline (paired median) | optimise s |");
        println!("|---|---|---:|---:|---:|---:|");
        for r in &lat_rows {
            if r.what.starts_with("fused") {
                t_lat.add(Some(r.vs_base), format!("{} {}", r.arch.label(), r.what));
            }
            println!(
                "| {} | {} | {:.1} | {:.1} | {:+.1}% | {:.2} |",
                r.arch.label(),
                r.what,
                r.median * 1e3,
                r.min * 1e3,
                (r.vs_base - 1.0) * 100.0,
                r.prep
            );
        }
    }
    println!();
    println!("## targets");
    println!();
    for t in [
        &t_fuse,
        &t_fuse_mem,
        &t_check,
        &t_check_mem,
        &t_chain,
        &t_big,
        &t_big_mem,
        &t_big_check,
        &t_big_check_mem,
        &t_lat,
    ] {
        println!("{}", t.line());
    }
    let worst_cat = fuse_rows
        .iter()
        .filter_map(|r| ratio(&r.fuse, &r.cat).map(|x| (x, r)))
        .max_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    if let Some((x, r)) = worst_cat {
        println!(
            "- (no target) `fuse --no-verify` / plain `cat`: worst {x:.2}x ({} {} {})",
            r.v.arch.label(),
            r.v.style.label(),
            r.v.weights()
        );
    }
    println!();
    println!("total bench time {:.0} s; load average at the end {}", t_all.elapsed().as_secs_f64(), loadavg());
}
