//! The block description (what proptest prints for a failing case).

/// A Conv's `auto_pad`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum AutoPad {
    SameUpper,
    SameLower,
    Valid,
}

/// One conv branch's geometry, as written in the graph.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Geo {
    pub(crate) kernel: Vec<usize>,
    pub(crate) strides: Vec<usize>,
    pub(crate) dilations: Vec<usize>,
    /// the Conv's `pads` (begin per axis, then end per axis), >= 0; ignored under `auto_pad`
    pub(crate) pads: Vec<i64>,
    /// written instead of `pads` (chosen only where it means the same pads)
    pub(crate) auto_pad: Option<AutoPad>,
    /// a Slice before the conv (after the Pad, if both): crop (begin, end) per axis, >= 0
    pub(crate) crop: Option<(Vec<i64>, Vec<i64>)>,
    /// a zero Pad before the conv: (begin, end) per axis, negative values crop
    pub(crate) pad: Option<(Vec<i64>, Vec<i64>)>,
    pub(crate) groups: usize,
    pub(crate) out: usize,
}

#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // a handful of test values
pub(crate) enum Kind {
    Conv(Geo),
    /// x itself
    Identity,
    /// BatchNormalization(x)
    IdentityBn,
}

/// Shape of a constant operand (scale or bias) of a branch of `o` channels and rank r:
/// `[]`, `[1]`, `[o, 1...]` (rank r+1), `[1, o, 1...]` (rank r+2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Form {
    Scalar,
    One,
    Chan,
    BatchChan,
}

/// How a constant operand is written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Src {
    Initializer,
    /// a `Constant` node
    ConstantNode,
    /// `Reshape` of a 1-d initializer (per-channel forms only)
    Reshape,
    /// `Unsqueeze` of a 1-d initializer (per-channel forms only)
    Unsqueeze,
}

/// A constant operand of a Mul (scale) or of the sum (bias).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Operand {
    pub(crate) form: Form,
    pub(crate) src: Src,
    /// the constant is the Mul's first input
    pub(crate) first: bool,
}

/// A BatchNormalization's epsilon and whether `training_mode = 0` is written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BnStyle {
    pub(crate) epsilon: f32,
    pub(crate) training_attr: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Branch {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    /// conv bias input
    pub(crate) bias: bool,
    /// BatchNormalization after the conv (for IdentityBn: the style of its BN)
    pub(crate) bn: Option<BnStyle>,
    /// `Mul` by a constant
    pub(crate) scale: Option<Operand>,
    /// reads the weight initializer of this (earlier) branch
    pub(crate) share_weight: Option<usize>,
}

/// Leaves index `Block::branches`, then the constant bias (index `branches.len()`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tree {
    Leaf(usize),
    Add(Box<Tree>, Box<Tree>),
    Sum(Vec<Tree>),
}

/// What computes the block's input x from the graph input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Pre {
    /// x is the graph input
    None,
    Relu,
    /// a per-channel constant Mul
    Mul,
    /// a 1x1 Conv (cin -> cin), without / with a BatchNormalization after it
    Conv,
    ConvBn,
    /// a BatchNormalization
    Bn,
}

#[derive(Clone, Debug)]
pub(crate) struct Block {
    /// weights, BN parameters, the test input
    pub(crate) seed: u64,
    pub(crate) opset: i64,
    /// the big kernel (every axis)
    pub(crate) k: usize,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    /// spatial input size
    pub(crate) input: Vec<usize>,
    pub(crate) branches: Vec<Branch>,
    pub(crate) const_bias: Option<Operand>,
    pub(crate) tree: Tree,
    pub(crate) bn_after: Option<BnStyle>,
    /// float64 model (input, weights); else float32
    pub(crate) f64: bool,
    /// what x is computed from
    pub(crate) pre: Pre,
    /// a Conv outside the block reads x and the first branch's weight (graph output `z`)
    pub(crate) bystander: bool,
    /// no `kernel_shape` attributes (inferred from the weights)
    pub(crate) omit_kernel_shape: bool,
    /// nodes in a random topological order (seed), else branch by branch, then the sum
    pub(crate) shuffle: Option<u64>,
    /// write default attributes (strides 1, zero pads, group 1) explicitly
    pub(crate) explicit_defaults: bool,
    /// Slice axes counted from the end / with explicit steps
    pub(crate) slice_negative_axes: bool,
    pub(crate) slice_steps: bool,
    /// mutations applied (misaligned property), for the report
    pub(crate) mutations: Vec<String>,
}

impl Block {
    /// The fields a hand-written block leaves as plain as they get (opset 17, float32, x the graph
    /// input, no constant bias, no BN after the sum, no bystander, nodes in order, default
    /// attributes left out): `Block { k, cin, cout, input, branches, tree, ..Block::plain() }`.
    pub(crate) fn plain() -> Block {
        Block {
            seed: 0,
            opset: 17,
            k: 1,
            cin: 1,
            cout: 1,
            input: vec![],
            branches: vec![],
            const_bias: None,
            tree: Tree::Sum(vec![]),
            bn_after: None,
            f64: false,
            pre: Pre::None,
            bystander: false,
            omit_kernel_shape: false,
            shuffle: None,
            explicit_defaults: false,
            slice_negative_axes: false,
            slice_steps: false,
            mutations: vec![],
        }
    }

    pub(crate) fn rank(&self) -> usize {
        self.input.len()
    }
}
