//! An affine convolution — weight, bias and geometry — and the algebra of re-parameterisation:
//! fold a BatchNormalization into it, place a smaller kernel inside a larger one at the tap offset
//! (and, dilated more, the tap step) its geometry implies, add. All maths in f64. [`read`] reads Conv, BatchNormalization, Slice and
//! Pad nodes into it.

pub(crate) mod read;
mod seq;

pub use seq::SeqMisfit;

use ndarray::{Array1, ArrayD, Dimension, IxDyn, Slice};
use std::fmt;

/// Why a smaller convolution does not fit inside a larger one ([`AffineConv::offset_in`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Misfit {
    /// Spatial ranks (small, large).
    Rank(usize, usize),
    /// Output channels (small, large).
    OutChannels(usize, usize),
    /// Groups (small, large).
    Groups(usize, usize),
    /// Input channels per group (small, large).
    InChannelsPerGroup(usize, usize),
    Stride {
        small: usize,
        large: usize,
        axis: usize,
    },
    /// The small kernel's dilation is not a multiple of the large one's: its taps (one every
    /// `small` positions) fall between the large kernel's (one every `large`).
    Dilation {
        small: i64,
        large: i64,
        axis: usize,
    },
    /// The small convolution crops and pads the same side.
    CropAndPad {
        axis: usize,
    },
    NegativeCrop {
        axis: usize,
    },
    /// The paddings and crops make the output sizes differ at some input sizes, and the input
    /// size is not known (so not fixed).
    OutputSizeVaries {
        axis: usize,
    },
    /// The output sizes differ at the input size the model runs at.
    OutputSize {
        axis: usize,
        small: i64,
        large: i64,
        input: usize,
    },
    /// The taps land between the large kernel's (dilated) taps: offset `num / dilation`.
    BetweenTaps {
        axis: usize,
        num: i64,
        dilation: i64,
    },
    /// A kernel of `k` taps, one every `step` taps of the large kernel from `offset`, does not
    /// fit in `large`.
    DoesNotFit {
        k: i64,
        offset: i64,
        step: i64,
        large: i64,
        axis: usize,
    },
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misfit::Rank(a, b) => write!(f, "{a}-d and {b}-d convolutions"),
            Misfit::OutChannels(a, b) => write!(f, "{a} vs {b} output channels"),
            Misfit::Groups(a, b) => write!(f, "groups {a} vs {b}"),
            Misfit::InChannelsPerGroup(a, b) => write!(f, "{a} vs {b} input channels per group"),
            Misfit::Stride { small, large, axis } => write!(f, "stride {small} vs {large} on axis {axis}"),
            Misfit::Dilation { small, large, axis } => write!(
                f,
                "dilation {small} vs {large} on axis {axis}: not a multiple, its taps fall between the large kernel's"
            ),
            Misfit::CropAndPad { axis } => write!(f, "crop and padding on the same side of axis {axis}"),
            Misfit::NegativeCrop { axis } => write!(f, "negative crop on axis {axis}"),
            Misfit::OutputSizeVaries { axis } => write!(
                f,
                "paddings give a different output size on axis {axis} at some input sizes, and the input size is not fixed"
            ),
            Misfit::OutputSize { axis, small, large, input } => {
                write!(f, "output size {small} vs {large} on axis {axis} (input size {input})")
            }
            Misfit::BetweenTaps { axis, num, dilation } => {
                write!(f, "taps fall between the large kernel's taps on axis {axis} (offset {num}/{dilation})")
            }
            Misfit::DoesNotFit { k, offset, step: 1, large, axis } => {
                write!(f, "kernel of {k} at offset {offset} does not fit in {large} on axis {axis}")
            }
            Misfit::DoesNotFit { k, offset, step, large, axis } => write!(
                f,
                "kernel of {k} at offset {offset}, one tap every {step}, does not fit in {large} on axis {axis} (taps {offset} to {})",
                offset + (k - 1) * step
            ),
        }
    }
}

