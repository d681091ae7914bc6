//! Performance benchmark of acnet-onnx on ImageNet-scale ACNet models.
//!
//! ```sh
//! cargo bench --bench perf                 # ResNet-50 and ResNet-152
//! cargo bench --bench perf -- resnet50     # ResNet-50 only (quick); same as ACNET_BENCH_MODELS=resnet50
//! ```
//!
//! It generates (never commits) ResNet-50 / ResNet-152 layouts with an ACB (3x3 + 3x1 + 1x3,
//! summed by `Add(Add(sq, ver), hor)`) on every 3x3 conv, random seeded weights, in two export
//! styles — BN folded (every branch a Conv with bias) and BatchNormalization kept after every
//! conv — each inline and with external data, plus the plain baseline (one 3x3 conv with bias per
//! block). Then it measures, in one run:
//!
//! * `acnet-onnx fuse --no-verify` (the release binary, as a child process): wall time and peak
//!   RSS (GNU time's `%M` if /usr/bin/time is there, else polled VmHWM; the peak of `RssAnon` is
//!   polled from /proc as well), against
//!   `cat model > copy` (and the same for the `.data` file). Targets: fuse / copy <= 2,
//!   peak RSS / model size <= 1.5.
//! * `acnet-onnx verify original fused --samples 1` wall time against the two plain tract runs it
//!   must do (load + `into_typed` + `into_runnable` + one run, per model, un-optimised as verify
//!   does), timed the same way: in a fresh process (this binary re-run with `--plain-tract A B`),
//!   so that both pay the same process start and page-fault costs. Target <= 1.2.
//! * tract latency (`into_optimized`, median of several runs, the models run in turns) of the
//!   ACNet, fused and baseline models. Target: fused within 5% of the baseline, judged on the
//!   median over rounds of (model time / baseline time in the same round), which a busy machine
//!   skews much less than two separate medians.
//!
//! Environment:
//! * `ACNET_BENCH_MODELS` — `resnet50`, `resnet152` or `resnet50,resnet152` (default both).
//! * `ACNET_BENCH_RUNS` — repetitions of each fuse / copy / verify measurement (default 3, median
//!   taken).
//! * `ACNET_BENCH_LATENCY_RUNS` — timed rounds of tract runs (default 9, after one warm-up round).
//! * `ACNET_BENCH_DIR` — where models are generated (default `<target>/bench-models`).
//! * `ACNET_BENCH_REGEN=1` — regenerate the models even if a previous run left them.
//!
//! Not part of `cargo test`: the target has `test = false`, and the binary does nothing unless
//! cargo bench's `--bench` flag is on its command line.

use acnet_onnx::proto::{
    tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
};
use acnet_onnx::{save, DataMode, Model};

#[path = "../tests/support/mod.rs"]
mod support;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{attr_float, attr_int, attr_ints, tensor_info};
use tract_onnx::prelude::*;

/// Bump when the generated models change, so that cached models are regenerated.
const GEN_VERSION: u32 = 1;
const SEED: u64 = 0xAC_4E7;
const BIN: &str = env!("CARGO_BIN_EXE_acnet-onnx");

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    ResNet50,
    ResNet152,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::ResNet50 => "resnet50",
            Arch::ResNet152 => "resnet152",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Arch::ResNet50 => "ResNet-50",
            Arch::ResNet152 => "ResNet-152",
        }
    }
    fn blocks(self) -> [usize; 4] {
        match self {
            Arch::ResNet50 => [3, 4, 6, 3],
            Arch::ResNet152 => [3, 8, 36, 3],
        }
    }
}

