//! Per-channel affine maps by constants (Mul, Div, Add, Sub, alone or a scale and a shift) next to
//! a linear layer (MatMul with or without its bias Add, Gemm, Conv), after it or before it,
//! through a Transpose / Flatten / Identity that keeps the channels whole (fold_affine).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum LinKind {
    /// a MatMul on a tensor of this rank (2-4), with its bias Add or not
    MatMul { rank: usize, bias: bool },
    /// a Gemm on [N, C], transB, with C or not, alpha, beta
    Gemm { trans_b: bool, c: bool, alpha: f32, beta: f32 },
    /// a 2-d Conv with this kernel (1 or 3), pads 0 / k/2, depthwise or not, with a bias or not
    Conv { k: usize, padded: bool, depthwise: bool, bias: bool },
}

/// One node of the map: the operator and whether the constant is its first operand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum MapOp {
    Mul {
        first: bool,
    },
    Div,
    Add {
        first: bool,
    },
    /// x − c
    Sub,
    /// c − x
    SubFrom,
}

impl MapOp {
    fn shifts(self) -> bool {
        matches!(self, MapOp::Add { .. } | MapOp::Sub | MapOp::SubFrom)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct AffineCase {
    pub(crate) seed: u64,
    pub(crate) layer: LinKind,
    pub(crate) c: usize,
    pub(crate) o: usize,
    /// the map is after the layer (else before)
    pub(crate) after: bool,
    pub(crate) ops: Vec<MapOp>,
    /// each constant is a scalar (else per channel), and its rank is padded with 1s
    pub(crate) scalar: Vec<bool>,
    pub(crate) lead_ones: Vec<bool>,
    /// a carrier between the map and the layer (Transpose NHWC <-> NCHW for a rank-4 MatMul,
    /// Flatten before a Gemm, Identity otherwise)
    pub(crate) carrier: bool,
    /// a Relu also reads the tensor between the map and the layer
    pub(crate) extra_reader: bool,
}

pub(crate) fn gen_affine(v: &[u16]) -> AffineCase {
    let ch = &mut Ch { v, i: 0 };
    let seed = ch.pick(1 << 16) as u64;
    let layer = match ch.pick(3) {
        0 => LinKind::MatMul { rank: 2 + ch.pick(3), bias: ch.chance(50) },
        1 => LinKind::Gemm {
            trans_b: ch.chance(50),
            c: ch.chance(60),
            alpha: ch.of(&[1.0, 0.5, 2.0]),
            beta: ch.of(&[1.0, 0.5, 0.0]),
        },
        _ => LinKind::Conv { k: ch.of(&[1, 3]), padded: ch.chance(50), depthwise: ch.chance(30), bias: ch.chance(50) },
    };
    let c = 1 + ch.pick(5);
    let o = match layer {
        LinKind::Conv { depthwise: true, .. } => c,
        _ => 1 + ch.pick(5),
    };
    let after = ch.chance(50);
    let op = |ch: &mut Ch| match ch.pick(7) {
        0 => MapOp::Mul { first: false },
        1 => MapOp::Mul { first: true },
        2 => MapOp::Div,
        3 => MapOp::Add { first: false },
        4 => MapOp::Add { first: true },
        5 => MapOp::Sub,
        _ => MapOp::SubFrom,
    };
    let mut ops = vec![op(ch)];
    if ch.chance(40) {
        ops.push(op(ch));
    }
    // (c − x) after a MatMul without a bias is a shift the MatMul's bias would take with its
    // sign flipped: not folded (a node for a node), so not drawn there
    let bias_less = matches!(layer, LinKind::MatMul { bias: false, .. });
    if after && bias_less {
        for o in &mut ops {
            if *o == MapOp::SubFrom {
                *o = MapOp::Sub;
            }
        }
    }
    let n = ops.len();
    AffineCase {
        seed,
        layer,
        c,
        o,
        after,
        ops,
        scalar: (0..n).map(|_| ch.chance(20)).collect(),
        lead_ones: (0..n).map(|_| ch.chance(40)).collect(),
        carrier: ch.chance(40),
        extra_reader: ch.chance(15),
    }
}

/// The case's graph, and the shape of its input x.
pub(crate) fn build_affine(a: &AffineCase) -> (Builder, Vec<usize>) {
    let mut b = Builder::new(1, 1, 1);
    b.rng = StdRng::seed_from_u64(a.seed);
    let (c, o) = (a.c, a.o);
    // the input, and where the map's channels are (its tensor's shape, channel axis)
    let (x_shape, layer_in): (Vec<usize>, Vec<usize>) = match a.layer {
        LinKind::MatMul { rank, .. } => {
            let lead: Vec<usize> = [2, 3, 2][..rank - 1].to_vec();
            let s = [lead, vec![c]].concat();
            (s.clone(), s)
        }
        LinKind::Gemm { .. } => (vec![2, c], vec![2, c]),
        LinKind::Conv { .. } => (vec![1, c, 4, 5], vec![1, c, 4, 5]),
    };
    let dims: Vec<i64> = x_shape.iter().map(|&d| d as i64).collect();
    b.graph.input[0] = tensor_info("x", DataType::Float, &dims);
    let mut names = 0usize;
    let mut fresh = |base: &str| {
        names += 1;
        format!("{base}{names}")
    };
    // the map on tensor `t` whose channels (n of them) are on `axis` of a tensor of `rank`
    let map =
        |b: &mut Builder, t: String, n: usize, axis: usize, rank: usize, fresh: &mut dyn FnMut(&str) -> String| {
            let mut t = t;
            for (k, op) in a.ops.iter().enumerate() {
                let shape: Vec<usize> = if a.scalar[k] {
                    if a.lead_ones[k] {
                        vec![1]
                    } else {
                        vec![]
                    }
                } else {
                    let mut s = vec![n];
                    s.extend(std::iter::repeat_n(1, rank - 1 - axis));
                    if a.lead_ones[k] {
                        s.insert(0, 1);
                    }
                    s
                };
                let v = b.rand_in(&shape, 0.5, 1.5);
                let v = if k % 2 == 1 { -v } else { v };
                let cn = b.initializer(&fresh("const"), &v);
                let (op_type, ins): (&str, [&str; 2]) = match *op {
                    MapOp::Mul { first: false } => ("Mul", [&t, &cn]),
                    MapOp::Mul { first: true } => ("Mul", [&cn, &t]),
                    MapOp::Div => ("Div", [&t, &cn]),
                    MapOp::Add { first: false } => ("Add", [&t, &cn]),
                    MapOp::Add { first: true } => ("Add", [&cn, &t]),
                    MapOp::Sub => ("Sub", [&t, &cn]),
                    MapOp::SubFrom => ("Sub", [&cn, &t]),
                };
                let name = fresh("map");
                t = b.node(op_type, &name, &ins, &[], vec![]);
            }
            t
        };
    // the layer on tensor `t` (shape `layer_in`)
    let layer = |b: &mut Builder, t: &str, fresh: &mut dyn FnMut(&str) -> String| -> String {
        match a.layer {
            LinKind::MatMul { bias, .. } => {
                let w = b.rand(&[c, o]);
                let w = b.initializer(&fresh("w"), &w);
                let y = b.node("MatMul", "layer", &[t, &w], &[], vec![]);
                if !bias {
                    return y;
                }
                let bb = b.rand(&[o]);
                let bb = b.initializer(&fresh("bias"), &bb);
                b.node("Add", "layer_bias", &[&y, &bb], &[], vec![])
            }
            LinKind::Gemm { trans_b, c: with_c, alpha, beta } => {
                let w = b.rand(&if trans_b { [o, c] } else { [c, o] });
                let w = b.initializer(&fresh("w"), &w);
                let mut ins = vec![t.to_string(), w];
                if with_c {
                    let cc = b.rand(&[o]);
                    ins.push(b.initializer(&fresh("c"), &cc));
                }
                let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
                let attrs =
                    vec![attr_int("transB", i64::from(trans_b)), attr_float("alpha", alpha), attr_float("beta", beta)];
                b.node("Gemm", "layer", &ins, &[], attrs)
            }
            LinKind::Conv { k, padded, depthwise, bias } => {
                let p = if padded { (k / 2) as i64 } else { 0 };
                let attrs = ConvAttrs::pads(&[p, p, p, p]).group(if depthwise { c as i64 } else { 1 });
                let cin = if depthwise { 1 } else { c };
                b.conv_rand("layer", t, o, cin, &[k, k], bias, attrs).0
            }
        }
    };
    let rank = layer_in.len();
    let out = if a.after {
        let y = layer(&mut b, "x", &mut fresh);
        // the layer's output, and where the map sees its channels
        let (y, n, axis, r) = match a.layer {
            LinKind::MatMul { rank: 4, .. } if a.carrier => {
                (b.node("Transpose", "carrier", &[&y], &[], vec![attr_ints("perm", &[0, 3, 1, 2])]), o, 1, 4)
            }
            LinKind::MatMul { .. } => (carrier_identity(&mut b, a, y), o, rank - 1, rank),
            LinKind::Gemm { .. } => (carrier_identity(&mut b, a, y), o, 1, 2),
            LinKind::Conv { .. } => (carrier_identity(&mut b, a, y), o, 1, 4),
        };
        if a.extra_reader {
            let z = b.node("Relu", "extra", &[&y], &["z"], vec![]);
            b.output(&z);
        }
        map(&mut b, y, n, axis, r, &mut fresh)
    } else {
        // the map on x (in the layout before the carrier), then the carrier, then the layer
        let (t, layer_x) = match a.layer {
            LinKind::MatMul { rank: 4, .. } if a.carrier => {
                let nchw = b.node("Transpose", "to_nchw", &["x"], &[], vec![attr_ints("perm", &[0, 3, 1, 2])]);
                let t = map(&mut b, nchw, c, 1, 4, &mut fresh);
                let back = b.node("Transpose", "carrier", &[&t], &[], vec![attr_ints("perm", &[0, 2, 3, 1])]);
                (t, back)
            }
            LinKind::Gemm { .. } if a.carrier => {
                let shape = b.initializer_i64("to_4d_shape", &[2, c as i64, 1, 1]);
                let x4 = b.node("Reshape", "to_4d", &["x", &shape], &[], vec![]);
                let t = map(&mut b, x4, c, 1, 4, &mut fresh);
                let flat = b.node("Flatten", "carrier", &[&t], &[], vec![attr_int("axis", 1)]);
                (t, flat)
            }
            LinKind::MatMul { .. } => {
                let t = map(&mut b, "x".into(), c, rank - 1, rank, &mut fresh);
                (t.clone(), carrier_identity(&mut b, a, t))
            }
            _ => {
                let t = map(&mut b, "x".into(), c, 1, rank, &mut fresh);
                (t.clone(), carrier_identity(&mut b, a, t))
            }
        };
        if a.extra_reader {
            let z = b.node("Relu", "extra", &[&t], &["z"], vec![]);
            b.output(&z);
        }
        layer(&mut b, &layer_x, &mut fresh)
    };
    let y = b.node("Relu", "act", &[&out], &["y"], vec![]);
    b.output(&y);
    (b, x_shape)
}

/// An Identity after `t` when the case has a carrier (and the layer has no other).
fn carrier_identity(b: &mut Builder, a: &AffineCase, t: String) -> String {
    if a.carrier {
        b.node("Identity", "carrier", &[&t], &[], vec![])
    } else {
        t
    }
}

pub(crate) fn check_affine(a: &AffineCase) -> Result<(), TestCaseError> {
    let (b, _) = build_affine(a);
    let original = b.build();
    let mut m = b.build();
    let r = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    tract_verify(&original, &m).map_err(|e| fail("a rewrite that tract does not confirm", e, &r))?;
    let (before, after) = (&r.before, &r.after);
    if after.nodes > before.nodes {
        return Err(fail("more nodes", format!("{} -> {}", before.nodes, after.nodes), &r));
    }
    for op in ["MatMul", "Gemm", "Conv"] {
        if after.op(op) != before.op(op) {
            return Err(fail("a layer lost or made", op, &r));
        }
    }
    // what stays: the layer, its carriers, the Relus; and an Add as the bias of a MatMul
    let padded_conv = matches!(a.layer, LinKind::Conv { padded: true, k: 3, .. });
    let shift_into_padding = !a.after && padded_conv && a.ops.iter().any(|o| o.shifts());
    if a.extra_reader || shift_into_padding {
        // left alone, or folded where exact: tract said which
        if shift_into_padding
            && !a.extra_reader
            && !r.refused.iter().any(|f| f.reason.to_string().contains("zero-pads"))
        {
            return Err(fail("a shift into a padded Conv without its reason", "", &r));
        }
        return Ok(());
    }
    // (a MatMul's bias: an Add, or a Sub of a constant after a MatMul without one)
    let maps = after.op("Mul") + after.op("Div");
    let adds_allowed = match a.layer {
        LinKind::MatMul { bias, .. } => usize::from(bias || a.ops.iter().any(|o| o.shifts())),
        _ => 0,
    };
    if maps > 0 || after.op("Add") + after.op("Sub") > adds_allowed {
        return Err(fail("not folded", format!("{:?}", after.ops), &r));
    }
    if !r.refused.is_empty() {
        return Err(fail("folded, but a refusal", "", &r));
    }
    Ok(())
}