/// A convolution `y = conv(crop(x), W) + b`, per spatial axis with stride, dilation, padding and
/// a crop (a shift of the window: positive values read `x[crop_b .. len - crop_e]`).
#[derive(Clone, Debug, PartialEq)]
pub struct AffineConv {
    /// `[O, C/groups, k_1, ..., k_n]`
    pub weight: ArrayD<f64>,
    /// `[O]`
    pub bias: Array1<f64>,
    pub groups: usize,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads_begin: Vec<i64>,
    pub pads_end: Vec<i64>,
    pub crop_begin: Vec<i64>,
    pub crop_end: Vec<i64>,
}

/// BatchNormalization parameters in inference mode.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub scale: Array1<f64>,
    pub bias: Array1<f64>,
    pub mean: Array1<f64>,
    pub var: Array1<f64>,
    pub epsilon: f64,
}

impl BatchNorm {
    /// `y = x * a + c` per channel.
    pub fn affine(&self) -> (Array1<f64>, Array1<f64>) {
        let std = self.var.mapv(|v| (v + self.epsilon).sqrt());
        let a = &self.scale / &std;
        let c = &self.bias - &(&self.mean * &a);
        (a, c)
    }
}

/// Where a smaller kernel's taps land in a larger one, per axis: its tap `i` at the large
/// kernel's tap `offset + i·step` (`step` > 1 for a kernel dilated more than the large one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub offset: Vec<usize>,
    pub step: Vec<usize>,
}

/// Output length of a convolution on an input of length `len`: `floor((len − crop + pads −
/// d·(k − 1) − 1) / s) + 1` (0 or less: no valid output).
pub fn output_len(len: i64, pads: (i64, i64), crop: (i64, i64), k: i64, s: i64, d: i64) -> i64 {
    (len - crop.0 - crop.1 + pads.0 + pads.1 - d * (k - 1) - 1).div_euclid(s) + 1
}

/// The pads (begin, end) `auto_pad` SAME_UPPER (`upper`) or SAME_LOWER gives a kernel of `k`
/// taps, dilation `d`, stride `s` on an input of length `len`: the output has `ceil(len / s)`
/// elements, the total padding is `max((ceil(len / s) − 1)·s + (k − 1)·d + 1 − len, 0)`, its odd
/// element at the end (UPPER) or the beginning (LOWER). At stride 1 this is `(k − 1)·d` whatever
/// the length.
pub fn same_pads(len: i64, k: i64, s: i64, d: i64, upper: bool) -> (i64, i64) {
    let out = (len + s - 1).div_euclid(s);
    let total = ((out - 1) * s + (k - 1) * d + 1 - len).max(0);
    let (small, big) = (total / 2, total - total / 2);
    if upper {
        (small, big)
    } else {
        (big, small)
    }
}

/// A convolution's shape and window, its values aside: what decides where a smaller kernel's
/// taps land in a larger one.
#[derive(Clone, Copy, Debug)]
pub struct Geometry<'a> {
    /// The weight's shape, `[O, C/groups, k_1, ..., k_n]`.
    pub dims: &'a [usize],
    pub groups: usize,
    pub strides: &'a [usize],
    pub dilations: &'a [usize],
    pub pads_begin: &'a [i64],
    pub pads_end: &'a [i64],
    pub crop_begin: &'a [i64],
    pub crop_end: &'a [i64],
}