fn f32_tensor(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    let mut raw = Vec::with_capacity(v.len() * 4);
    for x in v {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

/// Builds one model. `acb = false` gives the plain baseline (one 3x3 conv per block, BN folded).
struct Gen {
    rng: StdRng,
    style: Style,
    acb: bool,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
}

impl Gen {
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
        self.inits.push(f32_tensor(name, dims, v));
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

/// A ResNet (v1.5, torchvision layout) of bottleneck blocks.
fn resnet(arch: Arch, style: Style, acb: bool, seed: u64) -> ModelProto {
    let mut g = Gen { rng: StdRng::seed_from_u64(seed), style, acb, nodes: vec![], inits: vec![] };
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
    let a = 1.0 / (2048f32).sqrt();
    let w = g.uniform(1000 * 2048, -a, a);
    let b = g.uniform(1000, -0.1, 0.1);
    let wn = g.init("fc.weight", &[1000, 2048], &w);
    let bn = g.init("fc.bias", &[1000], &b);
    g.nodes.push(NodeProto {
        name: Some("/fc/Gemm".into()),
        op_type: Some("Gemm".into()),
        input: vec![x, wn, bn],
        output: vec!["output".into()],
        attribute: vec![attr_float("alpha", 1.0), attr_float("beta", 1.0), attr_int("transB", 1)],
        ..Default::default()
    });
    let graph = GraphProto {
        name: Some(format!("{}_{}", arch.name(), if acb { "acnet" } else { "baseline" })),
        node: g.nodes,
        initializer: g.inits,
        input: vec![tensor_info("input", DataType::Float, &[1, 3, 224, 224])],
        output: vec![tensor_info("output", DataType::Float, &[1, 1000])],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        producer_name: Some("acnet-onnx-bench".into()),
        producer_version: Some(GEN_VERSION.to_string()),
        graph: Some(graph),
        ..Default::default()
    }
}

/// The generated files of one architecture.
struct Models {
    /// (style, external, path) of the ACNet models.
    acnet: Vec<(Style, bool, PathBuf)>,
    baseline: PathBuf,
}

fn model_path(dir: &Path, arch: Arch, what: &str, external: bool) -> PathBuf {
    dir.join(format!("{}-{what}-{}.onnx", arch.name(), if external { "ext" } else { "inline" }))
}

fn generate(dir: &Path, arch: Arch) -> Models {
    let stamp = dir.join(format!("{}.stamp", arch.name()));
    let want = format!("gen {GEN_VERSION} seed {SEED}\n");
    let mut models = Models { acnet: vec![], baseline: model_path(dir, arch, "baseline", false) };
    for style in [Style::Folded, Style::Bn] {
        for external in [false, true] {
            models.acnet.push((style, external, model_path(dir, arch, &format!("acnet-{}", style.tag()), external)));
        }
    }
    let cached = std::env::var("ACNET_BENCH_REGEN").map(|v| v != "1").unwrap_or(true)
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want)
        && models.acnet.iter().map(|m| &m.2).chain([&models.baseline]).all(|p| p.is_file());
    if cached {
        eprintln!("[{}] using the models generated earlier in {}", arch.label(), dir.display());
        return models;
    }
    let _ = std::fs::remove_file(&stamp);
    for (i, style) in [Style::Folded, Style::Bn].into_iter().enumerate() {
        let t = Instant::now();
        let m = Model::from_proto(resnet(arch, style, true, SEED + i as u64)).unwrap();
        for external in [false, true] {
            let path = model_path(dir, arch, &format!("acnet-{}", style.tag()), external);
            save(&m, &path, if external { DataMode::External } else { DataMode::Inline })
                .expect("save a generated model");
        }
        eprintln!("[{}] generated ACNet ({}) in {:.1} s", arch.label(), style.tag(), t.elapsed().as_secs_f64());
    }
    let m = Model::from_proto(resnet(arch, Style::Folded, false, SEED + 7)).unwrap();
    save(&m, &models.baseline, DataMode::Inline).expect("save the baseline");
    std::fs::write(&stamp, want).unwrap();
    models
}

// ---------------------------------------------------------------------------------------------
// Measuring child processes
// ---------------------------------------------------------------------------------------------

struct ProcStat {
    wall: f64,
    /// Peak RSS of the program, bytes: GNU time's `%M` (its wait4 rusage) when /usr/bin/time is
    /// there, else the highest VmHWM polled from /proc/<pid>/status.
    max_rss: u64,
    /// Highest RssAnon (heap, not file-backed pages) seen while polling, bytes (0 if unavailable).
    peak_anon: u64,
    ok: bool,
    stderr: String,
}

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

/// Run `program args`; wall time from spawn to exit, and its peak memory (see [`ProcStat`]).
fn run_measured(program: &Path, args: &[&std::ffi::OsStr], stdout: Stdio) -> ProcStat {
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
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
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
    let status = child.wait().unwrap();
    let wall = t0.elapsed().as_secs_f64();
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
    ProcStat {
        wall,
        max_rss,
        peak_anon,
        ok: status.success(),
        stderr: std::fs::read_to_string(err_file.path()).unwrap_or_default(),
    }
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
    files_of(p).iter().map(|f| f.metadata().unwrap().len()).sum()
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

/// `cat f > copy` for every file of the model; returns (cat seconds, cat + fsync seconds).
fn copy_model(src: &Path, dst_dir: &Path) -> (f64, f64) {
    let mut cat = 0.0;
    let mut synced = 0.0;
    for f in files_of(src) {
        let dst = dst_dir.join(f.file_name().unwrap());
        let _ = std::fs::remove_file(&dst);
        let out = File::create(&dst).unwrap();
        let t0 = Instant::now();
        let st = Command::new("cat").arg(&f).stdout(out).status().unwrap();
        let wall = t0.elapsed().as_secs_f64();
        assert!(st.success(), "cat {} failed", f.display());
        let t = Instant::now();
        File::open(&dst).unwrap().sync_all().unwrap();
        cat += wall;
        synced += wall + t.elapsed().as_secs_f64();
        std::fs::remove_file(&dst).unwrap();
    }
    (cat, synced)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------
// tract
// ---------------------------------------------------------------------------------------------

fn input_tensor() -> Tensor {
    let mut rng = StdRng::seed_from_u64(1);
    let v: Vec<f32> = (0..3 * 224 * 224).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    tract_ndarray::Array4::from_shape_vec((1, 3, 224, 224), v).unwrap().into_tensor()
}

/// What verify must do for one model, timed: load, typed (un-optimised) plan, one run.
/// Returns (load, plan, run) seconds.
fn tract_plain(path: &Path, input: &Tensor) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let mut m = tract_onnx::onnx().model_for_path(path).unwrap();
    m.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), [1usize, 3, 224, 224])).unwrap();
    let t1 = Instant::now();
    let plan = m.into_typed().unwrap().into_runnable().unwrap();
    let t2 = Instant::now();
    let out = plan.run(tvec![input.clone().into_tvalue()]).unwrap();
    let t3 = Instant::now();
    assert_eq!(out[0].shape(), &[1, 1000]);
    ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64())
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
// The benchmark
// ---------------------------------------------------------------------------------------------

