//! What users run, one call each: [`fuse_file`] (load → fuse → stage → verify → bench → commit),
//! [`verify_files`] and [`inspect_file`]. The command line and the Python module are thin layers
//! over these.

mod paths;

use crate::bench::{bench_latency, BenchOptions, BenchReport};
use crate::error::{catch, Error, Result};
use crate::model::save::{remove_stale_staging, stage, DataMode, Saved};
use crate::model::transform::{eval_mode, freeze_initializers, training_mode};
use crate::model::Model;
use crate::rewrite::{fuse, fuse_at, validate, FuseReport};
use crate::verify::inputs::check_declared_sizes;
use crate::verify::{verify, VerifyOptions, VerifyReport};
use paths::{check_report_path, check_writable, data_path, same_file, write_json};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Options of [`fuse_file`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FuseOptions {
    /// How to store the weights (default: as the input came).
    pub data: DataMode,
    /// Skip the equivalence check.
    pub no_verify: bool,
    /// The check's inputs and tolerances (also the inputs `bench` runs on).
    pub check: VerifyOptions,
    /// Write the output even when the check fails (with a warning).
    pub force: bool,
    /// Allow the output to be the input itself.
    pub in_place: bool,
    /// Measure tract's latency (optimised plan) before and after fusion.
    pub bench: Option<BenchOptions>,
    /// Write the JSON report here (also when the check fails).
    pub report: Option<PathBuf>,
}

/// What [`fuse_file`] did.
#[derive(Debug, Clone)]
pub struct FuseFileReport {
    pub fuse: FuseReport,
    /// The equivalence check (`candidate` names the output); `None` when it was not run.
    pub check: Option<VerifyReport>,
    /// The latency before and after; `None` unless asked for and measured.
    pub bench: Option<BenchReport>,
    /// The files written; `None` when the check failed (and `force` was not set), or could not
    /// check a part of the models in which they differ (and `allow_unchecked` was not set).
    pub written: Option<Saved>,
    /// What the user should know (one line each).
    pub warnings: Vec<String>,
}

impl FuseFileReport {
    /// 0: written; 1: not equivalent, nothing written; 2: a part of the models in which they
    /// differ could not be checked, nothing written.
    pub fn exit_code(&self) -> i32 {
        match (&self.written, &self.check) {
            (Some(_), _) => 0,
            (None, Some(c)) if c.exit_code() == 2 => 2,
            (None, _) => 1,
        }
    }

    /// Why nothing was written, one line (`None` when the output was written).
    pub fn not_written(&self, input: &Path) -> Option<String> {
        if self.written.is_some() {
            return None;
        }
        Some(match &self.check {
            Some(c) if c.exit_code() == 2 => format!(
                "{}: the rewrite could not be checked where it changed the model ({}); nothing written \
                 (--allow-unchecked writes it anyway)",
                input.display(),
                c.unchecked().join("; ")
            ),
            _ => format!(
                "{}: the fused model is not equivalent to the input; nothing written (--force writes anyway)",
                input.display()
            ),
        })
    }

    /// The JSON report: the check's report (`passed` null when it did not run) plus `verified`,
    /// `fuse` and `bench`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = match &self.check {
            Some(r) => serde_json::to_value(r).expect("a report serialises"),
            None => serde_json::json!({"passed": null, "outputs": []}),
        };
        v["verified"] = serde_json::Value::Bool(self.check.is_some());
        v["fuse"] = serde_json::to_value(&self.fuse).expect("a report serialises");
        v["bench"] = serde_json::to_value(&self.bench).expect("a report serialises");
        v
    }
}

