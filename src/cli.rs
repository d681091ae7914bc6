//! The command line, thin over the library. Exit codes: 0 done / equivalent, 1 not equivalent,
//! 2 could not do it (bad input, unreadable file, a check that could not run).

use crate::bench::{bench_latency, BenchOptions, BenchReport};
use crate::fuse::{fuse, FuseReport};
use crate::io::{stage, DataMode, Model};
use crate::verify::{verify_paths, VerifyError, VerifyOptions, VerifyReport};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(name = "acnet-onnx", version, about = "Fuse re-parameterised CNN blocks (ACNet, RepVGG, ...) in ONNX models into plain convolutions, and prove the equivalence")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Rewrite every re-parameterisable block into one Conv, verify in tract, write the result.
    Fuse(FuseArgs),
    /// Run two models in tract on the same inputs and compare every output.
    Verify(VerifyArgs),
    /// Show the blocks found, why any would not be fused, and the initializers; writes nothing.
    Inspect(InspectArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of random input sets.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Absolute tolerance: an element passes when |a-b| <= atol + rtol*|a|.
    #[arg(long, default_value_t = 1e-4)]
    pub atol: f64,
    /// Relative tolerance.
    #[arg(long, default_value_t = 1e-4)]
    pub rtol: f64,
    /// Shape of an input with symbolic dims, `name:1,3,224,224` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    pub input_shape: Vec<String>,
    /// Real input data, `name=file.npy` (repeatable).
    #[arg(long = "input", value_name = "NAME=FILE")]
    pub input: Vec<String>,
    /// Real input data: an .npz whose arrays are named like the graph inputs.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct FuseArgs {
    /// The model to fuse (never modified unless --in-place).
    pub model: PathBuf,
    /// Where to write the fused model.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write the weights to `<output>.data` (default: as the input came).
    #[arg(long, conflicts_with = "inline")]
    pub external_data: bool,
    /// Write every weight inside the model file.
    #[arg(long)]
    pub inline: bool,
    /// Skip the equivalence check.
    #[arg(long)]
    pub no_verify: bool,
    /// Write the output even when the check fails (with a warning).
    #[arg(long)]
    pub force: bool,
    /// Allow -o to name the input itself.
    #[arg(long)]
    pub in_place: bool,
    /// Write a JSON report (fuse summary + equivalence check).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Measure tract's latency (optimised plan) of the model before and after fusion, on the
    /// check's inputs.
    #[arg(long)]
    pub bench: bool,
    /// --bench: seconds of timed runs per model (at least 3 runs).
    #[arg(long, value_name = "SECONDS", requires = "bench")]
    pub bench_time: Option<f64>,
    /// --bench: most timed runs per model.
    #[arg(long, value_name = "N", requires = "bench")]
    pub bench_runs: Option<usize>,
    #[command(flatten)]
    pub check: CheckArgs,
}

impl FuseArgs {
    /// The timing options of `--bench`.
    pub fn bench_options(&self) -> Result<BenchOptions, Fail> {
        let mut o = BenchOptions::default();
        if let Some(t) = self.bench_time {
            if !(t.is_finite() && (0.0..=86400.0).contains(&t)) {
                return Err(Fail(2, format!("--bench-time must be a number of seconds from 0 to 86400, got {t}")));
            }
            o.time = std::time::Duration::from_secs_f64(t);
        }
        if let Some(n) = self.bench_runs {
            if n == 0 {
                return Err(Fail(2, "--bench-runs must be at least 1".into()));
            }
            o.max_runs = n;
        }
        Ok(o)
    }
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The reference model.
    pub reference: PathBuf,
    /// The model that should compute the same function.
    pub candidate: PathBuf,
    /// Write a JSON report.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub check: CheckArgs,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A failure: the one line to print and the exit code.
pub struct Fail(pub i32, pub String);

impl From<crate::Error> for Fail {
    fn from(e: crate::Error) -> Fail {
        Fail(2, e.to_string())
    }
}
impl From<VerifyError> for Fail {
    fn from(e: VerifyError) -> Fail {
        Fail(e.exit_code(), e.to_string())
    }
}

impl CheckArgs {
    pub fn options(&self) -> Result<VerifyOptions, Fail> {
        if self.samples == 0 {
            return Err(Fail(2, "--samples must be at least 1".into()));
        }
        for (what, v) in [("--atol", self.atol), ("--rtol", self.rtol)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Fail(2, format!("{what} must be a finite number >= 0, got {v}")));
            }
        }
        let mut o = VerifyOptions { seed: self.seed, samples: self.samples, atol: self.atol, rtol: self.rtol, progress: true, ..Default::default() };
        for s in &self.input_shape {
            let (name, dims) = s.rsplit_once(':').ok_or_else(|| Fail(2, format!("--input-shape {s:?}: expected name:d1,d2,...")))?;
            let dims: Result<Vec<usize>, _> = dims.split(',').map(|d| d.trim().parse::<usize>()).collect();
            o.input_shapes.push((name.to_string(), dims.map_err(|_| Fail(2, format!("--input-shape {s:?}: dims must be whole numbers")))?));
        }
        for s in &self.input {
            let (name, file) = s.split_once('=').ok_or_else(|| Fail(2, format!("--input {s:?}: expected name=file.npy")))?;
            o.input_files.push((name.to_string(), PathBuf::from(file)));
        }
        o.inputs_npz = self.inputs.clone();
        Ok(o)
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), Fail> {
    let s = serde_json::to_string_pretty(v).expect("report serialises");
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, s + "\n").and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Fail(2, format!("{}: {e}", path.display()))
    })
}

