//! Inference latency of a model before and after fusion (`fuse --bench`): the payoff of fusing,
//! measured in tract on the user's own model.
//!
//! Unlike [`verify`](crate::verify()), which runs un-optimised plans on purpose, this runs tract's
//! **optimised** plan (`into_typed` → `into_optimized` → `into_runnable`): what a deployment
//! runs. Both models get the same inputs, made as the equivalence check makes its first sample
//! (same [`VerifyOptions`]: seed, `--input-shape`, input files; symbolic dims as 1).
//!
//! Timing: both plans are built first; each model is warmed up (at least one run, at most
//! [`BenchOptions::max_warmup`], until a quarter of [`BenchOptions::time`] is spent on it); then
//! the two run in turns (the order alternating every round, so that a change in the machine's
//! load hits both alike) until about `time` per model has been spent in timed runs, at least
//! [`BenchOptions::min_runs`] and at most [`BenchOptions::max_runs`] rounds. Each run is one
//! inference with a reused state; the inputs are copied outside the timed span.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tract_onnx::prelude::*;

use crate::error::{catch, Error};
use crate::tract::errors::{chain_msg, describe_failure, panic_msg};
use crate::tract::{load, prepare, PlanKind, PlanSpec};
use crate::verify::inputs::{first_sample, FirstSample};
use crate::verify::{InputSpec, VerifyOptions};

/// What tract plan the latency is of (the `plan` field of [`BenchReport`]).
pub const PLAN: &str = "tract optimised";

/// How long and how often to time (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Time to spend in timed runs, per model (default 1 s).
    pub time: Duration,
    /// Fewest timed runs per model, unless `max_runs` is smaller (default 3).
    pub min_runs: usize,
    /// Most timed runs per model (default 50).
    pub max_runs: usize,
    /// Most warm-up runs per model (default 3; at least one is always made).
    pub max_warmup: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { time: Duration::from_secs(1), min_runs: 3, max_runs: 50, max_warmup: 3 }
    }
}

/// Latency of the model before and after fusion, per inference, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Median latency of the input model.
    pub before_ms: f64,
    /// Median latency of the fused model.
    pub after_ms: f64,
    /// `before_ms / after_ms` (> 1: the fused model is faster).
    pub speedup: f64,
    /// Fastest run of each.
    pub min_before_ms: f64,
    pub min_after_ms: f64,
    /// Timed runs of each (after the warm-up).
    pub runs_before: usize,
    pub runs_after: usize,
    /// Untimed warm-up runs of each.
    pub warmup_runs: usize,
    /// [`PLAN`].
    pub plan: String,
    /// The inputs both models ran on.
    pub inputs: Vec<InputSpec>,
    /// As in the verify report (symbolic dims set to 1, ...).
    pub notes: Vec<String>,
}

impl BenchReport {
    /// `latency: 12.3 ms -> 8.12 ms (1.52x faster, median of 40 runs, tract optimised plan)`
    pub fn summary(&self) -> String {
        let ratio = if self.speedup >= 1.0 {
            format!("{:.2}x faster", self.speedup)
        } else if self.speedup > 0.0 {
            format!("{:.2}x slower", 1.0 / self.speedup)
        } else {
            "ratio unknown".into()
        };
        let runs = if self.runs_before == self.runs_after {
            format!("{} run{}", self.runs_before, if self.runs_before == 1 { "" } else { "s" })
        } else {
            format!("{} / {} runs", self.runs_before, self.runs_after)
        };
        format!(
            "latency: {} ms -> {} ms ({ratio}, median of {runs}, {PLAN} plan)\n",
            fmt_ms(self.before_ms),
            fmt_ms(self.after_ms)
        )
    }
}

/// Three significant digits or so: `123`, `12.3`, `1.23`, `0.123`, `0.0123`.
pub fn fmt_ms(ms: f64) -> String {
    let a = ms.abs();
    if !ms.is_finite() {
        format!("{ms}")
    } else if a >= 100.0 {
        format!("{ms:.0}")
    } else if a >= 10.0 {
        format!("{ms:.1}")
    } else if a >= 1.0 {
        format!("{ms:.2}")
    } else if a >= 0.1 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.4}")
    }
}

