//! The general path: a region between a tensor x and a sum y in which every operator is affine
//! in x with constant parameters (Conv, BatchNormalization, Add/Sub/Mul/Div by constants, Pad,
//! AveragePool, Slice, ScatterND, Transpose, Reshape, Where with constant conditions, shape
//! arithmetic …) is replaced by one Conv when, as a whole, it is one.
//!
//! This is what catches Diverse Branch Block's BN-and-pad, which exporters render as Pad →
//! Transpose → ScatterND chains (dynamo) or hundreds of Shape/Range/Where/ScatterND nodes
//! (TorchScript).
//! - find: at the root of a sum, walk back and collect the region (refused when a tensor inside
//!   it is read outside, or it holds a Pad with negative amounts, which tract cannot run). The
//!   region's input is an operand of the sum when one is where the other branches start (the
//!   identity operand of `x + f(x)`), so the walk never goes past it.
//! - check: cut the region out as a small model and evaluate it in tract, in float64, at the
//!   model's own input size: the bias is its response to zero, the kernel its response to
//!   impulses (one per input channel and stride phase), with the geometry (kernel size, stride,
//!   dilation, padding, groups; 1-, 2- or 3-d) of the largest Conv reading x, or, when no Conv
//!   reads x, the window its operators give (Conv, AveragePool, Pad, Slice along each path). The
//!   candidate Conv is then compared with the region on random inputs, borders included.
//! - rewrite: the Conv replaces the region.

mod recover;
mod region;
mod submodel;
mod window;

use super::sum_tree::{is_root, leaves};
use super::{kernel_str, rewired_conv, Checked, Cx, Patch, Reason, RegionReason, Rewrite, Rule, RuleId};
use crate::graph::{is_op, Label};
use crate::kernel::AffineConv;
use crate::model::tensor::FloatType;
use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use recover::recover;
use region::find_region;
pub(crate) use region::Region;
use std::collections::HashMap;
pub(crate) use submodel::nodes_model;

/// What other rules see of a region (merge_into_fc): its input, and the nodes that depend on it
/// and those it needs that do not.
impl Region {
    pub(crate) fn input(&self) -> &str {
        &self.x
    }
    pub(crate) fn dep(&self) -> &[usize] {
        &self.dep
    }
    pub(crate) fn stat(&self) -> &[usize] {
        &self.stat
    }
}

/// The region from `stop` to `y` (a node's output), as the general path takes it: `Ok(None)` when
/// there is no single-input affine region from `stop` worth taking.
pub(crate) fn region_from<'g>(cx: &Cx<'g>, y: &'g str, stop: &str) -> Result<Option<Region>, RegionReason> {
    find_region(cx, y, Some(stop), &mut HashMap::new())
}

/// The region evaluated in tract, in float64, at input shape `shape`; `out`: how many elements
/// its output may have.
pub(crate) fn region_plan(
    cx: &Cx,
    r: &Region,
    y: &str,
    shape: &[usize],
    out: usize,
) -> Result<crate::tract::RegionPlan, RegionReason> {
    crate::tract::RegionPlan::new(&submodel::submodel(cx, r, y, shape)?, shape, out).map_err(RegionReason::CannotEvaluate)
}

pub(crate) struct AffineRegion;

/// The root of a sum and the region that computes it (or why the region cannot be taken).
pub(crate) struct Candidate {
    root: usize,
    region: Result<Region, RegionReason>,
}

/// The recovered convolution, the Conv node whose name and attributes it takes (a fresh node
/// when no Conv reads x), and its dtype.
pub(crate) struct Plan {
    conv: AffineConv,
    base: Option<usize>,
    ft: FloatType,
}