/// A path made absolute with its folder resolved; a file that does not exist yet still has one.
fn canonical(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let name = p.file_name()?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(name))
}

/// Whether two paths name the same file (existing or not).
fn same_file(a: &Path, b: &Path) -> bool {
    match (canonical(a), canonical(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// `<path>.data`: where a save of `path` writes its external data, or removes a stale one.
fn data_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".data");
    PathBuf::from(s)
}

/// A file we are asked to write must go to an existing folder and must not be a folder.
fn check_writable(path: &Path, what: &str) -> Result<(), Fail> {
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.file_name().is_none() {
        return Err(Fail(2, format!("{}: {what} must name a file", path.display())));
    }
    if !parent.is_dir() {
        return Err(Fail(2, format!("{}: cannot write the {what}: no folder {}", path.display(), parent.display())));
    }
    if path.is_dir() {
        return Err(Fail(2, format!("{}: cannot write the {what}: it is a folder", path.display())));
    }
    Ok(())
}

/// The report must not overwrite any file the run reads or writes.
fn check_report_path(report: &Path, files: &[(&Path, &str)]) -> Result<(), Fail> {
    check_writable(report, "report")?;
    for (f, what) in files {
        if same_file(report, f) {
            return Err(Fail(2, format!("{}: --report names {what}; choose another file for the report", report.display())));
        }
    }
    Ok(())
}

pub use crate::error::one_line;

fn warn(msg: &str) {
    eprintln!("acnet-onnx: warning: {}", one_line(msg));
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Replace the default panic output (a message and maybe a backtrace) by recording the message:
/// [`guarded`] and the binary's `main` turn it into one line on stderr.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let p = info.payload();
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        LAST_PANIC.with(|l| *l.borrow_mut() = Some(format!("{msg}{at}")));
    }));
}

/// The message of the last panic on this thread (recorded by [`install_panic_hook`]).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    LAST_PANIC
        .with(|l| l.borrow_mut().take())
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Run `f`; a panic in it (a bug) becomes a one-line error naming the file, exit code 2.
/// Anything staged is removed while unwinding.
fn guarded<T>(file: &Path, what: &str, f: impl FnOnce() -> Result<T, Fail>) -> Result<T, Fail> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Fail(
            2,
            format!(
                "{}: internal error while {what}: {} (a bug in acnet-onnx: please report it with the model)",
                file.display(),
                panic_message(&*p)
            ),
        )),
    }
}

/// Most elements a random input of the equivalence check may have (4 GiB as float32). A shape
/// in a model is a declared size like any other: a file of a few KB must not make the check
/// allocate terabytes (an allocation failure aborts the process; it is not an error).
pub const MAX_INPUT_ELEMENTS: u128 = 1 << 30;

/// The random inputs the check would make for `model`, by its declared input shapes (symbolic
/// dims as 1, `--input-shape` overriding): refuse any past [`MAX_INPUT_ELEMENTS`].
/// `hint` ends the message: what the user can do about it.
fn check_input_sizes(model: &Model, file: &Path, opts: &VerifyOptions, hint: &str) -> Result<(), Fail> {
    use crate::proto::{tensor_shape_proto::dimension::Value, type_proto};
    if opts.inputs_npz.is_some() {
        return Ok(());
    }
    let g = model.proto.graph.as_ref().expect("a loaded model has a graph");
    for v in g.input.iter().filter(|v| !g.initializer.iter().any(|t| t.name() == v.name())) {
        if opts.input_files.iter().any(|(n, _)| n == v.name()) {
            continue;
        }
        let dims: Vec<u128> = match opts.input_shapes.iter().find(|(n, _)| n == v.name()) {
            Some((_, d)) => d.iter().map(|&x| x as u128).collect(),
            None => {
                let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else { continue };
                let Some(shape) = &t.shape else { continue };
                shape
                    .dim
                    .iter()
                    .map(|d| match d.value {
                        Some(Value::DimValue(x)) if x >= 0 => x as u128,
                        _ => 1,
                    })
                    .collect()
            }
        };
        let n = dims.iter().try_fold(1u128, |a, &d| a.checked_mul(d)).unwrap_or(u128::MAX);
        if n > MAX_INPUT_ELEMENTS {
            return Err(Fail(
                2,
                format!(
                    "{}: input '{}' of shape {dims:?} has {n} elements, too many to check (at most {MAX_INPUT_ELEMENTS}); {hint}",
                    file.display(),
                    v.name()
                ),
            ));
        }
    }
    Ok(())
}