/// Median of non-empty `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One model ready to run: its plan's state and its inputs in its own order.
struct Runner<'a> {
    path: &'a Path,
    state: TypedSimpleState,
    inputs: Vec<Tensor>,
    outputs: usize,
}

impl Runner<'_> {
    /// One inference; its wall time in seconds.
    fn run(&mut self) -> Result<f64, Error> {
        let run_err = |msg: String| Error::Run { path: self.path.to_path_buf(), msg };
        let inputs: TVec<TValue> = self.inputs.iter().map(|t| t.clone().into_tvalue()).collect();
        let state = &mut self.state;
        let t0 = Instant::now();
        let res = catch(|| state.run(inputs));
        let dt = t0.elapsed().as_secs_f64();
        match res {
            Err(p) => Err(run_err(panic_msg(p))),
            Ok(Err(e)) => Err(run_err(describe_failure(self.path, &e).1)),
            Ok(Ok(o)) if o.len() != self.outputs => {
                Err(run_err(format!("model produced {} outputs, expected {}", o.len(), self.outputs)))
            }
            Ok(Ok(_)) => Ok(dt),
        }
    }
}

/// Tract latency of `before` and of `after` (see the module docs), on the inputs `inputs`
/// describes (only its seed, shapes and input files are used). `Err` when either model cannot
/// be loaded, typed, optimised or run by tract (e.g. [`Error::Unsupported`]).
pub fn bench_latency(
    before: &Path,
    after: &Path,
    inputs: &VerifyOptions,
    opts: &BenchOptions,
) -> Result<BenchReport, Error> {
    let secs = opts.time.as_secs_f64();
    if !secs.is_finite() {
        return Err(Error::Input("bench time must be finite".into()));
    }
    let a = load(before)?;
    let b = load(after)?;
    let (sa, sb) = (a.signature()?, b.signature()?);
    let mut notes = vec![];
    // the equivalence check's first sample
    let FirstSample { facts, specs, data } = first_sample(&sa, &sb, inputs, &mut notes)?;
    let mut runners = vec![];
    for (path, m) in [(before, a), (after, b)] {
        let (plan, in_names, out_names) = prepare(&m, &facts, &mut notes, PlanSpec::of(PlanKind::Optimised))?;
        let state = catch(|| plan.spawn())
            .map_err(|p| Error::Run { path: path.to_path_buf(), msg: panic_msg(p) })?
            .map_err(|e| Error::Run { path: path.to_path_buf(), msg: chain_msg(&e) })?;
        let inputs = in_names.iter().map(|n| data[n].clone()).collect();
        runners.push(Runner { path, state, inputs, outputs: out_names.len() });
    }
    drop(data);

    // warm-up: the same number of runs for both
    let mut warmup = 0;
    let mut warm = [0.0f64; 2];
    while warmup < opts.max_warmup.max(1) && (warmup == 0 || warm.iter().all(|&t| t < secs / 4.0)) {
        for (r, w) in runners.iter_mut().zip(&mut warm) {
            *w += r.run()?;
        }
        warmup += 1;
    }

    let max_runs = opts.max_runs.max(1);
    let min_runs = opts.min_runs.clamp(1, max_runs);
    let mut times: [Vec<f64>; 2] = [vec![], vec![]];
    loop {
        let round = times[0].len();
        let order = if round.is_multiple_of(2) { [0, 1] } else { [1, 0] };
        for i in order {
            times[i].push(runners[i].run()?);
        }
        let n = round + 1;
        let spent: f64 = times.iter().map(|t| t.iter().sum::<f64>()).sum();
        if n >= max_runs || (n >= min_runs && spent >= 2.0 * secs) {
            break;
        }
    }
    let [mut ta, mut tb] = times;
    let ms = 1e3;
    let (before_ms, after_ms) = (median(&mut ta) * ms, median(&mut tb) * ms);
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    Ok(BenchReport {
        before_ms,
        after_ms,
        speedup: before_ms / after_ms,
        min_before_ms: ta[0] * ms,
        min_after_ms: tb[0] * ms,
        runs_before: ta.len(),
        runs_after: tb.len(),
        warmup_runs: warmup,
        plan: PLAN.into(),
        inputs: specs,
        notes,
    })
}
