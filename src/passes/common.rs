//! Reading operators into the kernel algebra: Conv, BatchNormalization, Slice and Pad as
//! geometry, constants as f64 arrays. Each reader says why when it cannot.

use super::Ctx;
use crate::graph::{attr, attr_float, attr_int, attr_ints, attr_string, default_opset, is_default_domain, GraphIndex};
use crate::io::Model;
use crate::kernel::{AffineConv, BatchNorm};
use crate::proto::{GraphProto, NodeProto};
use crate::tensor::{to_f64, to_i64, FloatType};
use ndarray::{Array1, ArrayD, Ix1};

pub fn graph(m: &Model) -> &GraphProto {
    m.proto.graph.as_ref().expect("a loaded model has a graph")
}

pub fn is_op(n: &NodeProto, op: &str) -> bool {
    n.op_type() == op && is_default_domain(n)
}

/// A constant float tensor as f64 (exact values for tensors written by earlier passes). Looks
/// through Identity, Reshape and Unsqueeze of constants (exporters write per-channel scales as
/// `Reshape(weight, [1, C, 1, 1])`).
pub fn const_f64(m: &Model, ix: &GraphIndex, ctx: &Ctx, name: &str) -> Result<(ArrayD<f64>, FloatType), String> {
    let g = graph(m);
    let Some(t) = ix.constant(g, name) else {
        if let Some(n) = ix.producer_node(g, name) {
            if let Some(r) = const_through(m, ix, ctx, n) {
                return r;
            }
        }
        return Err(if ix.inputs.contains(name) {
            format!("'{name}' is a graph input, not a constant")
        } else {
            format!("'{name}' is computed, not a constant")
        });
    };
    let ft = FloatType::from_onnx(t.data_type.unwrap_or(0))
        .ok_or_else(|| format!("'{name}' has data type {}, which the kernel maths does not handle", t.data_type.unwrap_or(0)))?;
    if let Some(a) = ctx.pending.get(name) {
        if ix.initializer.contains_key(name) {
            return Ok((a.clone(), ft));
        }
    }
    let raw = m.raw_bytes(t).map_err(|e| e.to_string())?;
    let a = to_f64(t, raw.as_deref())?;
    if let Some(raw) = raw.filter(|r| r.len() >= 1 << 16) {
        m.release(&raw);
    }
    Ok((a, ft))
}

/// Shape-only operators on a constant: Identity, Reshape, Unsqueeze, Squeeze, Flatten-free.
fn const_through(m: &Model, ix: &GraphIndex, ctx: &Ctx, n: &NodeProto) -> Option<Result<(ArrayD<f64>, FloatType), String>> {
    let op = n.op_type();
    if !is_default_domain(n) || !matches!(op, "Identity" | "Reshape" | "Unsqueeze" | "Squeeze") || n.input.is_empty() {
        return None;
    }
    let (a, ft) = match const_f64(m, ix, ctx, &n.input[0]) {
        Ok(v) => v,
        Err(e) => return Some(Err(e)),
    };
    let shape: Vec<usize> = match op {
        "Identity" => a.shape().to_vec(),
        "Reshape" => {
            let target = const_i64(m, ix, n.input.get(1)?).ok()?;
            let mut out: Vec<i64> = target.iter().enumerate().map(|(i, &d)| if d == 0 { a.shape().get(i).map_or(-2, |&x| x as i64) } else { d }).collect();
            // a target no tensor could have (its product overflows) is no reshape of this one
            let known: i64 = out.iter().filter(|&&d| d > 0).try_fold(1i64, |acc, &d| acc.checked_mul(d))?;
            if let Some(p) = out.iter().position(|&d| d == -1) {
                if known == 0 {
                    return None;
                }
                out[p] = a.len() as i64 / known;
            }
            if out.iter().any(|&d| d < 0) {
                return None;
            }
            out.iter().map(|&d| d as usize).collect()
        }
        "Unsqueeze" | "Squeeze" => {
            let axes = match attr_ints(n, "axes") {
                Some(a) => a,
                None => match n.input.get(1).filter(|s| !s.is_empty()) {
                    Some(s) => const_i64(m, ix, s).ok()?,
                    None if op == "Squeeze" => vec![],
                    None => return None,
                },
            };
            let mut shape = a.shape().to_vec();
            if op == "Squeeze" {
                let r = shape.len() as i64;
                let axes: Vec<usize> = axes.iter().map(|&x| if x < 0 { (x + r) as usize } else { x as usize }).collect();
                shape = shape.iter().enumerate().filter(|(i, &d)| !(d == 1 && (axes.is_empty() || axes.contains(i)))).map(|(_, &d)| d).collect();
            } else {
                let r = (shape.len() + axes.len()) as i64;
                let mut axes: Vec<usize> = axes.iter().map(|&x| if x < 0 { (x + r) as usize } else { x as usize }).collect();
                axes.sort_unstable();
                for ax in axes {
                    if ax > shape.len() {
                        return None;
                    }
                    shape.insert(ax, 1);
                }
            }
            shape
        }
        _ => return None,
    };
    let v: Vec<f64> = a.iter().copied().collect();
    Some(ArrayD::from_shape_vec(ndarray::IxDyn(&shape), v).map(|a| (a, ft)).map_err(|e| e.to_string()))
}