impl Geometry<'_> {
    fn rank(&self) -> usize {
        self.dims.len() - 2
    }
    fn out_channels(&self) -> usize {
        self.dims[0]
    }
    fn kernel(&self) -> &[usize] {
        &self.dims[2..]
    }

    /// The input positions its window spans per axis, `(k − 1)·d + 1` (a one-tap axis: 1).
    pub fn window(&self) -> Vec<usize> {
        self.kernel().iter().zip(self.dilations).map(|(&k, &d)| if k > 1 { (k - 1) * d + 1 } else { 1 }).collect()
    }

    /// Where this (smaller) convolution's taps land inside `big`'s kernel, per axis, or why they
    /// cannot, at every input length. Both read the same input; the merged convolution has
    /// `big`'s geometry, which must have no crop.
    ///
    /// Output `y` reads input position `y·s − p + c + i·d` at tap `i` (begin padding `p`, crop
    /// `c`, dilation `d`); `big` reads `y·s − P + j·D`. So tap `i` is `big`'s tap `j = o + i·d/D`
    /// with `o = (P − p + c)/D`: exact when `d/D` and `o` are whole (a one-tap axis has any
    /// dilation), every `j` is in `0..K`, and both give the same output size. Where this one
    /// pads, `big` reads the same positions outside the input (zeros too); where it crops, it
    /// never pads the same side, so it reads only inside the crop.
    pub fn offset_in(&self, big: &Geometry) -> Result<Placement, Misfit> {
        self.place_in(big, None)
    }

    /// [`Geometry::offset_in`] for an input of spatial size `len` (per axis) only: the output
    /// sizes must be equal at that size.
    pub fn offset_in_at(&self, big: &Geometry, len: &[usize]) -> Result<Placement, Misfit> {
        self.place_in(big, Some(len))
    }

    fn place_in(&self, big: &Geometry, len: Option<&[usize]>) -> Result<Placement, Misfit> {
        if self.rank() != big.rank() {
            return Err(Misfit::Rank(self.rank(), big.rank()));
        }
        if self.out_channels() != big.out_channels() {
            return Err(Misfit::OutChannels(self.out_channels(), big.out_channels()));
        }
        if self.groups != big.groups {
            return Err(Misfit::Groups(self.groups, big.groups));
        }
        if self.dims[1] != big.dims[1] {
            return Err(Misfit::InChannelsPerGroup(self.dims[1], big.dims[1]));
        }
        let r = self.rank();
        let (mut offset, mut step) = (Vec::with_capacity(r), Vec::with_capacity(r));
        for ax in 0..r {
            let (k, kk) = (self.kernel()[ax] as i64, big.kernel()[ax] as i64);
            let s = self.strides[ax];
            if s != big.strides[ax] {
                return Err(Misfit::Stride { small: s, large: big.strides[ax], axis: ax });
            }
            // a one-tap kernel has no dilation to speak of
            let dd = if kk == 1 { 1 } else { big.dilations[ax] as i64 };
            let d = if k == 1 { dd } else { self.dilations[ax] as i64 };
            if d % dd != 0 {
                return Err(Misfit::Dilation { small: d, large: dd, axis: ax });
            }
            let (pb, pe, cb, ce) = (self.pads_begin[ax], self.pads_end[ax], self.crop_begin[ax], self.crop_end[ax]);
            if (cb > 0 && pb > 0) || (ce > 0 && pe > 0) {
                return Err(Misfit::CropAndPad { axis: ax });
            }
            if cb < 0 || ce < 0 {
                return Err(Misfit::NegativeCrop { axis: ax });
            }
            // output length: floor((L - cb - ce + pb + pe - d(k-1) - 1)/s) + 1, equal for every L,
            // or at the one L given
            let span_small = pb + pe - cb - ce - d * (k - 1);
            let (pbb, peb) = (big.pads_begin[ax], big.pads_end[ax]);
            let span_big = pbb + peb - dd * (kk - 1);
            if span_small != span_big {
                let Some(len) = len else { return Err(Misfit::OutputSizeVaries { axis: ax }) };
                let l = len[ax] as i64;
                let small = output_len(l, (pb, pe), (cb, ce), k, s as i64, d);
                let large = output_len(l, (pbb, peb), (0, 0), kk, s as i64, dd);
                if small != large {
                    return Err(Misfit::OutputSize { axis: ax, small, large, input: len[ax] });
                }
            }
            let num = pbb - pb + cb;
            if num % dd != 0 {
                return Err(Misfit::BetweenTaps { axis: ax, num, dilation: dd });
            }
            let (o, st) = (num / dd, d / dd);
            if o < 0 || o + (k - 1) * st + 1 > kk {
                return Err(Misfit::DoesNotFit { k, offset: o, step: st, large: kk, axis: ax });
            }
            offset.push(o as usize);
            step.push(st as usize);
        }
        Ok(Placement { offset, step })
    }
}

