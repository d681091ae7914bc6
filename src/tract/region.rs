//! Evaluating a small region of a model in tract (the general rewrite path).

use super::safety::{grows_too_big, unrunnable, MAX_TENSOR_ELEMENTS};
use crate::error::catch;
use crate::graph::Label;
use crate::model::Model;
use crate::proto::ModelProto;
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use std::sync::Arc;
use tract_onnx::prelude::*;

/// No tensor inside a region may hold more than this many times the elements of the region's
/// input or of the Conv's output (or of 64 Ki, whichever is largest): a block's intermediate
/// tensors are a few times those at most, and a Pad or Resize with absurd sizes would otherwise
/// allocate without bound when the region is evaluated.
const GROWTH_LIMIT: usize = 64;

/// A region of a model, cut out as a model of its own with one float input of a fixed shape,
/// ready to evaluate in float64 (the general rewrite path recovers kernels from it: float32
/// evaluation would put its rounding, ~1e-7 of the largest value, into every weight).
pub(crate) struct RegionPlan {
    plan: Arc<TypedRunnableModel>,
    /// the output's shape, as tract typed it
    shape: Vec<usize>,
}

fn msg(e: TractError) -> String {
    format!("{e:#}").replace('\n', " ")
}

impl RegionPlan {
    /// `region` computes in float64 (its float tensors, casts and input converted by the caller);
    /// `out` is the number of elements its output may have (the size check's bound). tract's panics
    /// (it has some on malformed graphs) become errors.
    pub fn new(region: &ModelProto, shape: &[usize], out: usize) -> Result<RegionPlan, String> {
        let limit = growth_limit(shape.iter().fold(1usize, |a, &d| a.saturating_mul(d)).max(out));
        let m = Model::from_proto(region.clone()).map_err(|e| e.to_string())?;
        if let Some(why) = grows_too_big(&m, limit as u128) {
            return Err(format!("inside the region: {why}"));
        }
        let bytes = region.encode_to_vec();
        catch(|| Self::build(&bytes, shape, out)).unwrap_or_else(|p| {
            Err(format!("tract failed on the region (it panicked: {})", p.text.unwrap_or_default()))
        })
    }

    fn build(bytes: &[u8], shape: &[usize], out: usize) -> Result<RegionPlan, String> {
        let m = tract_onnx::onnx().model_for_read(&mut &bytes[..]).map_err(msg)?;
        let m = m.with_input_fact(0, f64::fact(shape).into()).map_err(msg)?.into_typed().map_err(msg)?;
        check_sizes(&m, shape.iter().fold(1usize, |a, &d| a.saturating_mul(d)).max(out))?;
        let shape = m.output_fact(0).map_err(msg)?.shape.as_concrete().map(|s| s.to_vec());
        let shape = shape.ok_or("the size of the region's output is not known")?;
        Ok(RegionPlan { plan: m.into_optimized().map_err(msg)?.into_runnable().map_err(msg)?, shape })
    }

    /// The shape of the region's output (known before it is evaluated).
    pub fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    /// The region's output for input `x`.
    pub fn eval(&self, x: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
        catch(|| {
            let out = self.plan.run(tvec!(Tensor::from(x.clone()).into())).map_err(msg)?;
            let t = out[0].clone().into_tensor();
            if t.shape() != self.shape.as_slice() {
                return Err(format!("the region's output is {:?}, typed {:?}", t.shape(), self.shape));
            }
            let v = t.try_as_plain_ram().map_err(msg)?.as_slice::<f64>().map_err(msg)?.to_vec();
            ArrayD::from_shape_vec(IxDyn(t.shape()), v).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|p| Err(format!("tract failed on the region (it panicked: {})", p.text.unwrap_or_default())))
    }
}

/// The most elements a tensor of a region of `size` elements may have.
fn growth_limit(size: usize) -> usize {
    size.max(1 << 16).saturating_mul(GROWTH_LIMIT)
}

/// Refuse a region whose tensors are not all of known size, grow past [`GROWTH_LIMIT`] times
/// `size`, or that tract cannot run (see [`unrunnable`]).
fn check_sizes(m: &TypedModel, size: usize) -> Result<(), String> {
    if let Some(node) = m.nodes().iter().find(|n| n.outputs.iter().any(|o| o.fact.shape.as_concrete().is_none())) {
        return Err(format!("the size of '{}' inside the region is not known", node.name));
    }
    match unrunnable(m, growth_limit(size) as u128) {
        Some(why) => Err(format!("inside the region: {why}")),
        None => Ok(()),
    }
}

/// What tract 0.23's analysis is known to crash on (not a panic: a wild read), so that it is
/// never asked: a BatchNormalization whose input has fewer than 2 axes (its inference rules
/// index the channel axis unchecked). Found by the structural fuzz test.
pub(crate) fn crashes_analysis(m: &Model) -> Option<String> {
    if let Some(why) = grows_too_big(m, MAX_TENSOR_ELEMENTS) {
        return Some(why);
    }
    let g = m.graph();
    let rank = |name: &str| -> Option<usize> {
        if let Some(t) = g.initializer.iter().find(|t| t.name() == name) {
            return Some(t.dims.len());
        }
        if let Some(n) =
            g.node.iter().find(|n| n.op_type() == "Constant" && n.output.first().is_some_and(|o| o == name))
        {
            return n.attribute.iter().find(|a| a.name() == "value").and_then(|a| a.t.as_ref()).map(|t| t.dims.len());
        }
        g.input
            .iter()
            .chain(&g.value_info)
            .find(|v| v.name() == name)
            .and_then(crate::graph::declared_dims)
            .map(|d| d.len())
    };
    g.node
        .iter()
        .filter(|n| n.op_type() == "BatchNormalization")
        .find(|n| n.input.first().and_then(|x| rank(x)).is_some_and(|r| r < 2))
        .map(|n| format!("BatchNormalization '{}' reads a tensor of fewer than 2 axes", n.label()))
}

#[cfg(test)]
mod tests {
    use crate::support::{Builder, ConvAttrs};

    /// Found by the structural fuzz test: tract's analysis reads out of bounds (SIGSEGV) on a
    /// BatchNormalization of a rank-1 tensor; the shapes are then simply unknown.
    #[test]
    fn a_batch_norm_of_a_vector_is_not_given_to_tract_analysis() {
        let mut b = Builder::new(2, 4, 4);
        let (y, _, _) = b.conv_rand("conv", "x", 2, 2, &[1, 1], true, ConvAttrs::default());
        let v = b.rand(&[2]);
        let v = b.initializer("v", &v);
        let (z, _) = b.bn("bn", &v, 2, None);
        b.output(&y);
        b.output(&z);
        assert!(crate::tract::shapes::analyse(&b.build(), &[]).shapes.is_empty());
        assert!(super::crashes_analysis(&b.build()).is_some());
    }
}