impl Rule for AffineRegion {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::AFFINE_REGION;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        // a sum (the walk takes in the Sub, Mul and Div inside it); a Sub, Mul or Div at the top
        // is arithmetic on a result (a detection head's box decoding), not a block
        let n = cx.node(at);
        if !is_root(cx, at) || !(is_op(n, "Add") || is_op(n, "Sum")) {
            return None;
        }
        let y: &str = &cx.node(at).output[0];
        // which tensors are fixed once the input shapes are: the same for every walk from this root
        let mut memo = HashMap::new();
        // a sum of branches (two operands at least that are not constants: a bias Add is not one)
        let (operands, internal) = leaves(cx, at);
        if operands.iter().filter(|l| cx.consts.value(&l.name).is_err()).count() < 2 {
            return None;
        }
        // the region's input: an operand of the sum where the other branches start, else where
        // the walk back ends
        for t in operands.iter().map(|l| &l.name) {
            if let Ok(Some(r)) = find_region(cx, y, Some(t), &mut memo) {
                if &r.x == t {
                    return Some(Candidate { root: at, region: Ok(r) });
                }
            }
        }
        let whole = find_region(cx, y, None, &mut memo);
        if let Ok(Some(r)) = whole {
            return Some(Candidate { root: at, region: Ok(r) });
        }
        // a sum whose operands read more than one tensor (ECBSR's last block, then `+ x` of the
        // network's input): the largest sum inside it that is a region of one tensor; what the
        // outer sum adds stays outside (a sum of one tensor that is no region is refused whole)
        for &i in internal.iter().skip(1).filter(|_| matches!(whole, Ok(None))) {
            if let Ok(Some(r)) = find_region(cx, &cx.node(i).output[0], None, &mut memo) {
                return Some(Candidate { root: i, region: Ok(r) });
            }
        }
        let region = whole.transpose()?;
        Some(Candidate { root: at, region })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let region = match &c.region {
            Ok(r) => r,
            Err(e) => return Checked::refuse(e.clone()),
        };
        let y = &cx.node(c.root).output[0];
        // the dtype: the Conv's weight's that reads x, else the first float constant the region reads
        let ft = region
            .dep
            .iter()
            .filter(|&&p| is_op(cx.node(p), "Conv") && cx.node(p).input[0] == region.x)
            .chain(&region.dep)
            .flat_map(|&p| cx.node(p).input.iter().skip(1))
            .find_map(|i| cx.ix.constant(cx.g, i).and_then(|t| FloatType::from_onnx(t.data_type.unwrap_or(0))))
            .unwrap_or(FloatType::F32);
        match recover(cx, region, y, ft) {
            Ok((conv, base)) => Checked::Fits(Plan { conv, base, ft }),
            Err(e) => Checked::refuse(e),
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let region = c.region.expect("checked");
        let root = cx.node(c.root);
        let y = &root.output[0];
        let Plan { conv, base, ft } = plan;
        let mut names = cx.names();
        let (mut node, wbase) = match base {
            Some(b) => {
                let bnode = cx.node(b);
                let wname = names.fresh(&format!("{}_region", bnode.input[1]));
                let bname = names.fresh(&format!("{wname}_bias"));
                (rewired_conv(bnode, &region.x, &wname, &bname, y), wname)
            }
            None => {
                let wname = names.fresh(&format!("{}_weight", root.name()));
                let bname = names.fresh(&format!("{wname}_bias"));
                let n = NodeProto {
                    op_type: Some("Conv".into()),
                    name: root.name.clone(),
                    input: vec![region.x.clone(), wname.clone(), bname],
                    output: vec![y.clone()],
                    ..Default::default()
                };
                (n, wname)
            }
        };
        let bname = node.input[2].clone();
        // the geometry, written out
        node.attribute.retain(|a| !matches!(a.name(), "group" | "pads" | "auto_pad" | "strides" | "dilations" | "kernel_shape"));
        let ints = |name: &str, v: Vec<i64>| AttributeProto {
            name: Some(name.into()),
            ints: v,
            r#type: Some(AttributeType::Ints as i32),
            ..Default::default()
        };
        let mut pads = conv.pads_begin.clone();
        pads.extend(&conv.pads_end);
        node.attribute.push(ints("kernel_shape", conv.kernel().iter().map(|&v| v as i64).collect()));
        node.attribute.push(ints("pads", pads));
        node.attribute.push(ints("strides", conv.strides.iter().map(|&v| v as i64).collect()));
        node.attribute.push(ints("dilations", conv.dilations.iter().map(|&v| v as i64).collect()));
        node.attribute.push(AttributeProto {
            name: Some("group".into()),
            i: Some(conv.groups as i64),
            r#type: Some(AttributeType::Int as i32),
            ..Default::default()
        });
        let name = node.label().to_string();
        let detail = format!(
            "{} nodes between '{}' and '{}' into Conv '{}' {}",
            region.dep.len(),
            region.x,
            y,
            name,
            kernel_str(conv.kernel())
        );
        Patch {
            at: c.root,
            remove: region.dep,
            insert: vec![node],
            replace: vec![],
            initializers: vec![(wbase, conv.weight.into(), ft), (bname, conv.bias.into_dyn().into(), ft)],
            log: Rewrite { rule: Self::ID, node: name, detail, weights: vec![] },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.root).label().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::driver::at_node;
    use crate::support::{attr_ints, Builder, ConvAttrs};

    fn check_at(b: &Builder, root: &str) -> Checked<Plan> {
        at_node(b, root, |cx, at| AffineRegion.check(cx, &AffineRegion.find(cx, at).expect("a region")))
    }

    /// Conv3x3(x) + AveragePool3x3(x) (zero-padded, borders counted): one 3x3 Conv.
    fn conv_plus_pool(pool_pads: &[i64]) -> Builder {
        let mut b = Builder::new(2, 6, 6);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let attrs = vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", pool_pads)];
        let p = b.node("AveragePool", "pool", &["x"], &[], attrs);
        let y = b.add("sum", &c, &p);
        b.output(&y);
        b
    }

    #[test]
    fn a_conv_plus_an_average_pool_is_recovered_as_one_conv() {
        let mut b = conv_plus_pool(&[1, 1, 1, 1]);
        // count_include_pad: the pool is a plain 1/9 kernel at the borders too
        b.graph.node[1].attribute.push(crate::support::attr_int("count_include_pad", 1));
        let Checked::Fits(plan) = check_at(&b, "sum") else { panic!("refused") };
        assert_eq!((plan.conv.kernel(), plan.conv.groups), (&[3usize, 3][..], 1));
    }

    #[test]
    fn a_pool_that_excludes_the_padding_is_not_a_conv() {
        // without count_include_pad the border taps are divided by fewer: not one convolution
        let Checked::Refused(r) = check_at(&conv_plus_pool(&[1, 1, 1, 1]), "sum") else { panic!("fused") };
        assert!(matches!(r[..], [Reason::Region(RegionReason::NotRecovered { .. })]), "{r:?}");
    }

    #[test]
    fn a_negative_pad_is_refused_before_tract_runs() {
        let mut b = Builder::new(2, 6, 6);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let p = b.pad("crop", "x", &[0, 0, -1, 0, 0, 0, 1, 0], None);
        let t = b.node("Transpose", "t", &[&p], &[], vec![attr_ints("perm", &[0, 1, 2, 3])]);
        let y = b.add("sum", &c, &t);
        b.output(&y);
        let Checked::Refused(r) = check_at(&b, "sum") else { panic!("fused") };
        assert_eq!(r, [Reason::Region(RegionReason::NegativePad { pad: "crop".into() })]);
    }

    /// Fuse; the model must be one Conv (plus `others`) computing what it did (in tract).
    fn fuses_to_one_conv(b: &Builder, x_shape: &[usize], others: &[&str]) -> AffineConv {
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        let mut ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).filter(|o| *o != "Conv").collect();
        ops.sort_unstable();
        assert_eq!(ops, others, "{}", report.summary());
        let x = crate::support::rand_input(5, x_shape);
        let (want, got) = (crate::support::run_f32(&original, std::slice::from_ref(&x)), crate::support::run_f32(&m, &[x]));
        crate::support::assert_close(&got, &want, 1e-5, "fused vs original, in tract");
        let convs: Vec<&NodeProto> = m.graph().node.iter().filter(|n| n.op_type() == "Conv").collect();
        assert_eq!(convs.len(), 1);
        crate::support::conv_of(&m.proto, convs[0])
    }