/// A constant integer tensor (INT64/INT32), looking through Unsqueeze/Identity/Cast of a constant.
pub fn const_i64(m: &Model, ix: &GraphIndex, name: &str) -> Result<Vec<i64>, String> {
    let g = graph(m);
    if let Some(t) = ix.constant(g, name) {
        let raw = m.raw_bytes(t).map_err(|e| e.to_string())?;
        return to_i64(t, raw.as_deref());
    }
    match ix.producer_node(g, name) {
        Some(n) if (is_op(n, "Unsqueeze") || is_op(n, "Identity") || is_op(n, "Cast") || is_op(n, "Reshape")) && !n.input.is_empty() => {
            const_i64(m, ix, &n.input[0])
        }
        _ => Err(format!("'{name}' is not a constant")),
    }
}

fn vec1(a: ArrayD<f64>, name: &str, c: usize) -> Result<Array1<f64>, String> {
    if a.len() != c || a.shape().iter().filter(|&&d| d != 1).count() > 1 {
        return Err(format!("'{name}' has shape {:?}, expected {c} channels", a.shape()));
    }
    Ok(a.into_shape_with_order(c).map_err(|e| e.to_string())?.into_dimensionality::<Ix1>().unwrap())
}

/// A BatchNormalization in inference mode with constant parameters, for `channels` channels.
pub fn read_bn(m: &Model, ix: &GraphIndex, ctx: &Ctx, n: &NodeProto) -> Result<(BatchNorm, FloatType), String> {
    if attr_int(n, "training_mode", 0) != 0 {
        return Err("BatchNormalization in training mode".into());
    }
    if n.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err("BatchNormalization computes batch statistics (training mode outputs)".into());
    }
    if attr(n, "is_test").is_some() && attr_int(n, "is_test", 0) == 0 {
        return Err("BatchNormalization in training mode (is_test = 0)".into());
    }
    if attr_int(n, "spatial", 1) != 1 {
        return Err("BatchNormalization with spatial = 0".into());
    }
    if n.input.len() < 5 {
        return Err("BatchNormalization with fewer than 5 inputs".into());
    }
    let (scale, ft) = const_f64(m, ix, ctx, &n.input[1])?;
    let c = scale.len();
    let get = |i: usize| -> Result<Array1<f64>, String> { vec1(const_f64(m, ix, ctx, &n.input[i])?.0, &n.input[i], c) };
    let bn = BatchNorm {
        scale: vec1(scale, &n.input[1], c)?,
        bias: get(2)?,
        mean: get(3)?,
        var: get(4)?,
        epsilon: attr_float(n, "epsilon", 1e-5) as f64,
    };
    Ok((bn, ft))
}