/// For a kernel `k` placed `at` inside kernel `big`: where each of its taps (in row-major order)
/// lands in `big`'s, as an index into one `[o, c]` block of `big`.
pub fn tap_positions(k: &[usize], big: &[usize], at: &Placement) -> Vec<usize> {
    let sv: usize = k.iter().product();
    let mut pos = Vec::with_capacity(sv);
    for t in 0..sv {
        let (mut rest, mut idx, mut stride) = (t, 0, 1);
        for a in (0..k.len()).rev() {
            idx += (at.offset[a] + (rest % k[a]) * at.step[a]) * stride;
            rest /= k[a];
            stride *= big[a];
        }
        pos.push(idx);
    }
    pos
}

impl AffineConv {
    pub fn out_channels(&self) -> usize {
        self.weight.shape()[0]
    }
    pub fn in_channels(&self) -> usize {
        self.weight.shape()[1] * self.groups
    }
    pub fn rank(&self) -> usize {
        self.weight.ndim() - 2
    }
    pub fn kernel(&self) -> &[usize] {
        &self.weight.shape()[2..]
    }

    /// A plain convolution with zero crop.
    pub fn new(
        weight: ArrayD<f64>,
        bias: Option<Array1<f64>>,
        groups: usize,
        strides: Vec<usize>,
        dilations: Vec<usize>,
        pads_begin: Vec<i64>,
        pads_end: Vec<i64>,
    ) -> AffineConv {
        let o = weight.shape()[0];
        let r = weight.ndim() - 2;
        AffineConv {
            weight,
            bias: bias.unwrap_or_else(|| Array1::zeros(o)),
            groups,
            strides,
            dilations,
            pads_begin,
            pads_end,
            crop_begin: vec![0; r],
            crop_end: vec![0; r],
        }
    }

    /// The identity on `channels` channels as a one-tap kernel (output channel o reads input
    /// channel o, which is index `o mod (C/groups)` within its group).
    pub fn identity(channels: usize, groups: usize, rank: usize) -> AffineConv {
        let cg = channels / groups;
        let mut shape = vec![channels, cg];
        shape.extend(std::iter::repeat_n(1, rank));
        let mut w = ArrayD::zeros(IxDyn(&shape));
        for o in 0..channels {
            let mut idx = vec![o, o % cg];
            idx.extend(std::iter::repeat_n(0, rank));
            w[IxDyn(&idx)] = 1.0;
        }
        AffineConv::new(w, None, groups, vec![1; rank], vec![1; rank], vec![0; rank], vec![0; rank])
    }

    /// Follow the convolution by a per-output-channel affine map `y * a + c`.
    pub fn then_affine(&mut self, a: &Array1<f64>, c: &Array1<f64>) {
        for (o, mut w) in self.weight.outer_iter_mut().enumerate() {
            w *= a[o];
        }
        self.bias = &self.bias * a + c;
    }

    /// Fold a BatchNormalization that follows this convolution.
    pub fn fold_bn(&mut self, bn: &BatchNorm) {
        let (a, c) = bn.affine();
        self.then_affine(&a, &c);
    }

