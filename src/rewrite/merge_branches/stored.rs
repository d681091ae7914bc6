//! The merge of a group whose branches are all Conv branches with stored weights, without
//! reading the weights' values.

use super::branch::{base_key, conv_form, place, Branch, Kind, SourceSize};
use super::constants::channel_vector;
use super::{kernel_label, Cx, Merged};
use crate::graph::Exact;
use crate::kernel::read::read_conv_form;
use crate::kernel::{tap_positions, Geometry};
use crate::model::tensor::{FloatType, Scaled, Summed, Term};
use ndarray::Array1;

/// A Conv branch whose weight is stored, read but for the weight's values.
struct Stored {
    weight: Scaled,
    ft: FloatType,
    bias: Array1<f64>,
    groups: usize,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<i64>,
    pads_end: Vec<i64>,
    crop_begin: Vec<i64>,
    crop_end: Vec<i64>,
    /// its pads were resolved at the input size
    sized: bool,
}

impl Stored {
    /// Conv branch `b`, when its weight is stored: a float initializer's bytes, or such bytes a
    /// BatchNormalization was folded into ([`Exact::Scaled`]); `None` otherwise or when it
    /// cannot be read (the reason is [`load`]'s).
    ///
    /// [`load`]: super::values::load
    fn read(cx: &Cx, b: &Branch, size: &SourceSize) -> Option<Stored> {
        let Kind::Conv { conv, through } = b.kind else { return None };
        let n = cx.node(conv);
        let name = n.input.get(1)?;
        let (weight, ft) = match cx.consts.exact.get(name) {
            Some(Exact::Scaled(s)) if cx.ix.initializer.contains_key(name) => {
                let t = cx.ix.constant(cx.g, name)?;
                (s.clone(), FloatType::from_onnx(t.data_type.unwrap_or(0))?)
            }
            Some(_) => return None,
            None => {
                let (raw, ft, dims) = cx.stored_weight(name)?;
                let ones = vec![1.0; dims[0]];
                (Scaled::new(raw, ft, dims, ones)?, ft)
            }
        };
        let f = read_conv_form(&cx.consts, n, &weight.dims, ft).ok()?;
        let (f, [crop_begin, crop_end], sized) = conv_form(cx, f, through, size).ok()?;
        let bias = f.bias.unwrap_or_else(|| Array1::zeros(weight.dims[0]));
        Some(Stored {
            weight,
            ft,
            bias,
            groups: f.groups,
            strides: f.strides,
            dilations: f.dilations,
            pads_begin: f.pads_begin,
            pads_end: f.pads_end,
            crop_begin,
            crop_end,
            sized,
        })
    }

    fn geometry(&self) -> Geometry<'_> {
        Geometry {
            dims: &self.weight.dims,
            groups: self.groups,
            strides: &self.strides,
            dilations: &self.dilations,
            pads_begin: &self.pads_begin,
            pads_end: &self.pads_end,
            crop_begin: &self.crop_begin,
            crop_end: &self.crop_end,
        }
    }

    fn kernel(&self) -> &[usize] {
        &self.weight.dims[2..]
    }
}

