//! Why a candidate was left untouched: typed, so that code and tests match on what happened, and
//! displayed as the one line users read in the summary and the JSON report.

use crate::graph::ConstError;
use crate::kernel::read::ReadError;
use crate::kernel::{Misfit, SeqMisfit};
use std::fmt;

/// Why a rule refused a candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// A Conv of the block cannot be read (its weights are not constants, its attributes are of a
    /// form the algebra does not handle, ...).
    Conv {
        conv: String,
        err: ReadError,
    },
    /// The BatchNormalization cannot be read (training mode, parameters not constant, ...).
    Bn(ReadError),
    /// The BatchNormalization of an identity branch cannot be read.
    IdentityBn {
        bn: String,
        err: ReadError,
    },
    /// A constant the rewrite needs cannot be read.
    Const(ConstError),
    /// The output of a Conv of the block is also read outside it: merging would lose it.
    UsedOutside {
        conv: String,
    },
    /// A BatchNormalization of `bn` channels after a Conv of `conv` output channels.
    BnChannels {
        bn: usize,
        conv: usize,
    },
    BnConvDtypes,
    /// The branches' weights are of different dtypes.
    BranchDtypes,
    /// The branch with the largest kernel reads a cropped input.
    CroppedBase {
        branch: String,
        crop_begin: Vec<i64>,
        crop_end: Vec<i64>,
    },
    /// An identity branch, but the merged Conv changes the number of channels.
    IdentityChannels {
        branch: String,
        inputs: usize,
        outputs: usize,
    },
    /// An identity BatchNormalization of another number of channels.
    IdentityBnChannels(usize),
    /// A branch's kernel does not fit inside the largest one.
    Misfit {
        branch: String,
        misfit: Misfit,
    },
    /// A branch multiplied by a constant that is not per channel.
    NotPerChannel {
        branch: String,
        shape: Vec<usize>,
    },
    /// No Conv among the branches of a group.
    NoConv,
    /// A per-channel affine map to fold forward (node `node` of operator `op`: a
    /// BatchNormalization, or a Mul, Div, Add or Sub of a constant) also reaches a node it cannot
    /// be folded into (`reader`, of operator `reader_op`).
    ForwardBlocked {
        op: String,
        node: String,
        reader: String,
        reader_op: String,
    },
    /// An affine map with a nonzero shift before a Conv that zero-pads.
    ShiftPadded {
        op: String,
        node: String,
        conv: String,
    },
    /// An affine map with a nonzero shift before MatMuls with no bias Add to take it (more than
    /// one; or one, after a BatchNormalization, which would only become an Add).
    ShiftNoBias {
        op: String,
        node: String,
        matmuls: Vec<String>,
    },
    /// An affine map that zeroes a channel cannot fold into a following BatchNormalization.
    ZeroScale {
        op: String,
        node: String,
    },
    /// An affine map by a constant (node `node` of operator `op`) of another number of channels
    /// than the layer next to it has.
    Channels {
        op: String,
        node: String,
        channels: usize,
        layer: String,
        layer_channels: usize,
    },
    /// Two convolutions in sequence that are not one.
    Sequential {
        first: String,
        second: String,
        misfit: SeqMisfit,
    },
    /// Two convolutions in sequence whose composition costs more than the two.
    SequentialCost {
        first: String,
        second: String,
        kernel: String,
        weights: usize,
        chain_weights: usize,
        chain_macs: usize,
        /// the sum the two are a branch of, if they are one: whether a Conv of it takes them at
        /// no cost
        sum: Option<Box<ChainSum>>,
    },
    /// A value the rewrite would write does not fit its type (float16 weights past ±65504 after
    /// a BN fold, say, or tiny ones that would round to zero).
    NotRepresentable {
        tensor: String,
        dtype: crate::model::tensor::FloatType,
        overflow: usize,
        underflow: usize,
    },
    /// The general path could not prove the region is one convolution.
    Region(RegionReason),
    /// The region around an FC (a 1x1 Conv, MatMul or Gemm on rearranged elements) is not that
    /// FC with new weights.
    Fc {
        fc: String,
        why: FcMisfit,
    },
}

