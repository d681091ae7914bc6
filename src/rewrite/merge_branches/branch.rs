//! The branches of a sum: what each leaf is (a Conv, through a crop or a padding; the identity,
//! through a BatchNormalization; with its constant factors), and what a Conv branch reads through.

use super::Cx;
use crate::graph::{is_op, Label};
use crate::kernel::read::{read_conv_unresolved, read_pad, read_slice, ConvForm, ReadError};
use crate::kernel::{AffineConv, Geometry, Misfit, Placement};
use crate::model::tensor::FloatType;
use crate::proto::NodeProto;
use ndarray::ArrayD;
use std::cell::OnceCell;

#[derive(Clone)]
pub(super) enum Kind {
    /// A Conv (node index), reading through an optional Slice (crop) or Pad (node index).
    Conv { conv: usize, through: Option<usize> },
    /// Two Convs in sequence (node indices), the first reading through an optional Slice or Pad:
    /// a chain that a Conv of its group holds (see [`super::chain`]).
    Chain { first: usize, through: Option<usize>, second: usize },
    /// The identity, optionally through a BatchNormalization (node index).
    Identity { bn: Option<usize> },
}

#[derive(Clone)]
pub(super) struct Branch {
    pub(super) leaf: String,
    pub(super) source: String,
    pub(super) kind: Kind,
    /// nodes that exist only for this branch
    pub(super) nodes: Vec<usize>,
    /// constant per-channel (or scalar) factors the branch is multiplied by, innermost first
    pub(super) scales: Vec<ArrayD<f64>>,
    /// how many of `scales` (the last ones) the sum tree applies (a Sub, or a Mul around a
    /// sub-sum): a branch that is not merged keeps its own Mul nodes but needs these re-applied
    pub(super) tree_factors: usize,
}

/// A Mul of `t` by a constant: (the other operand, the constant).
fn mul_by_const(cx: &Cx, n: &NodeProto) -> Option<(String, ArrayD<f64>)> {
    if !is_op(n, "Mul") || n.input.len() != 2 {
        return None;
    }
    for (k, other) in [(1, 0), (0, 1)] {
        if let Ok((a, _)) = cx.consts.f64(&n.input[k]) {
            if cx.ix.constant(cx.g, &n.input[other]).is_none() {
                return Some((n.input[other].clone(), a));
            }
        }
    }
    None
}

/// What a leaf of the sum is.
pub(super) fn classify(cx: &Cx, leaf: &str) -> Branch {
    // peel constant scales (RepOpt-style branch multipliers), outermost first
    let mut scales = Vec::new();
    let mut nodes = Vec::new();
    let mut cur = leaf.to_string();
    while let Some(p) = cx.producer(&cur) {
        if cx.uses(&cur) != 1 {
            break;
        }
        match mul_by_const(cx, cx.node(p)) {
            Some((inner, a)) => {
                scales.push(a);
                nodes.push(p);
                cur = inner;
            }
            None => break,
        }
    }
    scales.reverse();
    let branch = |source: String, kind: Kind, nodes: Vec<usize>, scales: Vec<ArrayD<f64>>| Branch {
        leaf: leaf.to_string(),
        source,
        kind,
        nodes,
        scales,
        tree_factors: 0,
    };
    let identity = Kind::Identity { bn: None };
    let Some(p) = cx.producer(&cur) else { return branch(cur, identity, nodes, scales) };
    let n = cx.node(p);
    if cx.uses(&cur) != 1 {
        return branch(cur, identity, nodes, scales);
    }
    if is_op(n, "BatchNormalization") {
        nodes.push(p);
        return branch(n.input[0].clone(), Kind::Identity { bn: Some(p) }, nodes, scales);
    }
    if !is_op(n, "Conv") {
        return branch(cur, identity, nodes, scales);
    }
    nodes.push(p);
    let mut source = n.input[0].clone();
    let mut through = None;
    // look through one Slice (crop) or Pad that only this branch reads
    if let Some(q) = cx.producer(&source) {
        let pn = cx.node(q);
        if (is_op(pn, "Slice") || is_op(pn, "Pad")) && cx.uses(&source) == 1 {
            through = Some(q);
            nodes.push(q);
            source = pn.input[0].clone();
        }
    }
    branch(source, Kind::Conv { conv: p, through }, nodes, scales)
}

/// A Conv reading `source` (directly or through a Slice or Pad) whose output is also read
/// outside the sum, behind an identity-classified leaf: merging would lose that output.
pub(super) fn leaked_conv(cx: &Cx, branches: &[Branch], source: &str) -> Option<String> {
    branches.iter().find_map(|b| {
        let mut n = cx.producer_node(&b.leaf)?;
        if is_op(n, "BatchNormalization") {
            n = cx.producer_node(n.input.first()?)?;
        }
        if !is_op(n, "Conv") {
            return None;
        }
        let x = n.input.first()?;
        let reads = cx
            .producer_node(x)
            .filter(|q| is_op(q, "Slice") || is_op(q, "Pad"))
            .and_then(|q| q.input.first())
            .unwrap_or(x);
        (matches!(b.kind, Kind::Identity { .. }) && reads.as_str() == source && cx.uses(&b.leaf) > 1)
            .then(|| n.label().to_string())
    })
}