/// A Conv with constant weight (and bias) as an affine convolution with explicit pads.
pub fn read_conv(m: &Model, ix: &GraphIndex, ctx: &Ctx, n: &NodeProto) -> Result<(AffineConv, FloatType), String> {
    if n.input.len() < 2 {
        return Err("Conv without weight".into());
    }
    let (w, ft) = const_f64(m, ix, ctx, &n.input[1]).map_err(|e| format!("weight {e}"))?;
    if w.ndim() < 3 {
        return Err(format!("weight of rank {}", w.ndim()));
    }
    let r = w.ndim() - 2;
    let o = w.shape()[0];
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => {
            let (a, bt) = const_f64(m, ix, ctx, b).map_err(|e| format!("bias {e}"))?;
            if bt != ft {
                return Err("bias and weight have different dtypes".into());
            }
            Some(vec1(a, b, o)?)
        }
        None => None,
    };
    let groups = attr_int(n, "group", 1);
    if groups < 1 || o % groups as usize != 0 {
        return Err(format!("group = {groups} does not divide {o} output channels"));
    }
    let kernel: Vec<usize> = w.shape()[2..].to_vec();
    if let Some(ks) = attr_ints(n, "kernel_shape") {
        if ks.iter().map(|&k| k as usize).ne(kernel.iter().copied()) {
            return Err(format!("kernel_shape {ks:?} does not match the weight {kernel:?}"));
        }
    }
    let pos = |name: &str| -> Result<Vec<usize>, String> {
        match attr_ints(n, name) {
            None => Ok(vec![1; r]),
            Some(v) if v.len() == r && v.iter().all(|&x| x >= 1) => Ok(v.iter().map(|&x| x as usize).collect()),
            Some(v) => Err(format!("{name} {v:?} invalid for a {r}-d kernel")),
        }
    };
    let strides = pos("strides")?;
    let dilations = pos("dilations")?;
    let auto_pad = attr_string(n, "auto_pad").unwrap_or_default();
    let (pb, pe) = match auto_pad.as_str() {
        "" | "NOTSET" => match attr_ints(n, "pads") {
            None => (vec![0; r], vec![0; r]),
            Some(p) if p.len() == 2 * r && p.iter().all(|&x| x >= 0) => (p[..r].to_vec(), p[r..].to_vec()),
            Some(p) => return Err(format!("pads {p:?} invalid for a {r}-d kernel")),
        },
        "VALID" => (vec![0; r], vec![0; r]),
        "SAME_UPPER" | "SAME_LOWER" => {
            if strides.iter().any(|&s| s > 1) {
                return Err(format!("auto_pad {auto_pad} with stride > 1 pads by the input size"));
            }
            let total: Vec<i64> = (0..r).map(|a| (dilations[a] * (kernel[a] - 1)) as i64).collect();
            let small: Vec<i64> = total.iter().map(|t| t / 2).collect();
            let big: Vec<i64> = total.iter().map(|t| t - t / 2).collect();
            if auto_pad == "SAME_UPPER" {
                (small, big)
            } else {
                (big, small)
            }
        }
        other => return Err(format!("auto_pad {other:?} unknown")),
    };
    Ok((AffineConv::new(w, bias, groups as usize, strides, dilations, pb, pe), ft))
}

