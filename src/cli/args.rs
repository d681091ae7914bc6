//! The command line's arguments, and the library options they stand for.

use crate::bench::BenchOptions;
use crate::error::Error;
use crate::model::save::DataMode;
use crate::pipeline::FuseOptions;
use crate::verify::{Criterion, Stat, VerifyOptions, NOISE_FACTOR};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "acnet-onnx",
    version,
    about = "Fuse re-parameterised CNN blocks (ACNet, RepVGG, ...) in ONNX models into plain convolutions, and prove the equivalence"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Rewrite every re-parameterisable block into one Conv, verify in tract, write the result.
    Fuse(FuseArgs),
    /// Run two models in tract on the same inputs and compare every output.
    Verify(VerifyArgs),
    /// Show the blocks found, why any would not be fused, and the initializers; writes nothing.
    Inspect(InspectArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct CheckArgs {
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Number of random input sets.
    #[arg(long, default_value_t = 3)]
    pub(crate) samples: usize,
    /// How outputs are judged: `noise` (default: no further from the reference than
    /// --noise-factor times its own rounding noise) or `tolerance` (--atol/--rtol; implied by
    /// giving either, or --stat).
    #[arg(long, value_name = "noise|tolerance")]
    pub(crate) criterion: Option<Criterion>,
    /// Noise criterion: how many times the reference's rounding noise an output may be off.
    #[arg(long, value_name = "K", default_value_t = NOISE_FACTOR)]
    pub(crate) noise_factor: f64,
    /// Absolute tolerance (default 1e-4): an element passes when |a-b| <= atol + rtol*|a|;
    /// `name:X` for one output (repeatable).
    #[arg(long, value_name = "[NAME:]X")]
    pub(crate) atol: Vec<String>,
    /// Relative tolerance (default 1e-4); `name:X` for one output (repeatable).
    #[arg(long, value_name = "[NAME:]X")]
    pub(crate) rtol: Vec<String>,
    /// The error statistic: elementwise (default), max, mean, median or quantile:Q.
    #[arg(long, value_name = "STAT")]
    pub(crate) stat: Option<Stat>,
    /// Shape of an input with symbolic dims, `name:1,3,224,224` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    pub(crate) input_shape: Vec<String>,
    /// Real input data, `name=file.npy` (repeatable).
    #[arg(long = "input", value_name = "NAME=FILE")]
    pub(crate) input: Vec<String>,
    /// Real input data: an .npz whose arrays are named like the graph inputs (one sample).
    #[arg(long, value_name = "FILE.npz")]
    pub(crate) inputs: Option<PathBuf>,
    /// Write the inputs and the reference's outputs (first sample) to an .npz.
    #[arg(long, value_name = "FILE.npz")]
    pub(crate) save_outputs: Option<PathBuf>,
    /// Compare the candidate with golden outputs made elsewhere (an .npz named like the outputs,
    /// from the inputs given with --inputs/--input) instead of the reference's.
    #[arg(long, value_name = "FILE.npz")]
    pub(crate) load_outputs: Option<PathBuf>,
    /// Use the inference forms of training-mode BatchNormalization (running statistics) and
    /// Dropout (identity): for models exported without model.eval().
    #[arg(long)]
    pub(crate) eval_bn: bool,
    /// Treat initializers that are also graph inputs as constants (exports with
    /// keep_initializers_as_inputs=True); `fuse` removes them from the graph inputs.
    #[arg(long)]
    pub(crate) freeze_initializers: bool,
    /// Accept a check that could not run a part of the models (cut off by nodes tract cannot
    /// run) in which they differ: exit 0 with a warning instead of 2 (`fuse` writes the output).
    #[arg(long)]
    pub(crate) allow_unchecked: bool,
}

/// `X` or `name:X` (the last `:` separates them).
fn tolerance(flag: &str, s: &str) -> Result<(Option<String>, f64), Error> {
    let bad = || Error::Usage(format!("{flag} {s:?}: expected a number, or name:number"));
    if let Ok(v) = s.trim().parse::<f64>() {
        return Ok((None, v));
    }
    let (name, v) = s.rsplit_once(':').ok_or_else(bad)?;
    Ok((Some(name.to_string()), v.trim().parse::<f64>().map_err(|_| bad())?))
}

#[derive(Args, Debug)]
pub(crate) struct FuseArgs {
    /// The model to fuse (never modified unless --in-place).
    pub(crate) model: PathBuf,
    /// Where to write the fused model.
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Write the weights to `<output>.data` (default: as the input came).
    #[arg(long, conflicts_with = "inline")]
    pub(crate) external_data: bool,
    /// Write every weight inside the model file.
    #[arg(long)]
    pub(crate) inline: bool,
    /// Skip the equivalence check.
    #[arg(long)]
    pub(crate) no_verify: bool,
    /// Write the output even when the check fails (with a warning).
    #[arg(long)]
    pub(crate) force: bool,
    /// Allow -o to name the input itself.
    #[arg(long)]
    pub(crate) in_place: bool,
    /// Write the JSON report (fuse summary + equivalence check), also when the check fails.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Measure tract's latency (optimised plan) of the model before and after fusion, on the
    /// check's inputs.
    #[arg(long)]
    pub(crate) bench: bool,
    /// --bench: seconds of timed runs per model (default 1; at least 3 runs).
    #[arg(long, value_name = "SECONDS", requires = "bench")]
    pub(crate) bench_time: Option<f64>,
    /// --bench: most timed runs per model (default 50).
    #[arg(long, value_name = "N", requires = "bench")]
    pub(crate) bench_runs: Option<usize>,
    #[command(flatten)]
    pub(crate) check: CheckArgs,
}

impl FuseArgs {
    /// The timing options of `--bench`.
    fn bench_options(&self) -> Result<BenchOptions, Error> {
        let mut o = BenchOptions::default();
        if let Some(t) = self.bench_time {
            if !(t.is_finite() && (0.0..=86400.0).contains(&t)) {
                return Err(Error::Usage(format!("--bench-time must be a number of seconds from 0 to 86400, got {t}")));
            }
            o.time = std::time::Duration::from_secs_f64(t);
        }
        if let Some(n) = self.bench_runs {
            if n == 0 {
                return Err(Error::Usage("--bench-runs must be at least 1".into()));
            }
            o.max_runs = n;
        }
        Ok(o)
    }

    /// The pipeline's options.
    pub(super) fn options(&self) -> Result<FuseOptions, Error> {
        let data = if self.external_data {
            DataMode::External
        } else if self.inline {
            DataMode::Inline
        } else {
            DataMode::Auto
        };
        Ok(FuseOptions {
            data,
            no_verify: self.no_verify,
            check: self.check.options()?,
            force: self.force,
            in_place: self.in_place,
            bench: if self.bench { Some(self.bench_options()?) } else { None },
            report: self.report.clone(),
        })
    }
}

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// The reference model.
    pub(crate) reference: PathBuf,
    /// The model that should compute the same function.
    pub(crate) candidate: PathBuf,
    /// Write the JSON report.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) check: CheckArgs,
}

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// The model to inspect.
    pub(crate) model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

