//! The Python extension module `acnet_onnx._native` (cargo feature `python`, built by maturin
//! from `pyproject.toml`). The package `python/acnet_onnx` wraps it: it turns bytes and
//! `onnx.ModelProto`s into files, the JSON text into a dict, and shows the warnings.
//!
//! The keyword arguments of `fuse` and `verify` are the command line's flags in snake_case
//! (`--input-shape` is `input_shape`), read from the tables below: adding an option is one line
//! in a table, plus its line in `python/acnet_onnx/__init__.pyi` and in the docstring of
//! `python/acnet_onnx/__init__.py` (the Python tests check that all three agree).
//!
//! The GIL is released while the Rust code runs, so other Python threads go on.

use crate::bench::BenchOptions;
use crate::error::{catch, install_panic_hook, one_line};
use crate::verify::Criterion;
use crate::{fuse_file, inspect_file, verify_files, DataMode, FuseOptions, VerifyFileOptions, VerifyOptions};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::ffi::OsString;
use std::path::PathBuf;

mod exception {
    pyo3::create_exception!(
        acnet_onnx,
        Error,
        pyo3::exceptions::PyException,
        "acnet-onnx could not do it: an unreadable or invalid model, an operator tract cannot run, \
         different signatures, a bad input file ... `str(e)` is the one-line message the command \
         line prints, `e.exit_code` its exit code (2)."
    );
}

/// Sets one option from the value of its keyword argument (never `None`: `None` keeps the default).
type Setter<T> = for<'py> fn(&mut T, &Bound<'py, PyAny>) -> PyResult<()>;

/// A setter: `set!(o, v => o.seed = v.extract()?)`.
macro_rules! set {
    ($o:ident, $v:ident => $body:expr) => {
        |$o, $v| {
            $body;
            Ok(())
        }
    };
}

/// The check's options as given, before the criterion is chosen.
#[derive(Default)]
struct CheckKwargs {
    opts: VerifyOptions,
    criterion: Option<Criterion>,
    /// atol, rtol or stat given: they imply the tolerance criterion (as on the command line)
    tolerances: bool,
}

impl CheckKwargs {
    fn finish(mut self) -> PyResult<VerifyOptions> {
        let implied = if self.tolerances { Criterion::Tolerance } else { Criterion::Noise };
        self.opts.criterion = self.criterion.unwrap_or(implied);
        self.opts.validate().map_err(PyValueError::new_err)?;
        Ok(self.opts)
    }
}

/// The options of the equivalence check, taken by `fuse` and `verify` (the CLI's check options).
const CHECK_OPTIONS: &[(&str, Setter<CheckKwargs>)] = &[
    ("seed", set!(o, v => o.opts.seed = v.extract()?)),
    ("samples", set!(o, v => o.opts.samples = v.extract()?)),
    ("criterion", set!(o, v => o.criterion = Some(parse(v)?))),
    ("noise_factor", set!(o, v => o.opts.noise_factor = v.extract()?)),
    // --atol X and --atol NAME:X: a number, or a mapping {output: number}
    ("atol", set!(o, v => tolerance(v, &mut o.opts.atol, &mut o.opts.output_atol, &mut o.tolerances)?)),
    ("rtol", set!(o, v => tolerance(v, &mut o.opts.rtol, &mut o.opts.output_rtol, &mut o.tolerances)?)),
    ("stat", set!(o, v => (o.opts.stat, o.tolerances) = (parse(v)?, true))),
    // --input-shape NAME:DIMS: a mapping {name: dims}
    ("input_shape", set!(o, v => o.opts.input_shapes = pairs(v)?)),
    // --input NAME=FILE: a mapping {name: path} (`input` names the model in `fuse`)
    ("input_files", set!(o, v => o.opts.input_files = pairs(v)?)),
    ("inputs", set!(o, v => o.opts.inputs_npz = Some(v.extract()?))),
    ("save_outputs", set!(o, v => o.opts.save_outputs = Some(v.extract()?))),
    ("load_outputs", set!(o, v => o.opts.load_outputs = Some(v.extract()?))),
    ("eval_bn", set!(o, v => o.opts.eval_bn = v.extract()?)),
    ("freeze_initializers", set!(o, v => o.opts.freeze_initializers = v.extract()?)),
    ("allow_unchecked", set!(o, v => o.opts.allow_unchecked = v.extract()?)),
    // not a flag: the CLI always shows progress; the Python API only when asked
    ("progress", set!(o, v => o.opts.progress = v.extract()?)),
];

/// A value the command line parses from text (`criterion="tolerance"`, `stat="quantile:0.99"`).
fn parse<T: std::str::FromStr<Err = String>>(v: &Bound<'_, PyAny>) -> PyResult<T> {
    v.extract::<String>()?.parse().map_err(PyValueError::new_err)
}

