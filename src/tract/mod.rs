//! The only code that builds tract models: loading model files ([`load`]), typed plans at
//! concrete input shapes ([`plan`]: the un-optimised reference plan the check runs, or tract's
//! optimised plan for latency), the noise criterion's perturbed weights ([`perturb`]), what
//! tract must not be handed or asked to run ([`safety`]), which nodes of a model tract cannot
//! run ([`runnable`]), edits that let tract run what it would refuse as written ([`compat`]), a
//! region of a model evaluated on its own ([`region`]), the shapes a model's tensors really have
//! ([`shapes`]), and tract's errors as one line ([`errors`]).

pub(crate) mod compat;
pub(crate) mod errors;
pub(crate) mod load;
pub(crate) mod perturb;
pub(crate) mod plan;
pub(crate) mod region;
pub(crate) mod runnable;
pub(crate) mod safety;
pub(crate) mod shapes;

pub(crate) use load::{declared_signature, load, signature_without_weights, DeclDim, Loaded, Signature};
pub(crate) use perturb::{perturb_in_place, Draws};
pub(crate) use plan::{
    infer_inputs, on_threads, output_shapes, prepare, run, weigh, InputFact, PartialFact, PlanKind, PlanSpec,
};
pub(crate) use region::RegionPlan;
pub(crate) use runnable::{unknown_nodes, unrunnable_nodes, Why};
pub(crate) use shapes::ShapeFacts;

use tract_onnx::prelude::DatumType;

/// numpy spelling of a tract datum type.
pub(crate) fn dt_name(dt: DatumType) -> String {
    match dt {
        DatumType::Bool => "bool".into(),
        DatumType::U8 => "uint8".into(),
        DatumType::U16 => "uint16".into(),
        DatumType::U32 => "uint32".into(),
        DatumType::U64 => "uint64".into(),
        DatumType::I8 => "int8".into(),
        DatumType::I16 => "int16".into(),
        DatumType::I32 => "int32".into(),
        DatumType::I64 => "int64".into(),
        DatumType::F16 => "float16".into(),
        DatumType::F32 => "float32".into(),
        DatumType::F64 => "float64".into(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn is_float(dt: DatumType) -> bool {
    matches!(dt, DatumType::F16 | DatumType::F32 | DatumType::F64)
}

pub(crate) fn is_int(dt: DatumType) -> bool {
    matches!(
        dt,
        DatumType::U8
            | DatumType::U16
            | DatumType::U32
            | DatumType::U64
            | DatumType::I8
            | DatumType::I16
            | DatumType::I32
            | DatumType::I64
    )
}
