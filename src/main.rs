fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut m = acnet_onnx::Model::load(&args[0]).unwrap();
    let r = acnet_onnx::fuse::fuse(&mut m).unwrap();
    println!("{}", r.summary());
    for n in &m.proto.graph.as_ref().unwrap().node { if args.len()>1 && (n.name().contains(&args[1]) || n.output.iter().any(|o| o.contains(&args[1]))) || n.op_type()=="BatchNormalization" { println!("{} {} {:?} {:?}", n.op_type(), n.name(), n.input, n.output); } }
}