/// Why a region is not the FC it holds with new weights (`merge_into_fc`).
#[derive(Clone, Debug, PartialEq)]
pub enum FcMisfit {
    /// The operators from `from` to `to` on the FC's path do more than rearrange elements.
    NotRearranged { from: String, to: String },
    /// A shape on the FC's path is computed from a branch that the rewrite removes.
    ShapeFromRemoved { node: String },
    /// The FC's weight is not of its operator's form (groups that do not divide it).
    Weight { shape: Vec<usize> },
    /// The FC's input is not rows of its input features.
    Input { shape: Vec<usize>, features: usize },
    /// The response to zero, in the FC's output coordinates, differs between rows.
    BiasNotPerFeature,
    /// An impulse in one row of the FC's input reaches another row.
    MixesRows,
    /// The recovered matrix has weights between the FC's groups.
    Groups { groups: usize, max_abs: f64 },
    /// The matrix to recover would hold more weights than the general path evaluates.
    TooBig { weights: u128 },
    /// The FC with the recovered weights does not reproduce the region.
    NotRecovered { max_diff: f64 },
}

/// Two convolutions in sequence that are a branch of a sum: what the sum does with them.
#[derive(Clone, Debug, PartialEq)]
pub enum ChainSum {
    /// A Conv of the sum reading the same input holds their composition (the same output,
    /// stride and groups, its taps inside the Conv's window): merged into it, it costs nothing.
    Held {
        sum: String,
        /// the Conv, and its kernel
        conv: String,
        kernel: String,
        /// whether the sum is merged (else it is refused, and says why)
        merged: bool,
    },
    /// No Conv branch of the sum reading the same input holds it; the largest of them (name,
    /// kernel), if there is one.
    NotHeld { sum: String, largest: Option<(String, String)> },
}