/// JSON of a fuse run: the verify report's fields (if it ran) plus `fuse` and `bench` (null
/// without `--bench`, or when it could not run).
pub fn fuse_json(fr: &FuseReport, vr: Option<&VerifyReport>, bench: Option<&BenchReport>) -> serde_json::Value {
    let mut v = match vr {
        Some(r) => serde_json::to_value(r).unwrap(),
        None => serde_json::json!({"passed": null, "outputs": []}),
    };
    v["verified"] = serde_json::Value::Bool(vr.is_some());
    v["fuse"] = serde_json::to_value(fr).unwrap();
    v["bench"] = serde_json::to_value(bench).unwrap();
    v
}

pub fn run_fuse(a: &FuseArgs) -> Result<i32, Fail> {
    if same_file(&a.model, &a.output) && !a.in_place {
        return Err(Fail(2, format!("{}: -o names the input itself; pass --in-place to overwrite it", a.output.display())));
    }
    check_writable(&a.output, "output")?;
    let opts = a.check.options()?;
    let mut model = Model::load(&a.model)?;
    // a save writes `<output>.data` (or removes a stale one): neither may be a file of the input
    let out_data = data_path(&a.output);
    let inputs = model.files();
    if !a.in_place {
        for f in &inputs {
            for out in [&a.output, &out_data] {
                if same_file(f, out) {
                    return Err(Fail(
                        2,
                        format!(
                            "{}: writing it would replace or remove {}, a file of the input {}; choose another output (or pass --in-place)",
                            a.output.display(),
                            f.display(),
                            a.model.display()
                        ),
                    ));
                }
            }
        }
    }
    let bench_opts = a.bench_options()?;
    if !a.no_verify {
        check_input_sizes(&model, &a.model, &opts, "set a smaller one with --input-shape, or pass --no-verify")?;
    }
    if let Some(r) = &a.report {
        let mut files: Vec<(&Path, &str)> = inputs.iter().map(|f| (f.as_path(), "a file of the input")).collect();
        files.push((&a.output, "the output"));
        files.push((&out_data, "the output's data file"));
        check_report_path(r, &files)?;
    }
    guarded(&a.model, "fusing (nothing was written)", || fuse_and_write(a, &mut model, &opts, &bench_opts))
}

/// `--bench`: the latency line (and notes the check did not print) on stdout, or a one-line
/// warning when tract cannot run the models: the fuse goes on either way.
fn bench(a: &FuseArgs, model: &Model, fused: &Path, opts: &VerifyOptions, bo: &BenchOptions, vr: Option<&VerifyReport>) -> Option<BenchReport> {
    let skipped = |e: &dyn std::fmt::Display| warn(&format!("no latency measured (--bench): {e}"));
    // the fused model has the input's graph inputs
    if let Err(Fail(_, msg)) = check_input_sizes(model, &a.model, opts, "set a smaller one with --input-shape") {
        skipped(&msg);
        return None;
    }
    match bench_latency(&a.model, fused, opts, bo) {
        Ok(b) => {
            for n in &b.notes {
                if !vr.is_some_and(|r| r.notes.contains(n)) {
                    println!("note: {n}");
                }
            }
            print!("{}", b.summary());
            Some(b)
        }
        Err(e) => {
            skipped(&e);
            None
        }
    }
}