/// Steps of [`fuse_file`] as they happen, for a front end that shows progress.
pub enum Event<'a> {
    Fused(&'a FuseReport),
    Checked(&'a VerifyReport),
    Warning(&'a str),
    Benched(&'a BenchReport),
    Wrote(&'a Saved),
}

/// Run `f`; a panic in it (a bug) becomes a one-line [`Error::Internal`] naming the file.
/// Anything staged is removed while unwinding.
fn guarded<T>(file: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch(f).unwrap_or_else(|p| {
        Err(Error::Internal(format!(
            "{}: internal error while {what}: {} (a bug in acnet-onnx: please report it with the model)",
            file.display(),
            p.message()
        )))
    })
}

/// A model's declared inputs must be small enough to check: `hint` says what the user can do.
fn check_sizes(model: &Model, file: &Path, opts: &VerifyOptions, hint: &str) -> Result<()> {
    check_declared_sizes(model, opts).map_err(|m| Error::Usage(format!("{}: {m}; {hint}", file.display())))
}

/// Fuse `input` into `output`: load, rewrite every block, stage the output beside its target,
/// check it against the input in tract (unless `no_verify`), measure latency (if asked), then
/// move it into place. Nothing is written when the check fails (unless `force`), and the input
/// is never modified (unless `in_place` names it as the output).
///
/// ```no_run
/// use acnet_onnx::{fuse_file, FuseOptions};
/// let report = fuse_file("model.onnx".as_ref(), "deploy.onnx".as_ref(), &FuseOptions::default())?;
/// assert_eq!(report.check.as_ref().map(|c| c.passed), Some(true));
/// println!("{}", report.fuse.summary());
/// # Ok::<(), acnet_onnx::Error>(())
/// ```
pub fn fuse_file(input: &Path, output: &Path, opts: &FuseOptions) -> Result<FuseFileReport> {
    fuse_file_with(input, output, opts, &mut |_| {})
}

/// [`fuse_file`], telling `on` each step as it happens.
pub fn fuse_file_with(
    input: &Path,
    output: &Path,
    opts: &FuseOptions,
    on: &mut dyn FnMut(Event),
) -> Result<FuseFileReport> {
    let started = std::time::SystemTime::now();
    if same_file(input, output) && !opts.in_place {
        return Err(Error::Usage(format!(
            "{}: -o names the input itself; pass --in-place to overwrite it",
            output.display()
        )));
    }
    check_writable(output, "output")?;
    opts.check.validate().map_err(|m| Error::Usage(format!("--{m}")))?;
    let mut model = Model::load(input)?;
    if opts.check.eval_bn {
        eval_mode(&mut model).map_err(|m| Error::Usage(format!("{}: {m}", input.display())))?;
    } else if let Some(msg) = training_mode(&model) {
        return Err(Error::Usage(format!("{}: {msg}", input.display())));
    }
    if opts.check.freeze_initializers {
        freeze_initializers(&mut model);
    }
    // a save writes `<output>.data` (or removes a stale one): neither may be a file of the input
    let out_data = data_path(output);
    let files = model.files();
    if !opts.in_place {
        for f in &files {
            if same_file(f, output) || same_file(f, &out_data) {
                return Err(Error::Usage(format!(
                    "{}: writing it would replace or remove {}, a file of the input {}; choose another output (or pass --in-place)",
                    output.display(),
                    f.display(),
                    input.display()
                )));
            }
        }
    }
    if !opts.no_verify {
        check_sizes(&model, input, &opts.check, "set a smaller one with --input-shape, or pass --no-verify")?;
    }
    if let Some(r) = &opts.report {
        let mut named: Vec<(&Path, &str)> = files.iter().map(|f| (f.as_path(), "a file of the input")).collect();
        named.push((output, "the output"));
        named.push((&out_data, "the output's data file"));
        check_report_path(r, &named)?;
    }
    guarded(input, "fusing (nothing was written)", || fuse_and_write(input, output, model, opts, started, on))
}

/// The note saying which staging folders of killed runs were removed (the first few).
fn removed_note(removed: &[String]) -> Option<String> {
    const SHOWN: usize = 3;
    let names: Vec<&str> = removed.iter().take(SHOWN).map(String::as_str).collect();
    let more = match removed.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    (!removed.is_empty())
        .then(|| format!("removed {} staging folder(s) left by killed runs: {}{more}", removed.len(), names.join(", ")))
}

fn fuse_and_write(
    input: &Path,
    output: &Path,
    mut model: Model,
    opts: &FuseOptions,
    started: std::time::SystemTime,
    on: &mut dyn FnMut(Event),
) -> Result<FuseFileReport> {
    let mut fused = fuse_at(&mut model, &opts.check.input_shapes)?;
    // before staging: what runs killed outright left beside the output (each as large as the
    // model), said in a note of the summary and the report
    fused.notes.extend(removed_note(&remove_stale_staging(output, started)));
    on(Event::Fused(&fused));
    let staged = stage(&model, output, opts.data)?;
    // what --bench needs of the fused model (it has the input's graph inputs); then its merged
    // weights are let go: the check reads the staged file
    let bench_sizes =
        opts.bench.as_ref().map(|_| check_sizes(&model, input, &opts.check, "set a smaller one with --input-shape"));
    drop(model);
    let mut report = FuseFileReport { fuse: fused, check: None, bench: None, written: None, warnings: vec![] };
    let warn = |report: &mut FuseFileReport, msg: String, on: &mut dyn FnMut(Event)| {
        on(Event::Warning(&msg));
        report.warnings.push(msg);
    };
    if !opts.no_verify {
        match verify(input, &staged.model_path(), &opts.check) {
            Ok(mut r) => {
                r.candidate = output.display().to_string();
                on(Event::Checked(&r));
                let code = r.exit_code();
                let unchecked = r.unchecked();
                report.check = Some(r);
                // a part the check could not run, where the rewrite changed the model, is never
                // written silently: nothing (exit code 2), or with --allow-unchecked a warning
                if code == 2 || (code == 1 && !opts.force) {
                    if let Some(p) = &opts.report {
                        write_json(p, &report.to_json())?;
                    }
                    return Ok(report);
                }
                if code == 1 {
                    warn(
                        &mut report,
                        "the fused model is NOT equivalent within the tolerances; written anyway (--force)".into(),
                        on,
                    );
                }
                if !unchecked.is_empty() {
                    warn(
                        &mut report,
                        format!(
                            "the rewrite is not checked where tract cannot run the model ({}); written anyway \
                             (--allow-unchecked)",
                            unchecked.join("; ")
                        ),
                        on,
                    );
                }
            }
            Err(e) => return Err(Error::Check(Box::new(e))),
        }
    }
    if let Some(bo) = &opts.bench {
        // the fused model has the input's graph inputs
        let measured =
            bench_sizes.unwrap_or(Ok(())).and_then(|()| bench_latency(input, &staged.model_path(), &opts.check, bo));
        match measured {
            Ok(b) => {
                on(Event::Benched(&b));
                report.bench = Some(b);
            }
            Err(e) => warn(&mut report, format!("no latency measured (--bench): {e}"), on),
        }
    }
    let saved = staged.commit()?;
    on(Event::Wrote(&saved));
    report.written = Some(saved);
    if let Some(p) = &opts.report {
        write_json(p, &report.to_json())?;
    }
    Ok(report)
}

/// Options of [`verify_files`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VerifyFileOptions {
    pub check: VerifyOptions,
    /// Write the JSON report here.
    pub report: Option<PathBuf>,
}

/// Check that `candidate` computes what `reference` does (see [`verify`]), after reading both
/// with this crate's own loader (a damaged or invalid file gets the same one-line error as in
/// [`fuse_file`], before tract sees it).
pub fn verify_files(reference: &Path, candidate: &Path, opts: &VerifyFileOptions) -> Result<VerifyReport> {
    opts.check.validate().map_err(|m| Error::Usage(format!("--{m}")))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for p in [reference, candidate] {
        let m = Model::load(p)?;
        guarded(p, "checking the graph", || validate(&m))?;
        check_sizes(&m, p, &opts.check, "set a smaller one with --input-shape")?;
        files.extend(m.files());
    }
    if let Some(r) = &opts.report {
        let named: Vec<(&Path, &str)> = files.iter().map(|f| (f.as_path(), "a model file")).collect();
        check_report_path(r, &named)?;
    }
    let r = verify(reference, candidate, &opts.check)?;
    if let Some(p) = &opts.report {
        write_json(p, &serde_json::to_value(&r).expect("a report serialises"))?;
    }
    Ok(r)
}

/// One initializer as `inspect` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct InitializerInfo {
    pub name: String,
    pub shape: Vec<i64>,
    /// The ONNX data type (`FLOAT`, ...), `?` when unknown.
    pub dtype: String,
    pub external: bool,
}

/// What [`inspect_file`] found.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub model: String,
    /// What `fuse` would do.
    pub analysis: FuseReport,
    pub initializers: Vec<InitializerInfo>,
    #[serde(skip)]
    pub ir_version: i64,
    #[serde(skip)]
    pub opset: i64,
    #[serde(skip)]
    pub producer: String,
}

impl InspectReport {
    /// The text `inspect` prints.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "{}: ir_version {}, opset {}, producer {}\n",
            self.model, self.ir_version, self.opset, self.producer
        );
        s.push_str("blocks that fuse would rewrite:\n");
        for r in &self.analysis.rewrites {
            let _ = writeln!(s, "  {} '{}': {}", r.rule, r.node, r.detail);
        }
        if self.analysis.rewrites.is_empty() {
            s.push_str("  none\n");
        }
        s.push_str(&self.analysis.summary());
        let _ = writeln!(s, "initializers ({}):", self.initializers.len());
        for i in &self.initializers {
            let shape = serde_json::to_string(&i.shape).expect("dims serialise");
            let ext = if i.external { " (external)" } else { "" };
            let _ = writeln!(s, "  {:<60} {:<16} {}{}", i.name, shape, i.dtype, ext);
        }
        s
    }
}

/// What `fuse` would do to the model at `path` (blocks, refusals), and its initializers; writes
/// nothing.
pub fn inspect_file(path: &Path) -> Result<InspectReport> {
    let original = Model::load(path)?;
    let mut model = original.clone();
    let analysis = guarded(path, "analysing", || fuse(&mut model))?;
    let initializers = original
        .graph()
        .initializer
        .iter()
        .map(|t| InitializerInfo {
            name: t.name().to_string(),
            shape: t.dims.clone(),
            dtype: crate::proto::tensor_proto::DataType::try_from(t.data_type.unwrap_or(0))
                .map(|d| d.as_str_name().to_string())
                .unwrap_or_else(|_| "?".into()),
            external: crate::model::external::is_external(t),
        })
        .collect();
    let m = &original.proto;
    Ok(InspectReport {
        model: path.display().to_string(),
        analysis,
        initializers,
        ir_version: m.ir_version(),
        opset: crate::graph::default_opset(m),
        producer: format!("{} {}", m.producer_name(), m.producer_version()),
    })
}