/// Why the general path (`affine_region`) refused a region.
#[derive(Clone, Debug, PartialEq)]
pub enum RegionReason {
    /// A Pad with negative amounts (a crop), which tract cannot run.
    NegativePad {
        pad: String,
    },
    /// A tensor inside the region is also read outside it.
    UsedOutside {
        tensor: String,
    },
    /// The size of the region's input is not known.
    SizeUnknown {
        tensor: String,
        /// why tract's analysis of the model stopped short, if it did
        why: Option<String>,
    },
    /// No convolution window fits the region's output size.
    Geometry,
    /// The region's input is not `[N, C, spatial...]` with the Conv's channels.
    InputShape(Vec<usize>),
    /// No Conv reads the region's input and its operators give no window (so there is no
    /// geometry to recover).
    NoConv,
    /// tract cannot evaluate the region (the text is tract's or the size check's).
    CannotEvaluate(String),
    /// Evaluating the region failed (tract's message).
    Tract(String),
    /// The region's output is not the Conv's.
    OutputShape {
        got: Vec<usize>,
        want: Vec<i64>,
    },
    /// The response to zero differs across the plane (the borders see something else).
    BiasNotConstant,
    InputTooSmall,
    /// The kernel to recover would hold more weights than the general path evaluates (2^26).
    KernelTooBig {
        weights: u128,
    },
    ReadsOutsideWindow,
    /// An input sample changes another sample's output.
    MixesSamples,
    /// The recovered convolution does not reproduce the region.
    NotRecovered {
        max_diff: f64,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Conv { conv, err } => write!(f, "Conv '{conv}': {err}"),
            Reason::Bn(err) => write!(f, "{err}"),
            Reason::IdentityBn { bn, err } => write!(f, "{err} ('{bn}')"),
            Reason::Const(err) => write!(f, "{err}"),
            Reason::UsedOutside { conv } => write!(f, "output of Conv '{conv}' is also used outside the block"),
            Reason::BnChannels { bn, conv } => {
                write!(f, "BatchNormalization of {bn} channels after a Conv of {conv}")
            }
            Reason::BnConvDtypes => f.write_str("BatchNormalization and Conv have different dtypes"),
            Reason::BranchDtypes => f.write_str("branches of different dtypes"),
            Reason::CroppedBase { branch, crop_begin, crop_end } => write!(
                f,
                "the largest kernel (Conv '{branch}') reads a cropped input (crop {crop_begin:?}/{crop_end:?})"
            ),
            Reason::IdentityChannels { branch, inputs, outputs } => {
                write!(f, "identity branch '{branch}' but the Conv maps {inputs} to {outputs} channels")
            }
            Reason::IdentityBnChannels(c) => write!(f, "identity BatchNormalization of {c} channels"),
            Reason::Misfit { branch, misfit } => write!(f, "branch '{branch}': {misfit}"),
            Reason::NotPerChannel { branch, shape } => {
                write!(f, "branch '{branch}' is multiplied by a constant of shape {shape:?}, not per channel")
            }
            Reason::NoConv => f.write_str("no Conv among the branches"),
            Reason::ForwardBlocked { op, node, reader, reader_op } => write!(
                f,
                "{op} '{node}' also reaches '{reader}' ({reader_op}); it folds forward only when every reader is a Conv, a Gemm, a MatMul by a constant matrix or a BatchNormalization (through reshapes, transposes and averages)"
            ),
            Reason::ShiftPadded { op, node, conv } => write!(
                f,
                "{op} '{node}' shifts its output, and Conv '{conv}' zero-pads it: folded, the border would see the shift; left as it is"
            ),
            Reason::ShiftNoBias { op, node, matmuls } if matmuls.len() == 1 && op == "BatchNormalization" => write!(
                f,
                "MatMul '{}' has no constant bias Add to take the shift of BatchNormalization '{node}' (folded, the BN would become an Add after it: no fewer nodes)",
                matmuls[0]
            ),
            Reason::ShiftNoBias { op, node, matmuls } => write!(
                f,
                "MatMuls {} have no constant bias Add to take the shift of {op} '{node}': folded, each would need an Add of its own, more nodes than the fold removes",
                matmuls.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", ")
            ),
            Reason::Channels { op, node, channels, layer, layer_channels } => {
                write!(f, "{op} '{node}' is per channel over {channels} channels, but '{layer}' has {layer_channels}")
            }
            Reason::Sequential { first, second, misfit } => write!(f, "Conv '{first}' then Conv '{second}': {misfit}"),
            Reason::SequentialCost { first, second, kernel, weights, chain_weights, chain_macs, sum } => {
                write!(
                    f,
                    "Conv '{first}' then Conv '{second}' would become one {kernel} Conv of {weights} weights and multiply-adds per output position, vs {chain_weights} weights and {chain_macs} multiply-adds for the two"
                )?;
                match sum.as_deref() {
                    None => f.write_str(": left as two"),
                    Some(ChainSum::Held { sum, conv, kernel: k, merged: true }) => write!(
                        f,
                        "; they are a branch of sum '{sum}', whose {k} Conv '{conv}' holds the {kernel}: merged into it there, at no cost"
                    ),
                    Some(ChainSum::Held { sum, conv, kernel: k, merged: false }) => write!(
                        f,
                        "; they are a branch of sum '{sum}', whose {k} Conv '{conv}' holds the {kernel} at no cost, but the sum is not merged (see merge_branches at '{sum}'): left as two"
                    ),
                    Some(ChainSum::NotHeld { sum, largest: Some((conv, k)) }) => write!(
                        f,
                        "; they are a branch of sum '{sum}', whose Conv branches of the same input do not hold the {kernel} with the same output, stride and groups (the largest is the {k} Conv '{conv}'), so merging it there costs the same: left as two"
                    ),
                    Some(ChainSum::NotHeld { sum, largest: None }) => write!(
                        f,
                        "; they are a branch of sum '{sum}', which has no other Conv branch of the same input, so merging it there costs the same: left as two"
                    ),
                }
            }
            Reason::ZeroScale { op, node } => {
                write!(f, "{op} '{node}' zeroes a channel: it cannot fold into the BatchNormalization after it")
            }
            Reason::NotRepresentable { tensor, dtype, overflow, underflow } => {
                write!(f, "'{tensor}' as {}: ", dtype.name())?;
                match (overflow, underflow) {
                    (0, u) => write!(f, "{u} non-zero value(s) would round to zero"),
                    (o, 0) => write!(f, "{o} value(s) beyond its range"),
                    (o, u) => write!(f, "{o} value(s) beyond its range, {u} non-zero value(s) would round to zero"),
                }
            }
            Reason::Region(r) => write!(f, "{r}"),
            Reason::Fc { fc, why } => write!(f, "FC '{fc}': {why}"),
        }
    }
}

