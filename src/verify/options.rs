//! The check's options: how outputs are judged ([`Criterion`], [`Stat`]) and
//! [`VerifyOptions`].

use std::path::PathBuf;

/// How outputs are judged (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Criterion {
    /// No further from the reference than [`VerifyOptions::noise_factor`] times the reference's
    /// own rounding noise.
    #[default]
    Noise,
    /// Within `atol` and `rtol`.
    Tolerance,
}

impl std::str::FromStr for Criterion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "noise" => Ok(Criterion::Noise),
            "tolerance" => Ok(Criterion::Tolerance),
            _ => Err(format!("criterion {s:?}: expected noise or tolerance")),
        }
    }
}

impl std::fmt::Display for Criterion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Criterion::Noise => "noise",
            Criterion::Tolerance => "tolerance",
        })
    }
}

/// The error statistic an output is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Stat {
    /// Tolerances: every element within `atol + rtol·|a|`. Noise: the largest error.
    #[default]
    Elementwise,
    Max,
    Mean,
    Median,
    /// The `q` quantile (0 ≤ q ≤ 1).
    Quantile(f64),
}

impl std::str::FromStr for Stat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "elementwise" | "elemwise" => Stat::Elementwise,
            "max" => Stat::Max,
            "mean" => Stat::Mean,
            "median" => Stat::Median,
            _ => match s.strip_prefix("quantile:").map(str::parse::<f64>) {
                Some(Ok(q)) if (0.0..=1.0).contains(&q) => Stat::Quantile(q),
                _ => {
                    return Err(format!(
                        "statistic {s:?}: expected elementwise, max, mean, median or quantile:Q with 0 <= Q <= 1"
                    ))
                }
            },
        })
    }
}

impl std::fmt::Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stat::Elementwise => f.write_str("elementwise"),
            Stat::Max => f.write_str("max"),
            Stat::Mean => f.write_str("mean"),
            Stat::Median => f.write_str("median"),
            Stat::Quantile(q) => write!(f, "quantile:{q}"),
        }
    }
}

/// The default of [`VerifyOptions::noise_factor`].
pub const NOISE_FACTOR: f64 = 10.0;

/// Options of [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyOptions {
    /// Seed of the random inputs (default 0).
    pub seed: u64,
    /// Number of random input sets (default 3); one when every input comes from a file.
    pub samples: usize,
    /// How outputs are judged (default [`Criterion::Noise`]).
    pub criterion: Criterion,
    /// Noise criterion: how many times the reference's rounding noise an output may be off
    /// (default [`NOISE_FACTOR`]).
    pub noise_factor: f64,
    /// Tolerance criterion: absolute tolerance (default 1e-4), per-output values in `output_atol`.
    pub atol: f64,
    /// Tolerance criterion: relative tolerance (default 1e-4), per-output values in `output_rtol`.
    pub rtol: f64,
    pub output_atol: Vec<(String, f64)>,
    pub output_rtol: Vec<(String, f64)>,
    /// The error statistic (default [`Stat::Elementwise`]).
    pub stat: Stat,
    /// `--input-shape name:1,3,224,224`: concrete shapes of inputs.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// `--input name=file.npy`: real input data.
    pub input_files: Vec<(String, PathBuf)>,
    /// `--inputs file.npz`: real input data, arrays named like the graph inputs.
    pub inputs_npz: Option<PathBuf>,
    /// Write the inputs and the reference's outputs of the first sample to this .npz.
    pub save_outputs: Option<PathBuf>,
    /// Compare the candidate with these outputs (an .npz, arrays named like the outputs, made
    /// elsewhere from the same inputs, e.g. by PyTorch) instead of the reference's.
    pub load_outputs: Option<PathBuf>,
    /// Run training-mode BatchNormalization and Dropout in their inference forms.
    pub eval_bn: bool,
    /// Treat initializers listed as graph inputs as constants.
    pub freeze_initializers: bool,
    /// Print `verify: ...` progress lines on stderr once the check has run for more than 1 s.
    pub progress: bool,
    /// Accept a check that could not run a part of the models in which they differ (see
    /// [`VerifyReport::checked`](super::VerifyReport::checked)): `passed` then says whether what
    /// was checked agrees.
    pub allow_unchecked: bool,
}

impl VerifyOptions {
    /// Check the options make sense; the message names the option (as `samples`, `atol` ...).
    pub fn validate(&self) -> Result<(), String> {
        if self.samples == 0 {
            return Err("samples must be at least 1".into());
        }
        let atols = self.output_atol.iter().map(|(n, v)| (format!("atol {n}:"), *v));
        let rtols = self.output_rtol.iter().map(|(n, v)| (format!("rtol {n}:"), *v));
        for (what, v) in
            [("atol".to_string(), self.atol), ("rtol".to_string(), self.rtol)].into_iter().chain(atols).chain(rtols)
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{what} must be a finite number >= 0, got {v}"));
            }
        }
        if !(self.noise_factor >= 1.0 && self.noise_factor.is_finite()) {
            return Err(format!("noise-factor must be a finite number >= 1, got {}", self.noise_factor));
        }
        if let Stat::Quantile(q) = self.stat {
            if !(0.0..=1.0).contains(&q) {
                return Err(format!("stat quantile must be from 0 to 1, got {q}"));
            }
        }
        Ok(())
    }

    pub(crate) fn atol_of(&self, output: &str) -> f64 {
        self.output_atol.iter().rev().find(|(n, _)| n == output).map_or(self.atol, |(_, v)| *v)
    }

    pub(crate) fn rtol_of(&self, output: &str) -> f64 {
        self.output_rtol.iter().rev().find(|(n, _)| n == output).map_or(self.rtol, |(_, v)| *v)
    }
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            seed: 0,
            samples: 3,
            criterion: Criterion::Noise,
            noise_factor: NOISE_FACTOR,
            atol: 1e-4,
            rtol: 1e-4,
            output_atol: vec![],
            output_rtol: vec![],
            stat: Stat::Elementwise,
            input_shapes: vec![],
            input_files: vec![],
            inputs_npz: None,
            save_outputs: None,
            load_outputs: None,
            eval_bn: false,
            freeze_initializers: false,
            progress: false,
            allow_unchecked: false,
        }
    }
}