    /// Its shape and window, the values aside.
    pub fn geometry(&self) -> Geometry<'_> {
        Geometry {
            dims: self.weight.shape(),
            groups: self.groups,
            strides: &self.strides,
            dilations: &self.dilations,
            pads_begin: &self.pads_begin,
            pads_end: &self.pads_end,
            crop_begin: &self.crop_begin,
            crop_end: &self.crop_end,
        }
    }

    /// Where this (smaller) convolution's taps land inside `big`'s kernel, at every input size:
    /// see [`Geometry::offset_in`].
    pub fn offset_in(&self, big: &AffineConv) -> Result<Placement, Misfit> {
        self.geometry().offset_in(&big.geometry())
    }

    /// The same on an input of spatial size `len` only: see [`Geometry::offset_in_at`].
    pub fn offset_in_at(&self, big: &AffineConv, len: &[usize]) -> Result<Placement, Misfit> {
        self.geometry().offset_in_at(&big.geometry(), len)
    }

    /// Add `small` (weights and bias) into this convolution, its taps placed `at`.
    pub fn add_at(&mut self, small: &AffineConv, at: &Placement) {
        self.bias += &small.bias;
        let (big_k, k) = (self.kernel().to_vec(), small.kernel().to_vec());
        if let (Some(dst), Some(src)) = (self.weight.as_slice_mut(), small.weight.as_slice()) {
            // contiguous (the usual case): per [o, c] block, each small tap's place in the big block
            let (bv, sv): (usize, usize) = (big_k.iter().product(), k.iter().product());
            let pos = tap_positions(&k, &big_k, at);
            let add = |(dst, src): (&mut [f64], &[f64])| {
                for (d, s) in dst.chunks_exact_mut(bv).zip(src.chunks_exact(sv)) {
                    for (&p, &x) in pos.iter().zip(s) {
                        d[p] += x;
                    }
                }
            };
            // large kernels a piece of [o, c] blocks at a time on every core (each element gets
            // the same one addition either way)
            const PIECE: usize = 1 << 15;
            if dst.len() >= 2 * PIECE {
                use rayon::prelude::*;
                let blocks = PIECE.div_ceil(bv.max(1));
                dst.par_chunks_mut(bv * blocks).zip(src.par_chunks(sv * blocks)).for_each(add);
            } else {
                add((dst, src));
            }
            return;
        }
        let mut view = self.weight.slice_each_axis_mut(|ax| {
            let i = ax.axis.index();
            if i < 2 {
                Slice::from(..)
            } else {
                let (o, st) = (at.offset[i - 2], at.step[i - 2]);
                Slice::new(o as isize, Some((o + (k[i - 2] - 1) * st + 1) as isize), st as isize)
            }
        });
        view += &small.weight;
    }

    /// Reference: compute the convolution directly on `x` (`[N, C, spatial...]`), loop by loop.
    pub fn apply(&self, x: &ArrayD<f64>) -> ArrayD<f64> {
        let r = self.rank();
        let (n, o) = (x.shape()[0], self.out_channels());
        let cg = self.weight.shape()[1];
        let og = o / self.groups;
        let len: Vec<i64> = (0..r).map(|a| x.shape()[2 + a] as i64 - self.crop_begin[a] - self.crop_end[a]).collect();
        let out: Vec<usize> = (0..r)
            .map(|a| {
                let span = len[a] + self.pads_begin[a] + self.pads_end[a]
                    - self.dilations[a] as i64 * (self.kernel()[a] as i64 - 1)
                    - 1;
                (span.div_euclid(self.strides[a] as i64) + 1).max(0) as usize
            })
            .collect();
        let mut shape = vec![n, o];
        shape.extend(&out);
        let mut y = ArrayD::zeros(IxDyn(&shape));
        let kernel = self.kernel().to_vec();
        for idx in ndarray::indices(IxDyn(&shape)) {
            let idx = idx.slice().to_vec();
            let (b, oc) = (idx[0], idx[1]);
            let g = oc / og;
            let mut acc = self.bias[oc];
            for c in 0..cg {
                for t in ndarray::indices(IxDyn(&kernel)) {
                    let t = t.slice();
                    let mut xi = vec![b, g * cg + c];
                    let mut inside = true;
                    for a in 0..r {
                        let q = idx[2 + a] as i64 * self.strides[a] as i64 - self.pads_begin[a]
                            + t[a] as i64 * self.dilations[a] as i64;
                        if q < 0 || q >= len[a] {
                            inside = false;
                            break;
                        }
                        xi.push((q + self.crop_begin[a]) as usize);
                    }
                    if inside {
                        let mut wi = vec![oc, c];
                        wi.extend_from_slice(t);
                        acc += self.weight[IxDyn(&wi)] * x[IxDyn(&xi)];
                    }
                }
            }
            y[IxDyn(&idx)] = acc;
        }
        y
    }
}