/// Crop per spatial axis (begin, end) that a Slice applies to a tensor of rank `rank`.
pub fn read_slice(m: &Model, ix: &GraphIndex, n: &NodeProto, rank: usize) -> Result<(Vec<i64>, Vec<i64>), String> {
    let opset = default_opset(&m.proto);
    let (starts, ends, axes, steps) = if opset < 10 {
        let s = attr_ints(n, "starts").ok_or("Slice without starts")?;
        let e = attr_ints(n, "ends").ok_or("Slice without ends")?;
        (s, e, attr_ints(n, "axes"), None)
    } else {
        let get = |i: usize| -> Result<Option<Vec<i64>>, String> {
            match n.input.get(i).filter(|s| !s.is_empty()) {
                Some(name) => const_i64(m, ix, name).map(Some).map_err(|e| format!("Slice parameter {e}")),
                None => Ok(None),
            }
        };
        (get(1)?.ok_or("Slice without starts")?, get(2)?.ok_or("Slice without ends")?, get(3)?, get(4)?)
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    if axes.len() != starts.len() || ends.len() != starts.len() {
        return Err("Slice parameters of different lengths".into());
    }
    let r = rank - 2;
    let (mut cb, mut ce) = (vec![0i64; r], vec![0i64; r]);
    for k in 0..axes.len() {
        let ax = if axes[k] < 0 { axes[k] + rank as i64 } else { axes[k] };
        if ax < 0 || ax >= rank as i64 {
            return Err(format!("Slice axis {} out of range", axes[k]));
        }
        if steps.as_ref().is_some_and(|s| s[k] != 1) {
            return Err("Slice with a step other than 1".into());
        }
        let (s, e) = (starts[k], ends[k]);
        let full_end = e >= i32::MAX as i64;
        if ax < 2 {
            if s == 0 && full_end {
                continue;
            }
            return Err("Slice on the batch or channel axis".into());
        }
        if s < 0 {
            return Err(format!("Slice start {s} counts from the end"));
        }
        let end_crop = if full_end {
            0
        } else if e < 0 {
            -e
        } else {
            return Err(format!("Slice end {e} depends on the input size"));
        };
        cb[ax as usize - 2] += s;
        ce[ax as usize - 2] += end_crop;
    }
    Ok((cb, ce))
}

/// Pads (begin, end) per spatial axis of a zero-constant Pad; negative pads crop.
pub fn read_pad(m: &Model, ix: &GraphIndex, ctx: &Ctx, n: &NodeProto, rank: usize) -> Result<(Vec<i64>, Vec<i64>), String> {
    let opset = default_opset(&m.proto);
    let mode = attr_string(n, "mode").unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Err(format!("Pad in {mode} mode before a branch"));
    }
    let (pads, value) = if opset < 11 {
        (attr_ints(n, "pads").or_else(|| attr_ints(n, "paddings")).ok_or("Pad without pads")?, attr_float(n, "value", 0.0) as f64)
    } else {
        let pads = const_i64(m, ix, &n.input[1]).map_err(|e| format!("Pad amounts {e}"))?;
        let value = match n.input.get(2).filter(|s| !s.is_empty()) {
            Some(v) => {
                let (a, _) = const_f64(m, ix, ctx, v).map_err(|e| format!("Pad value {e}"))?;
                a.iter().next().copied().unwrap_or(0.0)
            }
            None => 0.0,
        };
        if n.input.get(3).is_some_and(|s| !s.is_empty()) {
            return Err("Pad with axes".into());
        }
        (pads, value)
    };
    if value != 0.0 {
        return Err(format!("Pad with value {value}, not zero"));
    }
    if pads.len() != 2 * rank {
        return Err("Pad amounts of the wrong length".into());
    }
    if pads[0] != 0 || pads[1] != 0 || pads[rank] != 0 || pads[rank + 1] != 0 {
        return Err("Pad on the batch or channel axis".into());
    }
    Ok((pads[2..rank].to_vec(), pads[rank + 2..].to_vec()))
}

/// A tensor name not used anywhere in the graph, starting from `base`.
pub fn fresh_name(g: &GraphProto, taken: &mut std::collections::HashSet<String>, base: &str) -> String {
    if taken.is_empty() {
        taken.extend(g.input.iter().map(|v| v.name().to_string()));
        taken.extend(g.output.iter().map(|v| v.name().to_string()));
        taken.extend(g.initializer.iter().map(|t| t.name().to_string()));
        taken.extend(g.value_info.iter().map(|v| v.name().to_string()));
        for n in &g.node {
            taken.extend(n.input.iter().cloned());
            taken.extend(n.output.iter().cloned());
        }
    }
    let mut name = base.to_string();
    let mut k = 1;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

/// Names for a rewritten conv's weight and bias: the conv's own initializers when nothing
/// else reads them, fresh names otherwise.
pub fn param_names(g: &GraphProto, ix: &GraphIndex, conv: &NodeProto) -> (String, String) {
    let mut taken = std::collections::HashSet::new();
    let own = |name: &str| ix.initializer.contains_key(name) && ix.uses(name) == 1 && !ix.inputs.contains(name);
    let w = &conv.input[1];
    let wname = if own(w) { w.clone() } else { fresh_name(g, &mut taken, &format!("{}_fused", w)) };
    let bname = match conv.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) if own(b) => b.clone(),
        _ => fresh_name(g, &mut taken, &format!("{wname}_bias")),
    };
    (wname, bname)
}

/// `conv` with new weight/bias inputs and output.
pub fn rewired_conv(conv: &NodeProto, input: &str, wname: &str, bname: &str, output: &str) -> NodeProto {
    let mut c = conv.clone();
    c.input = vec![input.to_string(), wname.to_string(), bname.to_string()];
    c.output = vec![output.to_string()];
    c
}

pub fn kernel_str(k: &[usize]) -> String {
    k.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}