fn fuse_and_write(a: &FuseArgs, model: &mut Model, opts: &VerifyOptions, bo: &BenchOptions) -> Result<i32, Fail> {
    let report = fuse(model)?;
    print!("{}", report.summary());
    let mode = if a.external_data {
        DataMode::External
    } else if a.inline {
        DataMode::Inline
    } else {
        DataMode::Auto
    };
    let staged = stage(model, &a.output, mode)?;
    let mut vr = None;
    if !a.no_verify {
        match verify_paths(&a.model, &staged.model_path(), opts) {
            Ok(mut r) => {
                r.candidate = a.output.display().to_string();
                print!("{}", r.table());
                if !r.passed {
                    if a.force {
                        warn("the fused model is NOT equivalent within the tolerances; written anyway (--force)");
                    } else {
                        if let Some(p) = &a.report {
                            write_json(p, &fuse_json(&report, Some(&r), None))?;
                        }
                        eprintln!(
                            "acnet-onnx: {}",
                            one_line(&format!(
                                "{}: the fused model is not equivalent to the input; nothing written (--force writes anyway)",
                                a.model.display()
                            ))
                        );
                        return Ok(1);
                    }
                }
                vr = Some(r);
            }
            Err(e @ VerifyError::Unsupported { .. }) => {
                warn(&format!("not verified: {e}; the rewrite is written unverified (pass --no-verify to skip the check)"));
            }
            Err(e) => {
                return Err(Fail(e.exit_code(), format!("{e} (pass --no-verify to skip the check)")));
            }
        }
    }
    let latency = if a.bench { bench(a, model, &staged.model_path(), opts, bo, vr.as_ref()) } else { None };
    let saved = staged.commit()?;
    match &saved.data {
        Some(d) => println!("wrote {} and {}", saved.model.display(), d.display()),
        None => println!("wrote {}", saved.model.display()),
    }
    if let Some(p) = &a.report {
        write_json(p, &fuse_json(&report, vr.as_ref(), latency.as_ref()))?;
    }
    Ok(0)
}

pub fn run_verify(a: &VerifyArgs) -> Result<i32, Fail> {
    let opts = a.check.options()?;
    // read both with our own loader first: a damaged or invalid file gets the same one-line
    // error as in `fuse`, before tract sees it
    let mut files: Vec<(PathBuf, &str)> = Vec::new();
    for p in [&a.reference, &a.candidate] {
        let m = Model::load(p)?;
        guarded(p, "checking the graph", || Ok(crate::fuse::validate(&m)?))?;
        check_input_sizes(&m, p, &opts, "set a smaller one with --input-shape")?;
        files.extend(m.files().into_iter().map(|f| (f, "a model file")));
    }
    if let Some(r) = &a.report {
        let files: Vec<(&Path, &str)> = files.iter().map(|(f, w)| (f.as_path(), *w)).collect();
        check_report_path(r, &files)?;
    }
    let r = verify_paths(&a.reference, &a.candidate, &opts)?;
    print!("{}", r.table());
    if let Some(p) = &a.report {
        write_json(p, &serde_json::to_value(&r).unwrap())?;
    }
    Ok(r.exit_code())
}

pub fn run_inspect(a: &InspectArgs) -> Result<i32, Fail> {
    let original = Model::load(&a.model)?;
    let mut model = original.clone();
    let report = guarded(&a.model, "analysing", || Ok(fuse(&mut model)?))?;
    let g = original.proto.graph.as_ref().unwrap();
    let inits: Vec<serde_json::Value> = g
        .initializer
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name(),
                "shape": t.dims,
                "dtype": crate::proto::tensor_proto::DataType::try_from(t.data_type.unwrap_or(0)).map(|d| d.as_str_name().to_string()).unwrap_or_else(|_| "?".into()),
                "external": crate::io::is_external(t),
            })
        })
        .collect();
    if a.json {
        let v = serde_json::json!({"model": a.model.display().to_string(), "analysis": report, "initializers": inits});
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(0);
    }
    let m = &original.proto;
    println!(
        "{}: ir_version {}, opset {}, producer {} {}",
        a.model.display(),
        m.ir_version(),
        crate::graph::default_opset(m),
        m.producer_name(),
        m.producer_version()
    );
    println!("blocks that fuse would rewrite:");
    for r in &report.rewrites {
        println!("  {} '{}': {}", r.rule, r.node, r.detail);
    }
    if report.rewrites.is_empty() {
        println!("  none");
    }
    print!("{}", report.summary());
    println!("initializers ({}):", inits.len());
    for i in &inits {
        println!("  {:<60} {:<16} {}{}", i["name"].as_str().unwrap(), format!("{}", i["shape"]), i["dtype"].as_str().unwrap(), if i["external"].as_bool().unwrap() { " (external)" } else { "" });
    }
    Ok(0)
}

/// Run the CLI; returns the process exit code. Prints errors as one line on stderr.
pub fn main_with(cli: Cli) -> i32 {
    let r = match &cli.cmd {
        Cmd::Fuse(a) => run_fuse(a),
        Cmd::Verify(a) => run_verify(a),
        Cmd::Inspect(a) => run_inspect(a),
    };
    match r {
        Ok(c) => c,
        Err(Fail(code, msg)) => {
            eprintln!("acnet-onnx: {}", one_line(&msg));
            code
        }
    }
}