/// [`merge_values`] without reading the weights' values, when every branch is a Conv whose
/// weight is stored: the merged weight is their sum computed when it is written
/// ([`Exact::Summed`]), and what is computed now — the bias, the factors, the tap positions — is
/// what the full merge computes, with the same operations in the same order (so the values are
/// the same to the bit). `None` when a branch is not such a Conv or when the full merge would
/// refuse the group (it then says why).
///
/// [`merge_values`]: super::values::merge_values
pub(super) fn merge_stored(cx: &Cx, group: &[&Branch]) -> Option<Merged> {
    let size = SourceSize::new(cx, &group.first()?.source);
    let loaded: Vec<Stored> = group.iter().map(|b| Stored::read(cx, b, &size)).collect::<Option<_>>()?;
    // the largest window, then the most taps (the first of equal ones), as the full merge picks it
    let key = |s: &Stored| base_key(&s.geometry());
    let mut bi = 0;
    for k in 1..loaded.len() {
        if key(&loaded[k]) > key(&loaded[bi]) {
            bi = k;
        }
    }
    let big = &loaded[bi];
    let (o, r, ft) = (big.weight.dims[0], big.weight.dims.len() - 2, big.ft);
    if big.crop_begin.iter().chain(&big.crop_end).any(|&c| c != 0) || loaded.iter().any(|s| s.ft != ft) {
        return None;
    }
    // a branch's factors, and its bias times them (`AffineConv::then_affine`'s operations)
    let scaled = |k: usize| -> Option<(Vec<Vec<f64>>, Array1<f64>)> {
        let (s, b) = (&loaded[k], group[k]);
        let (so, sr) = (s.weight.dims[0], s.weight.dims.len() - 2);
        let mut bias = s.bias.clone();
        let mut factors = Vec::with_capacity(b.scales.len());
        for sc in &b.scales {
            let a = channel_vector(sc, so, sr)?;
            bias = &bias * &a + &Array1::<f64>::zeros(a.len());
            factors.push(a.to_vec());
        }
        Some((factors, bias))
    };
    let (base_factors, mut bias) = scaled(bi)?;
    let mut terms = Vec::with_capacity(loaded.len() - 1);
    for k in (0..loaded.len()).filter(|&k| k != bi) {
        let s = &loaded[k];
        let (factors, b) = scaled(k)?;
        let at = place(&s.geometry(), &big.geometry(), &size).ok()?;
        bias += &b;
        terms.push(Term { values: s.weight.clone(), factors, at: tap_positions(s.kernel(), big.kernel(), &at) });
    }
    let summed = Summed::new(big.weight.clone(), base_factors, terms)?;
    debug_assert_eq!((summed.dims()[0], summed.dims().len() - 2), (o, r));
    Some(Merged {
        members: vec![],
        weight: Exact::Summed(summed),
        dims: big.weight.dims.clone(),
        bias,
        pads: (big.pads_begin.clone(), big.pads_end.clone()),
        ft,
        base: bi,
        kernels: loaded.iter().map(|s| Some(kernel_label(s.kernel(), &s.dilations))).collect(),
        base_pads: (!big.sized).then(|| (big.pads_begin.clone(), big.pads_end.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::acb;
    use super::super::values::merge_values;
    use super::super::MergeBranches;
    use super::*;
    use crate::rewrite::Rule;
    use crate::support::{Builder, ConvAttrs};
    use ndarray::ArrayD;

    /// The merge of stored weights (a sum computed when it is written) has the bits of the merge
    /// that reads every branch in f64: stored weights as they are, weights a BatchNormalization was
    /// folded into (factors of both signs), a branch scaled by a per-channel constant; branches
    /// dilated more than the base (taps placed a step apart), the base not first; branches
    /// placed at the input size (TensorFlow's and `auto_pad`'s padding at stride 2).
    #[test]
    fn stored_branches_merge_to_the_bits_of_branches_read_in_f64() {
        use super::super::tests::{dilated_block, paddle_same_stride_2, tf_same_stride_2};
        use crate::graph::GraphIndex;
        use crate::model::tensor::from_f64;
        use crate::rewrite::driver::Cache;
        // the ACNet block with its 1x3 branch times a per-channel constant
        let mut scaled = Builder::new(2, 6, 6);
        let (sq, _, _) = scaled.conv_rand("sq", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let (ver, _, _) = scaled.conv_rand("ver", "x", 3, 2, &[3, 1], true, ConvAttrs::pads(&[1, 0, 1, 0]));
        let (hor, _, _) = scaled.conv_rand("hor", "x", 3, 2, &[1, 3], true, ConvAttrs::pads(&[0, 1, 0, 1]));
        let g = scaled.rand(&[3, 1, 1]);
        let g = scaled.initializer("g", &g);
        let hor = scaled.node("Mul", "mul", &[&hor, &g], &[], vec![]);
        let s = scaled.add("add", &sq, &ver);
        let y = scaled.add("add_1", &s, &hor);
        scaled.output(&y);
        let acnet = ["sq", "ver", "hor"];
        let blocks = [
            (acb(ConvAttrs::pads(&[0, 1, 0, 1])), "add_1", &acnet[..], 0),
            (scaled, "add_1", &acnet[..], 0),
            (dilated_block(&[3, 0, 1, 2, 4], false), "add3", &["k3d3", "k7", "k5", "k3d2", "k2d2"][..], 1),
            (tf_same_stride_2(8, 10).0, "add_2", &["sq", "ver", "hor", "one"][..], 0),
            (paddle_same_stride_2(7, 10).0, "add_2", &["sq", "ver", "hor", "one"][..], 0),
        ];
        for (b, root, convs, base) in blocks {
            let m = b.build();
            for folded in [false, true] {
                let ix = GraphIndex::new(m.graph());
                let mut cache = Cache::new(m.graph());
                if folded {
                    for (k, conv) in convs.iter().enumerate() {
                        let n = m.graph().node.iter().find(|n| n.name() == *conv).unwrap();
                        let t = ix.constant(m.graph(), &n.input[1]).unwrap();
                        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                        let factors = (0..dims[0]).map(|o| [0.7, -1.3, 2.1][(o + k) % 3]).collect();
                        let raw = m.raw_bytes(t).unwrap().unwrap();
                        let s = Scaled::new(raw, FloatType::F32, dims, factors).unwrap();
                        cache.exact.insert(n.input[1].clone(), Exact::Scaled(s));
                    }
                }
                let cx = Cx::new(&m, &ix, &cache);
                let at = m.graph().node.iter().position(|n| n.name() == root).unwrap();
                let c = MergeBranches.find(&cx, at).expect("a sum");
                let group: Vec<&Branch> = c.branches.iter().filter(|b| matches!(b.kind, Kind::Conv { .. })).collect();
                assert_eq!(group.len(), convs.len());
                let stored = merge_stored(&cx, &group).expect("every branch's weight is stored");
                let full = merge_values(&cx, &group).expect("the block merges");
                assert!(matches!(stored.weight, Exact::Summed(_)));
                let bits = |a: ArrayD<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(stored.weight.to_f64()), bits(full.weight.to_f64()), "{root}, folded: {folded}");
                assert_eq!(bits(stored.bias.clone().into_dyn()), bits(full.bias.clone().into_dyn()));
                assert_eq!((&stored.dims, &stored.pads, stored.base), (&full.dims, &full.pads, full.base));
                assert_eq!((&stored.kernels, &stored.base_pads, stored.ft), (&full.kernels, &full.base_pads, full.ft));
                assert_eq!(full.base, base, "{convs:?}");
                let want = from_f64("w", &full.weight.to_f64(), FloatType::F32);
                assert_eq!(stored.weight.encode("w", FloatType::F32), Some(want));
            }
        }
    }
}