/// `atol`/`rtol`: a number for every output, or a mapping {output: number}.
fn tolerance(
    v: &Bound<'_, PyAny>,
    all: &mut f64,
    per_output: &mut Vec<(String, f64)>,
    given: &mut bool,
) -> PyResult<()> {
    *given = true;
    if v.hasattr("items")? {
        *per_output = pairs(v)?;
    } else {
        *all = v.extract()?;
    }
    Ok(())
}

/// `fuse`'s options as given, before they are checked together.
#[derive(Default)]
struct FuseKwargs {
    opts: FuseOptions,
    check: CheckKwargs,
    external_data: bool,
    inline: bool,
    bench: bool,
    bench_time: Option<f64>,
    bench_runs: Option<usize>,
}

/// The options of `fuse` besides the check's (the CLI's `fuse` flags; `verify=False` is
/// `--no-verify`).
const FUSE_OPTIONS: &[(&str, Setter<FuseKwargs>)] = &[
    ("verify", set!(o, v => o.opts.no_verify = !v.extract::<bool>()?)),
    ("external_data", set!(o, v => o.external_data = v.extract()?)),
    ("inline", set!(o, v => o.inline = v.extract()?)),
    ("force", set!(o, v => o.opts.force = v.extract()?)),
    ("in_place", set!(o, v => o.opts.in_place = v.extract()?)),
    ("report", set!(o, v => o.opts.report = Some(v.extract()?))),
    ("bench", set!(o, v => o.bench = v.extract()?)),
    ("bench_time", set!(o, v => o.bench_time = Some(v.extract()?))),
    ("bench_runs", set!(o, v => o.bench_runs = Some(v.extract()?))),
];

/// The options of `verify` besides the check's.
const VERIFY_OPTIONS: &[(&str, Setter<VerifyFileOptions>)] = &[("report", set!(o, v => o.report = Some(v.extract()?)))];

/// A mapping's items as `(name, value)` pairs, in the mapping's order.
fn pairs<T>(v: &Bound<'_, PyAny>) -> PyResult<Vec<(String, T)>>
where
    for<'a, 'py> T: FromPyObject<'a, 'py, Error = PyErr>,
{
    if !v.hasattr("items")? {
        return Err(PyTypeError::new_err(format!("expected a mapping {{name: value}}, got {}", v.get_type().name()?)));
    }
    v.call_method0("items")?.try_iter()?.map(|item| item?.extract::<(String, T)>()).collect()
}

/// Apply one keyword argument from `table` to `target`; `false` when the table does not have it.
/// A value of the wrong type is a `TypeError`, a wrong value (a negative count) a `ValueError`,
/// both naming the option.
fn apply<T>(table: &[(&str, Setter<T>)], target: &mut T, name: &str, value: &Bound<'_, PyAny>) -> PyResult<bool> {
    let Some((_, setter)) = table.iter().find(|(n, _)| *n == name) else {
        return Ok(false);
    };
    if value.is_none() {
        return Ok(true);
    }
    setter(target, value).map_err(|e| {
        let py = value.py();
        let given = one_line(&value.repr().map(|r| r.to_string()).unwrap_or_default());
        let msg = format!("{name}={given}: {}", e.value(py));
        if e.is_instance_of::<PyTypeError>(py) {
            PyTypeError::new_err(msg)
        } else {
            PyValueError::new_err(msg)
        }
    })?;
    Ok(true)
}

/// The names of the options a function takes (for the error on an unknown one, and the tests).
fn names<A, B>(first: &[(&'static str, A)], then: &[(&'static str, B)]) -> Vec<&'static str> {
    first.iter().map(|(n, _)| *n).chain(then.iter().map(|(n, _)| *n)).collect()
}

fn unknown(function: &str, name: &str, known: &[&str]) -> PyErr {
    PyTypeError::new_err(format!(
        "{function}() got an unexpected keyword argument '{name}' (its options: {})",
        known.join(", ")
    ))
}