/// The crop (begin, end) and padding (begin, end) per spatial axis of the Slice or Pad (node `q`)
/// a Conv of spatial rank `r` reads through.
pub(super) fn read_through(cx: &Cx, q: usize, r: usize) -> Result<[Vec<i64>; 4], ReadError> {
    let pn = cx.node(q);
    if is_op(pn, "Slice") {
        let (cb, ce) = read_slice(&cx.consts, pn, r + 2, cx.opset)?;
        return Ok([cb, ce, vec![0; r], vec![0; r]]);
    }
    let (pb, pe) = read_pad(&cx.consts, pn, r + 2, cx.opset)?;
    let neg = |v: &Vec<i64>| v.iter().map(|&x| (-x).max(0)).collect::<Vec<_>>();
    let pos = |v: &Vec<i64>| v.iter().map(|&x| x.max(0)).collect::<Vec<_>>();
    Ok([neg(&pb), neg(&pe), pos(&pb), pos(&pe)])
}

/// The spatial size of the tensor a group's branches read, when the model runs at no other
/// ([`Cx::fixed_spatial`]); asked for only when a branch's geometry depends on it.
pub(super) struct SourceSize<'c, 'a> {
    cx: &'c Cx<'a>,
    source: &'c str,
    size: OnceCell<Option<Vec<usize>>>,
}

impl<'c, 'a> SourceSize<'c, 'a> {
    pub(super) fn new(cx: &'c Cx<'a>, source: &'c str) -> Self {
        SourceSize { cx, source, size: OnceCell::new() }
    }

    /// The size, for a convolution of spatial rank `r`.
    pub(super) fn get(&self, r: usize) -> Option<&[usize]> {
        self.size.get_or_init(|| self.cx.fixed_spatial(self.source)).as_deref().filter(|s| s.len() == r)
    }
}

/// A Conv branch's form, with the padding it reads through added to the Conv's own, its
/// `auto_pad` resolved at the size of `size`'s tensor when its pads depend on it; and the crop it
/// reads through (begin, end), and whether its pads were resolved so.
pub(super) fn conv_form(
    cx: &Cx,
    mut f: ConvForm,
    through: Option<usize>,
    size: &SourceSize,
) -> Result<(ConvForm, [Vec<i64>; 2], bool), ReadError> {
    let r = f.kernel.len();
    let [cb, ce, pb, pe] = match through {
        Some(q) => read_through(cx, q, r)?,
        None => [vec![0; r], vec![0; r], vec![0; r], vec![0; r]],
    };
    let sized = f.by_size.is_some();
    if sized {
        // (the Conv's input: the source cropped and padded)
        let len = size.get(r).map(|l| (0..r).map(|a| l[a] as i64 - cb[a] - ce[a] + pb[a] + pe[a]).collect::<Vec<_>>());
        f.resolve(len.as_deref())?;
    }
    for a in 0..r {
        f.pads_begin[a] += pb[a];
        f.pads_end[a] += pe[a];
    }
    Ok((f, [cb, ce], sized))
}

/// A Conv branch (node `conv`, reading through node `through`) in f64, its type, and whether
/// its pads were resolved at the input size: see [`conv_form`].
pub(super) fn load_conv(
    cx: &Cx,
    conv: usize,
    through: Option<usize>,
    size: &SourceSize,
) -> Result<(AffineConv, FloatType, bool), ReadError> {
    let (w, f, ft) = read_conv_unresolved(&cx.consts, cx.node(conv))?;
    let (f, [cb, ce], sized) = conv_form(cx, f, through, size)?;
    let mut k = f.conv(w);
    k.crop_begin = cb;
    k.crop_end = ce;
    Ok((k, ft, sized))
}

/// Where `small`'s taps land in `big`'s: at every input size, or else at the size of the
/// tensor they read, when the model runs at no other.
pub(super) fn place(small: &Geometry, big: &Geometry, size: &SourceSize) -> Result<Placement, Misfit> {
    match small.offset_in(big) {
        Err(Misfit::OutputSizeVaries { axis }) => match size.get(small.dims.len() - 2) {
            Some(len) => small.offset_in_at(big, len),
            None => Err(Misfit::OutputSizeVaries { axis }),
        },
        placed => placed,
    }
}

/// The order in which the base of a group is chosen: the largest window (input positions its
/// taps span), then the most taps.
pub(super) fn base_key(g: &Geometry) -> (usize, usize) {
    (g.window().iter().product(), g.dims[2..].iter().product())
}
