//! Every tensor stored in a model: the graph's initializers, sparse initializers' parts, tensor
//! attributes of nodes (Constant values and the like), the same in subgraphs, in training-info
//! graphs, and in local functions (their nodes and attribute defaults).

use crate::error::Result;
use crate::proto::{AttributeProto, GraphProto, ModelProto, SparseTensorProto, TensorProto};

/// One walker per mutability: `$ref` is `&'a` or `&mut`, `$iter` the matching `iter`/`iter_mut`.
macro_rules! walkers {
    ($model:ident, $graph:ident, $attr:ident, $sparse:ident, ($($r:tt)+), $iter:ident, $($lt:lifetime)?) => {
        /// Call `f` on every tensor stored in the model (see the module docs).
        pub(crate) fn $model<$($lt)?>(m: $($r)+ ModelProto, f: &mut dyn FnMut($($r)+ TensorProto) -> Result<()>) -> Result<()> {
            if let Some(g) = m.graph.$iter().next() {
                $graph(g, f)?;
            }
            for ti in m.training_info.$iter() {
                for g in ti.initialization.$iter().chain(ti.algorithm.$iter()) {
                    $graph(g, f)?;
                }
            }
            for func in m.functions.$iter() {
                for a in func.attribute_proto.$iter() {
                    $attr(a, f)?;
                }
                for n in func.node.$iter() {
                    for a in n.attribute.$iter() {
                        $attr(a, f)?;
                    }
                }
            }
            Ok(())
        }

        fn $sparse<$($lt)?>(s: $($r)+ SparseTensorProto, f: &mut dyn FnMut($($r)+ TensorProto) -> Result<()>) -> Result<()> {
            for t in s.values.$iter().chain(s.indices.$iter()) {
                f(t)?;
            }
            Ok(())
        }

        fn $attr<$($lt)?>(a: $($r)+ AttributeProto, f: &mut dyn FnMut($($r)+ TensorProto) -> Result<()>) -> Result<()> {
            for t in a.t.$iter().chain(a.tensors.$iter()) {
                f(t)?;
            }
            for s in a.sparse_tensor.$iter().chain(a.sparse_tensors.$iter()) {
                $sparse(s, f)?;
            }
            for sg in a.g.$iter().chain(a.graphs.$iter()) {
                $graph(sg, f)?;
            }
            Ok(())
        }

        /// Every tensor stored in a graph and its subgraphs.
        fn $graph<$($lt)?>(g: $($r)+ GraphProto, f: &mut dyn FnMut($($r)+ TensorProto) -> Result<()>) -> Result<()> {
            for t in g.initializer.$iter() {
                f(t)?;
            }
            for s in g.sparse_initializer.$iter() {
                $sparse(s, f)?;
            }
            for n in g.node.$iter() {
                for a in n.attribute.$iter() {
                    $attr(a, f)?;
                }
            }
            Ok(())
        }
    };
}

walkers!(for_each_tensor, graph_tensors, attr_tensors, sparse_parts, (&'a), iter, 'a);
walkers!(for_each_tensor_mut, graph_tensors_mut, attr_tensors_mut, sparse_parts_mut, (&mut), iter_mut,);