fn fuse_options(options: Option<&Bound<'_, PyDict>>) -> PyResult<FuseOptions> {
    let mut kw = FuseKwargs::default();
    for (k, v) in options.into_iter().flatten() {
        let name: String = k.extract()?;
        if !apply(FUSE_OPTIONS, &mut kw, &name, &v)? && !apply(CHECK_OPTIONS, &mut kw.check, &name, &v)? {
            return Err(unknown("fuse", &name, &fuse_option_names()));
        }
    }
    if kw.external_data && kw.inline {
        return Err(PyValueError::new_err("external_data and inline exclude each other"));
    }
    kw.opts.data = match (kw.external_data, kw.inline) {
        (true, _) => DataMode::External,
        (_, true) => DataMode::Inline,
        _ => DataMode::Auto,
    };
    for (name, given) in [("bench_time", kw.bench_time.is_some()), ("bench_runs", kw.bench_runs.is_some())] {
        if given && !kw.bench {
            return Err(PyValueError::new_err(format!("{name} needs bench=True")));
        }
    }
    if kw.bench {
        let mut b = BenchOptions::default();
        if let Some(t) = kw.bench_time {
            if !(t.is_finite() && (0.0..=86400.0).contains(&t)) {
                return Err(PyValueError::new_err(format!(
                    "bench_time must be a number of seconds from 0 to 86400, got {t}"
                )));
            }
            b.time = std::time::Duration::from_secs_f64(t);
        }
        if let Some(n) = kw.bench_runs {
            if n == 0 {
                return Err(PyValueError::new_err("bench_runs must be at least 1"));
            }
            b.max_runs = n;
        }
        kw.opts.bench = Some(b);
    }
    kw.opts.check = kw.check.finish()?;
    Ok(kw.opts)
}

fn verify_options(options: Option<&Bound<'_, PyDict>>) -> PyResult<VerifyFileOptions> {
    let mut opts = VerifyFileOptions::default();
    let mut check = CheckKwargs::default();
    for (k, v) in options.into_iter().flatten() {
        let name: String = k.extract()?;
        if !apply(VERIFY_OPTIONS, &mut opts, &name, &v)? && !apply(CHECK_OPTIONS, &mut check, &name, &v)? {
            return Err(unknown("verify", &name, &verify_option_names()));
        }
    }
    opts.check = check.finish()?;
    Ok(opts)
}

fn fuse_option_names() -> Vec<&'static str> {
    names(FUSE_OPTIONS, CHECK_OPTIONS)
}

fn verify_option_names() -> Vec<&'static str> {
    names(VERIFY_OPTIONS, CHECK_OPTIONS)
}

/// The library's error as the Python exception: the one-line message and the exit code.
fn error(py: Python<'_>, e: crate::Error) -> PyErr {
    let err = exception::Error::new_err(one_line(&e.to_string()));
    let _ = err.value(py).setattr("exit_code", e.exit_code());
    err
}

/// Run `f` with the GIL released; a panic (a bug) becomes the Python exception, one line.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    match py.detach(|| catch(f)) {
        Ok(r) => r.map_err(|e| error(py, e)),
        Err(p) => Err(error(
            py,
            crate::Error::Internal(format!(
                "internal error: {} (this is a bug in acnet-onnx: please report it)",
                p.message()
            )),
        )),
    }
}

/// `fuse`: (the JSON report, the exit code, the files written, the warnings).
#[pyfunction]
#[pyo3(signature = (input, output, options = None))]
fn fuse(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<(String, i32, Vec<PathBuf>, Vec<String>)> {
    let opts = fuse_options(options)?;
    let r = run(py, || fuse_file(&input, &output, &opts))?;
    let written = r.written.iter().flat_map(|s| std::iter::once(s.model.clone()).chain(s.data.clone())).collect();
    Ok((r.to_json().to_string(), r.exit_code(), written, r.warnings.clone()))
}

/// `verify`: (the JSON report, the exit code).
#[pyfunction]
#[pyo3(signature = (reference, candidate, options = None))]
fn verify(
    py: Python<'_>,
    reference: PathBuf,
    candidate: PathBuf,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<(String, i32)> {
    let opts = verify_options(options)?;
    let r = run(py, || verify_files(&reference, &candidate, &opts))?;
    Ok((serde_json::to_string(&r).expect("a report serialises"), r.exit_code()))
}

/// `inspect`: the JSON report (`inspect --json`).
#[pyfunction]
fn inspect(py: Python<'_>, model: PathBuf) -> PyResult<String> {
    let r = run(py, || inspect_file(&model))?;
    Ok(serde_json::to_string(&r).expect("a report serialises"))
}

/// The command line (`args`: the program name first), as the `acnet-onnx` binary runs it:
/// prints what it prints, returns its exit code.
#[pyfunction]
fn main(py: Python<'_>, args: Vec<OsString>) -> i32 {
    py.detach(|| {
        // what `src/main.rs` does (threads of the interpreter may exist: their arenas stay)
        crate::tune_allocator(false);
        let code = crate::cli::main(args);
        let _ = std::io::Write::flush(&mut std::io::stdout());
        code
    })
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // a panic (a bug) is reported as one line in the exception, not printed with a backtrace
    install_panic_hook();
    let error = m.py().get_type::<exception::Error>();
    error.setattr("exit_code", 2)?;
    m.add("Error", error)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FUSE_OPTIONS", fuse_option_names())?;
    m.add("VERIFY_OPTIONS", verify_option_names())?;
    m.add_function(wrap_pyfunction!(fuse, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    Ok(())
}