impl fmt::Display for FcMisfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FcMisfit::NotRearranged { from, to } => write!(
                f,
                "the operators from '{from}' to '{to}' do more than rearrange its elements: the region is not the FC in other coordinates"
            ),
            FcMisfit::ShapeFromRemoved { node } => {
                write!(f, "'{node}' computes a shape on the FC's path from a branch the rewrite would remove")
            }
            FcMisfit::Weight { shape } => write!(f, "its weight of shape {shape:?} does not divide into its groups"),
            FcMisfit::Input { shape, features } => {
                write!(f, "its input of shape {shape:?} is not rows of its {features} input features")
            }
            FcMisfit::BiasNotPerFeature => {
                f.write_str("the region's response to zero is not one value per FC output (its rows differ)")
            }
            FcMisfit::MixesRows => f.write_str(
                "the region mixes the rows the FC maps one by one (an impulse in one row reaches another): it is not an FC of them",
            ),
            FcMisfit::Groups { groups, max_abs } => write!(
                f,
                "the region's matrix joins the FC's {groups} groups (weights up to {max_abs:.3e} between them): it is not an FC of its groups"
            ),
            FcMisfit::TooBig { weights } => write!(
                f,
                "the matrix to recover would hold {weights} weights, more than the general path evaluates (2^26)"
            ),
            FcMisfit::NotRecovered { max_diff } => write!(
                f,
                "the region is not the FC with the recovered weights (max diff {max_diff:.3e} on random inputs)"
            ),
        }
    }
}

impl fmt::Display for RegionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionReason::NegativePad { pad } => write!(f, "Pad '{pad}' has negative amounts"),
            RegionReason::UsedOutside { tensor } => write!(f, "'{tensor}' inside the region is also used outside it"),
            RegionReason::SizeUnknown { tensor, why: None } => write!(f, "the size of '{tensor}' is unknown"),
            RegionReason::SizeUnknown { tensor, why: Some(why) } => {
                write!(f, "the size of '{tensor}' is unknown (tract's shape analysis: {why})")
            }
            RegionReason::Geometry => {
                f.write_str("the region's operators give no convolution window that matches its output size")
            }
            RegionReason::InputShape(s) => write!(f, "region input of shape {s:?}"),
            RegionReason::NoConv => f.write_str(
                "no Conv reads the region's input, and its operators (a Transpose, Reshape, ... on the way) give no convolution window",
            ),
            RegionReason::CannotEvaluate(e) => write!(f, "the region cannot be evaluated: {e}"),
            RegionReason::Tract(e) => f.write_str(e),
            RegionReason::OutputShape { got, want } => {
                write!(f, "the region's output {got:?} is not the Conv's output {want:?}")
            }
            RegionReason::BiasNotConstant => {
                f.write_str("the region's response to zero is not constant per channel (borders differ)")
            }
            RegionReason::InputTooSmall => f.write_str("the input is too small to probe the kernel"),
            RegionReason::KernelTooBig { weights } => write!(
                f,
                "the kernel to recover would hold {weights} weights, more than the general path evaluates (2^26)"
            ),
            RegionReason::ReadsOutsideWindow => f.write_str("the region reads outside the Conv's window"),
            RegionReason::MixesSamples => f.write_str("the region mixes the samples of a batch"),
            RegionReason::NotRecovered { max_diff } => {
                write!(f, "the region is not the recovered convolution (max diff {max_diff:.3e} on random inputs)")
            }
        }
    }
}

impl From<RegionReason> for Reason {
    fn from(r: RegionReason) -> Self {
        Reason::Region(r)
    }
}

impl serde::Serialize for Reason {
    /// As the text users read.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