struct FuseRow {
    arch: Arch,
    style: Style,
    external: bool,
    size: u64,
    out_size: u64,
    copy: f64,
    copy_sync: f64,
    fuse: f64,
    max_rss: u64,
    peak_anon: u64,
    /// in-process library phases: load, fuse, save (staged + read back + commit)
    phases: (f64, f64, f64),
}

struct VerifyRow {
    arch: Arch,
    style: Style,
    verify: f64,
    verify_rss: u64,
    /// median (load, plan, run) for the original and the fused model
    plain: [(f64, f64, f64); 2],
    /// median wall time of a process that does just the two inferences
    plain_total: f64,
    plain_rss: u64,
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

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

fn ok_mark(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = status_meminfo().map(|k| format!("{:.1} GiB", k as f64 / (1 << 20) as f64)).unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} cores, {cpu}, {mem} RAM, {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn status_meminfo() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(|s| s.as_str()) == Some("--plain-tract") {
        // child mode: the two inferences verify must run, timed, in a fresh process
        let input = input_tensor();
        for p in &args[1..] {
            let (l, t, r) = tract_plain(Path::new(p), &input);
            println!("{l} {t} {r}");
        }
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without --bench: nothing to do
        println!("perf: run with `cargo bench --bench perf` (skipped)");
        return;
    }
    let mut archs: Vec<Arch> = vec![];
    let sel = std::env::var("ACNET_BENCH_MODELS").unwrap_or_default();
    for s in sel.split(',').chain(args.iter().map(|s| s.as_str())) {
        match s.trim().to_lowercase().replace(['-', '_'], "").as_str() {
            "resnet50" | "50" | "quick" if !archs.contains(&Arch::ResNet50) => archs.push(Arch::ResNet50),
            "resnet152" | "152" if !archs.contains(&Arch::ResNet152) => archs.push(Arch::ResNet152),
            _ => {}
        }
    }
    if archs.is_empty() {
        archs = vec![Arch::ResNet50, Arch::ResNet152];
    }
    let runs = env_usize("ACNET_BENCH_RUNS", 3);
    let lat_runs = env_usize("ACNET_BENCH_LATENCY_RUNS", 9);
    let dir = std::env::var_os("ACNET_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("bench-models"));
    std::fs::create_dir_all(&dir).unwrap();
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    eprintln!("perf: {} | binary {BIN} | models in {}", machine(), dir.display());
    eprintln!("perf: {} fuse/copy/verify run(s) each, {} latency run(s) each", runs, lat_runs);
    let load_start = loadavg();
    if load_start.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l > 0.5) {
        eprintln!("perf: warning: load average {load_start} at the start; other processes will skew the timings");
    }

    let input = input_tensor();
    let mut fuse_rows = vec![];
    let mut verify_rows = vec![];
    let mut lat_rows = vec![];
    let t_all = Instant::now();
    for &arch in &archs {
        let models = generate(&dir, arch);
        let mut fused_inline: Vec<(Style, PathBuf)> = vec![];
        for (style, external, path) in &models.acnet {
            let (style, external) = (*style, *external);
            let tag = format!("{}-{}-{}", arch.name(), style.tag(), if external { "ext" } else { "inline" });
            let out = work.join(format!("{tag}-fused.onnx"));
            let mut copies = vec![];
            let mut copies_sync = vec![];
            let mut fuses = vec![];
            let (mut max_rss, mut peak_anon) = (0, 0);
            for _ in 0..runs {
                // each timed run starts with no dirty pages of an earlier one being written back
                settle();
                let (c, cs) = copy_model(path, &work);
                copies.push(c);
                copies_sync.push(cs);
                remove_model(&out);
                settle();
                let s = run_measured(
                    Path::new(BIN),
                    &["fuse".as_ref(), "--no-verify".as_ref(), path.as_os_str(), "-o".as_ref(), out.as_os_str()],
                    Stdio::null(),
                );
                assert!(s.ok, "acnet-onnx fuse {} failed: {}", path.display(), s.stderr);
                fuses.push(s.wall);
                max_rss = max_rss.max(s.max_rss);
                peak_anon = peak_anon.max(s.peak_anon);
            }
            let out_size = size_of(&out);
            // the library's phases, in-process
            let t0 = Instant::now();
            let mut m = Model::load(path).unwrap();
            let t1 = Instant::now();
            let report = acnet_onnx::fuse(&mut m).unwrap();
            let t2 = Instant::now();
            let lib_out = work.join(format!("{tag}-lib.onnx"));
            save(&m, &lib_out, DataMode::Auto).unwrap();
            let t3 = Instant::now();
            drop(m);
            remove_model(&lib_out);
            let row = FuseRow {
                arch,
                style,
                external,
                size: size_of(path),
                out_size,
                copy: median(&mut copies),
                copy_sync: median(&mut copies_sync),
                fuse: median(&mut fuses),
                max_rss,
                peak_anon,
                phases: ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64()),
            };
            eprintln!(
                "[{tag}] {} MiB: fuse {:.3} s, copy {:.3} s, peak RSS {} MiB (anon {} MiB); merged {} blocks, folded {} BNs, {} refused",
                mib(row.size),
                row.fuse,
                row.copy,
                mib(row.max_rss),
                mib(row.peak_anon),
                report.blocks_merged,
                report.bns_folded,
                report.refused.len()
            );
            fuse_rows.push(row);
            if external {
                remove_model(&out);
            } else {
                fused_inline.push((style, out));
            }
        }
        for (style, fused) in &fused_inline {
            let orig = &models.acnet.iter().find(|m| m.0 == *style && !m.1).unwrap().2;
            let (mut walls, mut totals, mut rss, mut plain_rss) = (vec![], vec![], 0, 0);
            let mut parts: Vec<[(f64, f64, f64); 2]> = vec![];
            for _ in 0..runs {
                let s = run_measured(
                    Path::new(BIN),
                    &["verify".as_ref(), orig.as_os_str(), fused.as_os_str(), "--samples".as_ref(), "1".as_ref()],
                    Stdio::null(),
                );
                assert!(s.ok, "acnet-onnx verify {} {} failed: {}", orig.display(), fused.display(), s.stderr);
                walls.push(s.wall);
                rss = rss.max(s.max_rss);
                // the two plain inferences, in a fresh process too (this binary, `--plain-tract`)
                let out = tempfile::NamedTempFile::new().unwrap();
                let c = run_measured(
                    &std::env::current_exe().unwrap(),
                    &["--plain-tract".as_ref(), orig.as_os_str(), fused.as_os_str()],
                    Stdio::from(out.reopen().unwrap()),
                );
                assert!(c.ok, "plain tract run failed: {}", c.stderr);
                let nums: Vec<f64> = std::fs::read_to_string(out.path())
                    .unwrap()
                    .split_whitespace()
                    .map(|v| v.parse().unwrap())
                    .collect();
                let p = [(nums[0], nums[1], nums[2]), (nums[3], nums[4], nums[5])];
                totals.push(c.wall);
                plain_rss = plain_rss.max(c.max_rss);
                parts.push(p);
            }
            let comp = |m: usize, f: fn(&(f64, f64, f64)) -> f64| {
                median(&mut parts.iter().map(|p| f(&p[m])).collect::<Vec<_>>())
            };
            let plain = [0, 1].map(|m| (comp(m, |p| p.0), comp(m, |p| p.1), comp(m, |p| p.2)));
            let (verify, plain_total) = (median(&mut walls), median(&mut totals));
            eprintln!("[{}-{}] verify {:.2} s vs plain tract {:.2} s", arch.name(), style.tag(), verify, plain_total);
            verify_rows.push(VerifyRow { arch, style: *style, verify, verify_rss: rss, plain, plain_total, plain_rss });
        }
        let mut lat_models: Vec<(String, PathBuf)> = vec![];
        for (style, fused) in &fused_inline {
            let orig = models.acnet.iter().find(|m| m.0 == *style && !m.1).unwrap().2.clone();
            lat_models.push((format!("ACNet ({})", style.tag()), orig));
            lat_models.push((format!("fused ({})", style.tag()), fused.clone()));
        }
        lat_models.push(("baseline".into(), models.baseline.clone()));
        let paths: Vec<&Path> = lat_models.iter().map(|m| m.1.as_path()).collect();
        let res = tract_latency(&paths, &input, lat_runs);
        let base = res.last().unwrap().1.clone(); // the baseline is the last model
        for ((what, _), (prep, times)) in lat_models.iter().zip(res) {
            // paired: this model's time over the baseline's in the same round
            let mut ratios: Vec<f64> = times.iter().zip(&base).map(|(t, b)| t / b).collect();
            let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
            let med = median(&mut times.clone());
            eprintln!("[{}] latency {what}: median {:.1} ms (optimise {:.1} s)", arch.name(), med * 1e3, prep);
            lat_rows.push(LatRow { arch, what: what.clone(), prep, median: med, min, vs_base: median(&mut ratios) });
        }
        for (_, f) in &fused_inline {
            remove_model(f);
        }
    }