    /// Conv(x) + AveragePool(x), both `auto_pad` SAME_UPPER at stride 2 (padded by the input
    /// size, the borders counted): read at the input size, the Conv's geometry is the region's,
    /// on even and odd sizes.
    #[test]
    fn convs_and_pools_padded_by_the_input_size_are_read_at_it() {
        for (h, w) in [(8, 8), (7, 9)] {
            let mut b = Builder::new(2, h, w);
            let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], true, ConvAttrs::default().strides(&[2, 2]));
            let same = crate::support::attr_string("auto_pad", "SAME_UPPER");
            b.graph.node[0].attribute.push(same.clone());
            let attrs = vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                same,
                crate::support::attr_int("count_include_pad", 1),
            ];
            let p = b.node("AveragePool", "pool", &["x"], &[], attrs);
            let y = b.add("sum", &c, &p);
            b.output(&y);
            let k = fuses_to_one_conv(&b, &[1, 2, h, w], &[]);
            let want: (Vec<i64>, Vec<i64>) =
                (0..2).map(|a| crate::kernel::same_pads([h, w][a] as i64, 3, 2, 1, true)).unzip();
            assert_eq!((k.kernel(), (k.pads_begin.clone(), k.pads_end.clone())), (&[3usize, 3][..], want), "{h}x{w}");
        }
    }

    /// A region of `rank` spatial axes: Conv(x) (dilated) + AveragePool(Pad(x)).
    fn conv_plus_padded_pool(rank: usize, dilation: usize) -> Builder {
        let mut b = Builder::new(2, 9, 9);
        let dims: Vec<i64> = [1, 2].into_iter().chain(std::iter::repeat_n(9, rank)).collect();
        b.graph.input[0] = crate::support::tensor_info("x", crate::proto::tensor_proto::DataType::Float, &dims);
        let k = vec![3; rank];
        let pads: Vec<i64> = vec![dilation as i64; 2 * rank];
        let attrs = ConvAttrs::pads(&pads).dilations(&vec![dilation as i64; rank]);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &k, true, attrs);
        let mut pad_amounts = vec![0i64; 2 * (rank + 2)];
        for a in 0..rank {
            pad_amounts[2 + a] = 1;
            pad_amounts[rank + 4 + a] = 1;
        }
        let p = b.pad("pad", "x", &pad_amounts, None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &vec![3; rank])]);
        let y = b.add("sum", &c, &pool);
        b.output(&y);
        b
    }

    #[test]
    fn regions_of_one_and_three_axes_are_recovered() {
        for rank in [1, 3] {
            let k = fuses_to_one_conv(&conv_plus_padded_pool(rank, 1), &[[1usize, 2].as_slice(), &vec![9; rank]].concat(), &[]);
            assert_eq!(k.kernel(), vec![3; rank].as_slice());
        }
    }

    #[test]
    fn a_dilated_region_is_recovered() {
        // a dilated 3x3 (window 5) and a 3x3 pool inside that window: the pool's taps are
        // between the dilated taps, so the region is a dense 5x5, not the dilated 3x3
        let k = fuses_to_one_conv(&conv_plus_padded_pool(2, 2), &[1, 2, 9, 9], &[]);
        assert_eq!((k.kernel(), k.dilations.as_slice()), (&[5usize, 5][..], &[1usize, 1][..]));
        // dilated branches only (a dilated 3x3, and a dilated 3x3 pool): the dilated 3x3 it is
        let mut b = Builder::new(2, 9, 9);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], true, ConvAttrs::pads(&[2, 2, 2, 2]).dilations(&[2, 2]));
        let p = b.pad("pad", "x", &[0, 0, 2, 2, 0, 0, 2, 2], None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("dilations", &[2, 2])]);
        let y = b.add("sum", &c, &pool);
        b.output(&y);
        let k = fuses_to_one_conv(&b, &[1, 2, 9, 9], &[]);
        assert_eq!((k.kernel(), k.dilations.as_slice()), (&[3usize, 3][..], &[2usize, 2][..]));
    }

    #[test]
    fn without_a_conv_the_geometry_comes_from_the_operators() {
        // x + BN(x) + AveragePool(Pad(x)): a depthwise 3x3 conv (PoolFormer-like token mixer)
        let mut b = Builder::new(3, 6, 6);
        let (n, _) = b.bn("norm", "x", 3, None);
        let p = b.pad("pad", "x", &[0, 0, 1, 1, 0, 0, 1, 1], None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &[3, 3])]);
        let s1 = b.add("s1", "x", &n);
        let y = b.add("sum", &s1, &pool);
        b.output(&y);
        let k = fuses_to_one_conv(&b, &[1, 3, 6, 6], &[]);
        assert_eq!((k.kernel(), k.groups), (&[3usize, 3][..], 3));
    }

    #[test]
    fn the_region_starts_at_the_sums_identity_operand() {
        // x = 0.5·h (the tail of a decomposed GELU); x + AveragePool(Pad(x)): the walk must stop
        // at x, not go on through the Mul to h
        let mut b = Builder::new(2, 6, 6);
        let half = b.initializer("half", &ndarray::arr0(0.5).into_dyn());
        let x = b.node("Mul", "act", &["x", &half], &["act_out"], vec![]);
        let p = b.pad("pad", &x, &[0, 0, 1, 1, 0, 0, 1, 1], None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &[3, 3])]);
        let y = b.add("sum", &x, &pool);
        b.output(&y);
        let at = at_node(&b, "sum", |cx, at| AffineRegion.find(cx, at).map(|c| c.region.map(|r| r.x)));
        assert_eq!(at, Some(Ok("act_out".to_string())));
        // (and then the Mul by 0.5 folds into the Conv: fold_affine)
        fuses_to_one_conv(&b, &[1, 2, 6, 6], &[]);
    }
}