impl CheckArgs {
    /// The check's options (validated by the pipeline).
    pub(super) fn options(&self) -> Result<VerifyOptions, Error> {
        let mut o = VerifyOptions {
            seed: self.seed,
            samples: self.samples,
            noise_factor: self.noise_factor,
            save_outputs: self.save_outputs.clone(),
            load_outputs: self.load_outputs.clone(),
            eval_bn: self.eval_bn,
            freeze_initializers: self.freeze_initializers,
            allow_unchecked: self.allow_unchecked,
            progress: true,
            ..Default::default()
        };
        let tolerances = !self.atol.is_empty() || !self.rtol.is_empty() || self.stat.is_some();
        o.criterion = self.criterion.unwrap_or(if tolerances { Criterion::Tolerance } else { Criterion::Noise });
        o.stat = self.stat.unwrap_or_default();
        for (flag, values) in [("--atol", &self.atol), ("--rtol", &self.rtol)] {
            for s in values {
                let (name, v) = tolerance(flag, s)?;
                match (flag, name) {
                    ("--atol", None) => o.atol = v,
                    ("--atol", Some(n)) => o.output_atol.push((n, v)),
                    (_, None) => o.rtol = v,
                    (_, Some(n)) => o.output_rtol.push((n, v)),
                }
            }
        }
        for s in &self.input_shape {
            let (name, dims) = s
                .rsplit_once(':')
                .ok_or_else(|| Error::Usage(format!("--input-shape {s:?}: expected name:d1,d2,...")))?;
            let dims: Result<Vec<usize>, _> = dims.split(',').map(|d| d.trim().parse::<usize>()).collect();
            o.input_shapes.push((
                name.to_string(),
                dims.map_err(|_| Error::Usage(format!("--input-shape {s:?}: dims must be whole numbers")))?,
            ));
        }
        for s in &self.input {
            let (name, file) =
                s.split_once('=').ok_or_else(|| Error::Usage(format!("--input {s:?}: expected name=file.npy")))?;
            o.input_files.push((name.to_string(), PathBuf::from(file)));
        }
        o.inputs_npz = self.inputs.clone();
        Ok(o)
    }
}
