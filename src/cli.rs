//! The command line, thin over the library. Exit codes: 0 done / equivalent, 1 not equivalent,
//! 2 could not do it (bad input, unreadable file, a check that could not run).

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
    #[command(flatten)]
    pub check: CheckArgs,
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

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// JSON of a fuse run: the verify report's fields (if it ran) plus `fuse`.
pub fn fuse_json(fr: &FuseReport, vr: Option<&VerifyReport>) -> serde_json::Value {
    let mut v = match vr {
        Some(r) => serde_json::to_value(r).unwrap(),
        None => serde_json::json!({"passed": null, "outputs": []}),
    };
    v["verified"] = serde_json::Value::Bool(vr.is_some());
    v["fuse"] = serde_json::to_value(fr).unwrap();
    v
}

pub fn run_fuse(a: &FuseArgs) -> Result<i32, Fail> {
    if same_file(&a.model, &a.output) && !a.in_place {
        return Err(Fail(2, format!("{}: -o names the input itself; pass --in-place to overwrite it", a.output.display())));
    }
    let opts = a.check.options()?;
    let mut model = Model::load(&a.model)?;
    let report = fuse(&mut model)?;
    print!("{}", report.summary());
    let mode = if a.external_data {
        DataMode::External
    } else if a.inline {
        DataMode::Inline
    } else {
        DataMode::Auto
    };
    let staged = stage(&model, &a.output, mode)?;
    let mut code = 0;
    let mut vr = None;
    if !a.no_verify {
        match verify_paths(&a.model, &staged.model_path(), &opts) {
            Ok(mut r) => {
                r.candidate = a.output.display().to_string();
                print!("{}", r.table());
                if !r.passed {
                    if a.force {
                        eprintln!("acnet-onnx: warning: the fused model is NOT equivalent within the tolerances; written anyway (--force)");
                    } else {
                        if let Some(p) = &a.report {
                            write_json(p, &fuse_json(&report, Some(&r)))?;
                        }
                        eprintln!("acnet-onnx: the fused model is not equivalent to {}; nothing written (--force writes anyway)", a.model.display());
                        return Ok(1);
                    }
                }
                vr = Some(r);
            }
            Err(e @ VerifyError::Unsupported { .. }) => {
                eprintln!("acnet-onnx: warning: not verified: {e}; the rewrite is written unverified (pass --no-verify to skip the check)");
            }
            Err(e) => {
                code = e.exit_code();
                return Err(Fail(code, format!("{e} (pass --no-verify to skip the check)")));
            }
        }
    }
    let saved = staged.commit()?;
    match &saved.data {
        Some(d) => println!("wrote {} and {}", saved.model.display(), d.display()),
        None => println!("wrote {}", saved.model.display()),
    }
    if let Some(p) = &a.report {
        write_json(p, &fuse_json(&report, vr.as_ref()))?;
    }
    Ok(code)
}

pub fn run_verify(a: &VerifyArgs) -> Result<i32, Fail> {
    let opts = a.check.options()?;
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
    let report = fuse(&mut model)?;
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
            eprintln!("acnet-onnx: {msg}");
            code
        }
    }
}