    // ------------------------------------------------------------------ report
    let mut ok_all = [true; 4];
    let mut worst = [0f64; 4];
    println!();
    println!("machine: {}", machine());
    println!("load average (1/5/15 min): {load_start} at the start, {} at the end", loadavg());
    println!(
        "fuse/copy/verify: median of {runs} run(s); peak RSS: max over runs ({}); latency: median of {lat_runs} run(s)",
        if gnu_time() { "GNU time %M" } else { "polled VmHWM" }
    );
    println!();
    println!("## fuse --no-verify vs copying the files (cat)");
    println!();
    println!("| model | style | weights | size MiB | fused MiB | copy s | copy+fsync s | fuse s | fuse/copy | fuse/(copy+fsync) | peak RSS MiB | (anon) | RSS/size | lib load s | lib fuse s | lib save s |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &fuse_rows {
        let tr = r.fuse / r.copy;
        let mr = r.max_rss as f64 / r.size as f64;
        ok_all[0] &= tr <= 2.0;
        ok_all[1] &= mr <= 1.5;
        worst[0] = worst[0].max(tr);
        worst[1] = worst[1].max(mr);
        println!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | **{:.2}** | {:.2} | {} | {} | **{:.2}** | {:.3} | {:.3} | {:.3} |",
            r.arch.label(),
            if r.style == Style::Folded { "BN folded" } else { "BN nodes" },
            if r.external { "external" } else { "inline" },
            mib(r.size),
            mib(r.out_size),
            r.copy,
            r.copy_sync,
            r.fuse,
            tr,
            r.fuse / r.copy_sync,
            mib(r.max_rss),
            mib(r.peak_anon),
            mr,
            r.phases.0,
            r.phases.1,
            r.phases.2
        );
    }
    println!();
    println!("## verify --samples 1 vs its two plain tract inferences (a process doing load + into_typed + into_runnable + run, per model)");
    println!();
    println!("| model | style | verify s | two inferences s | verify/inferences | original: load / plan / run s | fused: load / plan / run s | verify peak RSS MiB | inferences peak RSS MiB |");
    println!("|---|---|---:|---:|---:|---|---|---:|---:|");
    for r in &verify_rows {
        let plain = r.plain_total;
        let ratio = r.verify / plain;
        ok_all[2] &= ratio <= 1.2;
        worst[2] = worst[2].max(ratio);
        let f = |p: &(f64, f64, f64)| format!("{:.2} / {:.2} / {:.2}", p.0, p.1, p.2);
        println!(
            "| {} | {} | {:.2} | {:.2} | **{:.2}** | {} | {} | {} | {} |",
            r.arch.label(),
            if r.style == Style::Folded { "BN folded" } else { "BN nodes" },
            r.verify,
            plain,
            ratio,
            f(&r.plain[0]),
            f(&r.plain[1]),
            mib(r.verify_rss),
            mib(r.plain_rss),
        );
    }
    println!();
    println!("## tract latency, optimised plan (into_optimized), batch 1, 224x224");
    println!();
    println!("| model | network | median ms | min ms | vs baseline (paired median) | optimise s |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in &lat_rows {
        let rel = r.vs_base;
        if r.what.starts_with("fused") {
            ok_all[3] &= rel <= 1.05;
            worst[3] = worst[3].max(rel);
        }
        println!(
            "| {} | {} | {:.1} | {:.1} | {:+.1}% | {:.2} |",
            r.arch.label(),
            r.what,
            r.median * 1e3,
            r.min * 1e3,
            (rel - 1.0) * 100.0,
            r.prep
        );
    }
    println!();
    println!("## targets");
    println!();
    println!("- fuse --no-verify <= 2x copy time: {} (worst {:.2}x)", ok_mark(ok_all[0]), worst[0]);
    println!("- fuse peak memory <= 1.5x model size: {} (worst {:.2}x)", ok_mark(ok_all[1]), worst[1]);
    println!("- verify <= 1.2x its two plain inferences: {} (worst {:.2}x)", ok_mark(ok_all[2]), worst[2]);
    println!(
        "- fused latency within 5% of the baseline: {} (worst {:+.1}%)",
        ok_mark(ok_all[3]),
        (worst[3] - 1.0) * 100.0
    );
    println!();
    println!("total bench time {:.0} s", t_all.elapsed().as_secs_f64());
}
