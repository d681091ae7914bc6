//! The generator: ResNets (ACNet, fused, baseline; inline or external data) and the block chain.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Style {
    /// BN folded at export: every conv (every ACB branch) is a Conv with bias.
    Folded,
    /// BatchNormalization (inference) after every conv, convs without bias.
    Bn,
}

impl Style {
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Style::Folded => "fold",
            Style::Bn => "bn",
        }
    }
    pub(crate) fn label(self) -> &'static str {
        match self {
            Style::Folded => "BN folded",
            Style::Bn => "BN nodes",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    ResNet50,
    ResNet152,
    /// ResNet-152 with every bottleneck 3x as wide (~2.8 GB with ACBs), input 64x64.
    ResNet152x3,
}

impl Arch {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::ResNet50 => "resnet50",
            Arch::ResNet152 => "resnet152",
            Arch::ResNet152x3 => "resnet152x3",
        }
    }
    pub(crate) fn label(self) -> &'static str {
        match self {
            Arch::ResNet50 => "ResNet-50",
            Arch::ResNet152 => "ResNet-152",
            Arch::ResNet152x3 => "ResNet-152 3x width",
        }
    }
    pub(crate) fn blocks(self) -> [usize; 4] {
        match self {
            Arch::ResNet50 => [3, 4, 6, 3],
            Arch::ResNet152 | Arch::ResNet152x3 => [3, 8, 36, 3],
        }
    }
    pub(crate) fn width(self) -> usize {
        if self == Arch::ResNet152x3 {
            3
        } else {
            1
        }
    }
    /// The input's side (declared 1x3xSxS): what the check and the plain inferences run.
    pub(crate) fn side(self) -> usize {
        if self == Arch::ResNet152x3 {
            64
        } else {
            224
        }
    }
    pub(crate) fn big(self) -> bool {
        self == Arch::ResNet152x3
    }
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(v.len() * 4);
    for x in v {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    raw
}

pub(crate) fn f32_tensor(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(Bytes::from(f32_bytes(v))),
        ..Default::default()
    }
}

/// Weights written straight to an external data file as they are generated (the big model is
/// never held in memory).
pub(crate) struct ExtSink {
    pub(crate) file: BufWriter<File>,
    pub(crate) location: String,
    pub(crate) offset: u64,
}

impl ExtSink {
    pub(crate) fn tensor(&mut self, name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
        let raw = f32_bytes(v);
        self.file.write_all(&raw).expect("write the generated data file");
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        let t = TensorProto {
            name: Some(name.into()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Float as i32),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", self.offset.to_string()),
                entry("length", raw.len().to_string()),
            ],
            ..Default::default()
        };
        self.offset += raw.len() as u64;
        t
    }
}

/// Builds one model. `acb = false` gives the plain baseline (one 3x3 conv per block, BN folded).
pub(crate) struct Gen<'a> {
    pub(crate) rng: StdRng,
    pub(crate) style: Style,
    pub(crate) acb: bool,
    pub(crate) nodes: Vec<NodeProto>,
    pub(crate) inits: Vec<TensorProto>,
    /// when set, tensors of 1 KiB or more go to this data file
    pub(crate) sink: Option<&'a mut ExtSink>,
}

impl Gen<'_> {
    pub(crate) fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(lo..hi)).collect()
    }

    pub(crate) fn node(&mut self, op: &str, name: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        let out = format!("{name}_output_0");
        self.nodes.push(NodeProto {
            name: Some(name.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute,
            ..Default::default()
        });
        out
    }

    pub(crate) fn init(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        let t = match self.sink.as_deref_mut() {
            Some(sink) if v.len() * 4 >= 1024 => sink.tensor(name, dims, v),
            _ => f32_tensor(name, dims, v),
        };
        self.inits.push(t);
        name.to_string()
    }

    /// A conv with its own (inference) BatchNormalization: emitted as Conv + BN, or with the BN
    /// folded into a Conv with bias. `gamma` is the range of the BN scales. Returns its output.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_bn(
        &mut self,
        p: &str,
        x: &str,
        cin: usize,
        cout: usize,
        k: [usize; 2],
        stride: usize,
        pads: [i64; 4],
        gamma: (f32, f32),
    ) -> String {
        let fan_in = cin * k[0] * k[1];
        let a = (6.0 / fan_in as f32).sqrt(); // He-uniform
        let mut w = self.uniform(cout * fan_in, -a, a);
        let g = self.uniform(cout, gamma.0, gamma.1);
        let beta = self.uniform(cout, -0.1, 0.1);
        let mean = self.uniform(cout, -0.1, 0.1);
        let var = self.uniform(cout, 0.5, 1.5);
        let eps = 1e-5f32;
        let node = format!("/{}", p.replace('.', "/"));
        let attrs = vec![
            attr_ints("kernel_shape", &[k[0] as i64, k[1] as i64]),
            attr_ints("pads", &pads),
            attr_ints("strides", &[stride as i64, stride as i64]),
            attr_ints("dilations", &[1, 1]),
            attr_int("group", 1),
        ];
        let wdims = [cout, cin, k[0], k[1]];
        match self.style {
            Style::Folded => {
                let mut b = vec![0f32; cout];
                for o in 0..cout {
                    let s = g[o] as f64 / (var[o] as f64 + eps as f64).sqrt();
                    for v in &mut w[o * fan_in..(o + 1) * fan_in] {
                        *v = (*v as f64 * s) as f32;
                    }
                    b[o] = (beta[o] as f64 - mean[o] as f64 * s) as f32;
                }
                let wn = self.init(&format!("{p}.weight"), &wdims, &w);
                let bn = self.init(&format!("{p}.bias"), &[cout], &b);
                self.node("Conv", &format!("{node}/Conv"), &[x, &wn, &bn], attrs)
            }
            Style::Bn => {
                let wn = self.init(&format!("{p}.weight"), &wdims, &w);
                let y = self.node("Conv", &format!("{node}/Conv"), &[x, &wn], attrs);
                let sn = self.init(&format!("{p}.bn.weight"), &[cout], &g);
                let bn = self.init(&format!("{p}.bn.bias"), &[cout], &beta);
                let mn = self.init(&format!("{p}.bn.running_mean"), &[cout], &mean);
                let vn = self.init(&format!("{p}.bn.running_var"), &[cout], &var);
                self.node(
                    "BatchNormalization",
                    &format!("{node}/BatchNormalization"),
                    &[&y, &sn, &bn, &mn, &vn],
                    vec![attr_float("epsilon", eps), attr_float("momentum", 0.9)],
                )
            }
        }
    }

    /// The block's 3x3 conv: an ACB (3x3 + 3x1 + 1x3, each with its BN, summed) or, for the
    /// baseline, one 3x3 conv.
    pub(crate) fn conv3x3(&mut self, p: &str, x: &str, cin: usize, cout: usize, stride: usize) -> String {
        let g = (0.5, 1.5);
        if !self.acb {
            return self.conv_bn(p, x, cin, cout, [3, 3], stride, [1, 1, 1, 1], g);
        }
        // three branches of one conv: keep the sum's scale near a single conv's
        let g3 = (0.3, 0.9);
        let sq = self.conv_bn(&format!("{p}.square"), x, cin, cout, [3, 3], stride, [1, 1, 1, 1], g3);
        let ver = self.conv_bn(&format!("{p}.ver"), x, cin, cout, [3, 1], stride, [1, 0, 1, 0], g3);
        let hor = self.conv_bn(&format!("{p}.hor"), x, cin, cout, [1, 3], stride, [0, 1, 0, 1], g3);
        let node = format!("/{}", p.replace('.', "/"));
        let s = self.node("Add", &format!("{node}/Add"), &[&sq, &ver], vec![]);
        self.node("Add", &format!("{node}/Add_1"), &[&s, &hor], vec![])
    }

    pub(crate) fn relu(&mut self, p: &str, x: &str) -> String {
        self.node("Relu", &format!("/{}/Relu", p.replace('.', "/")), &[x], vec![])
    }
}

/// `v` with its first dimension the symbol `batch`, as `torch.onnx.export(..., dynamic_axes=
/// {"input": {0: "batch"}, ...})` declares it: the check may then run its samples as one batch.
pub(crate) fn batch_axis(mut v: ValueInfoProto) -> ValueInfoProto {
    use acnet_onnx::proto::{tensor_shape_proto::dimension::Value, type_proto};
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(d) = t.shape.as_mut().and_then(|s| s.dim.first_mut()) {
            d.value = Some(Value::DimParam("batch".into()));
        }
    }
    v
}

pub(crate) fn model_proto(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        producer_name: Some("acnet-onnx-bench".into()),
        producer_version: Some(GEN_VERSION.to_string()),
        graph: Some(graph),
        ..Default::default()
    }
}

/// A ResNet (v1.5, torchvision layout) of bottleneck blocks, `arch.width()` times as wide
/// (the stem stays 64 channels, as torchvision's wide ResNets).
pub(crate) fn resnet(arch: Arch, style: Style, acb: bool, seed: u64, sink: Option<&mut ExtSink>) -> ModelProto {
    let mut g = Gen { rng: StdRng::seed_from_u64(seed), style, acb, nodes: vec![], inits: vec![], sink };
    let x = g.conv_bn("conv1", "input", 3, 64, [7, 7], 2, [3, 3, 3, 3], (0.5, 1.5));
    let x = g.relu("conv1", &x);
    let mut x = g.node(
        "MaxPool",
        "/maxpool/MaxPool",
        &[&x],
        vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1]), attr_ints("strides", &[2, 2])],
    );
    let mut cin = 64;
    for (li, (&n, width)) in arch.blocks().iter().zip([64usize, 128, 256, 512]).enumerate() {
        let width = width * arch.width();
        for bi in 0..n {
            let p = format!("layer{}.{}", li + 1, bi);
            let stride = if bi == 0 && li > 0 { 2 } else { 1 };
            let cout = width * 4;
            let y = g.conv_bn(&format!("{p}.conv1"), &x, cin, width, [1, 1], 1, [0, 0, 0, 0], (0.5, 1.5));
            let y = g.relu(&format!("{p}.conv1"), &y);
            let y = g.conv3x3(&format!("{p}.conv2"), &y, width, width, stride);
            let y = g.relu(&format!("{p}.conv2"), &y);
            // small scales on the last BN of a block keep the residual stream bounded
            let y = g.conv_bn(&format!("{p}.conv3"), &y, width, cout, [1, 1], 1, [0, 0, 0, 0], (0.05, 0.25));
            let short = if bi == 0 {
                g.conv_bn(&format!("{p}.downsample"), &x, cin, cout, [1, 1], stride, [0, 0, 0, 0], (0.5, 1.5))
            } else {
                x.clone()
            };
            let s = g.node("Add", &format!("/{}/Add", p.replace('.', "/")), &[&y, &short], vec![]);
            x = g.relu(&p, &s);
            cin = cout;
        }
    }
    let x = g.node("GlobalAveragePool", "/avgpool/GlobalAveragePool", &[&x], vec![]);
    let x = g.node("Flatten", "/Flatten", &[&x], vec![attr_int("axis", 1)]);
    let a = 1.0 / (cin as f32).sqrt();
    let w = g.uniform(1000 * cin, -a, a);
    let b = g.uniform(1000, -0.1, 0.1);
    let wn = g.init("fc.weight", &[1000, cin], &w);
    let bn = g.init("fc.bias", &[1000], &b);
    g.nodes.push(NodeProto {
        name: Some("/fc/Gemm".into()),
        op_type: Some("Gemm".into()),
        input: vec![x, wn, bn],
        output: vec!["output".into()],
        attribute: vec![attr_float("alpha", 1.0), attr_float("beta", 1.0), attr_int("transB", 1)],
        ..Default::default()
    });
    let side = arch.side() as i64;
    model_proto(GraphProto {
        name: Some(format!("{}_{}", arch.name(), if acb { "acnet" } else { "baseline" })),
        node: g.nodes,
        initializer: g.inits,
        input: vec![batch_axis(tensor_info("input", DataType::Float, &[1, 3, side, side]))],
        output: vec![batch_axis(tensor_info("output", DataType::Float, &[1, 1000]))],
        ..Default::default()
    })
}

/// A chain of `n` tiny ACNet blocks: 4 channels, 8x8; per block a 3x3, a 3x1 and a 1x3 conv with
/// bias, `Add(Add(sq, ver), hor)`, then a Relu.
pub(crate) fn chain(n: usize, seed: u64) -> ModelProto {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        style: Style::Folded,
        acb: true,
        nodes: vec![],
        inits: vec![],
        sink: None,
    };
    let c = 4;
    let mut x = "input".to_string();
    for i in 0..n {
        let p = format!("blocks.{i}");
        let branch = |g: &mut Gen, b: &str, k: [usize; 2], pads: [i64; 4]| {
            let fan_in = c * k[0] * k[1];
            let a = 0.5 * (6.0 / fan_in as f32).sqrt();
            let w = g.uniform(c * fan_in, -a, a);
            let bias = g.uniform(c, -0.1, 0.1);
            let wn = g.init(&format!("{p}.{b}.weight"), &[c, c, k[0], k[1]], &w);
            let bn = g.init(&format!("{p}.{b}.bias"), &[c], &bias);
            let attrs = vec![
                attr_ints("kernel_shape", &[k[0] as i64, k[1] as i64]),
                attr_ints("pads", &pads),
                attr_ints("strides", &[1, 1]),
                attr_ints("dilations", &[1, 1]),
                attr_int("group", 1),
            ];
            g.node("Conv", &format!("/blocks.{i}/{b}/Conv"), &[&x, &wn, &bn], attrs)
        };
        let sq = branch(&mut g, "square", [3, 3], [1, 1, 1, 1]);
        let ver = branch(&mut g, "ver", [3, 1], [1, 0, 1, 0]);
        let hor = branch(&mut g, "hor", [1, 3], [0, 1, 0, 1]);
        let s = g.node("Add", &format!("/blocks.{i}/Add"), &[&sq, &ver], vec![]);
        let s = g.node("Add", &format!("/blocks.{i}/Add_1"), &[&s, &hor], vec![]);
        x = g.relu(&format!("blocks.{i}"), &s);
    }
    if let Some(last) = g.nodes.last_mut() {
        last.output[0] = "output".into();
    }
    model_proto(GraphProto {
        name: Some(format!("acnet_chain_{n}")),
        node: g.nodes,
        initializer: g.inits,
        input: vec![tensor_info("input", DataType::Float, &[1, c as i64, 8, 8])],
        output: vec![tensor_info("output", DataType::Float, &[1, c as i64, 8, 8])],
        ..Default::default()
    })
}

/// One ACNet model file the bench measures.
#[derive(Clone, Debug)]
pub(crate) struct Variant {
    pub(crate) arch: Arch,
    pub(crate) style: Style,
    pub(crate) external: bool,
    pub(crate) path: PathBuf,
}

impl Variant {
    pub(crate) fn tag(&self) -> String {
        format!("{}-{}-{}", self.arch.name(), self.style.tag(), if self.external { "ext" } else { "inline" })
    }
    pub(crate) fn weights(&self) -> &'static str {
        if self.external {
            "external"
        } else {
            "inline"
        }
    }
}

/// The generated files of one architecture.
pub(crate) struct Models {
    pub(crate) acnet: Vec<Variant>,
    /// the plain network (none for the big model)
    pub(crate) baseline: Option<PathBuf>,
}

pub(crate) fn model_path(dir: &Path, arch: Arch, what: &str, external: bool) -> PathBuf {
    dir.join(format!("{}-{what}-{}.onnx", arch.name(), if external { "ext" } else { "inline" }))
}

pub(crate) fn regen() -> bool {
    std::env::var("ACNET_BENCH_REGEN").is_ok_and(|v| v == "1")
}

/// Whether files generated earlier under `stamp` (with the contents `want`) can be reused.
pub(crate) fn cached(stamp: &Path, want: &str, files: &[&Path]) -> bool {
    !regen() && std::fs::read_to_string(stamp).is_ok_and(|s| s == want) && files.iter().all(|p| p.is_file())
}

pub(crate) fn generate(dir: &Path, arch: Arch) -> Models {
    if arch.big() {
        return generate_big(dir);
    }
    let stamp = dir.join(format!("{}.stamp", arch.name()));
    let want = format!("gen {GEN_VERSION} seed {SEED}\n");
    let mut models = Models { acnet: vec![], baseline: Some(model_path(dir, arch, "baseline", false)) };
    for style in [Style::Folded, Style::Bn] {
        for external in [false, true] {
            let path = model_path(dir, arch, &format!("acnet-{}", style.tag()), external);
            models.acnet.push(Variant { arch, style, external, path });
        }
    }
    let files: Vec<&Path> = models.acnet.iter().map(|m| m.path.as_path()).chain(models.baseline.as_deref()).collect();
    if cached(&stamp, &want, &files) {
        eprintln!("[{}] using the models generated earlier in {}", arch.label(), dir.display());
        return models;
    }
    let _ = std::fs::remove_file(&stamp);
    for (i, style) in [Style::Folded, Style::Bn].into_iter().enumerate() {
        let t = Instant::now();
        let m = Model::from_proto(resnet(arch, style, true, SEED + i as u64, None)).unwrap();
        for external in [false, true] {
            let path = model_path(dir, arch, &format!("acnet-{}", style.tag()), external);
            save(&m, &path, if external { DataMode::External } else { DataMode::Inline })
                .expect("save a generated model");
        }
        eprintln!("[{}] generated ACNet ({}) in {:.1} s", arch.label(), style.tag(), t.elapsed().as_secs_f64());
    }
    let m = Model::from_proto(resnet(arch, Style::Folded, false, SEED + 7, None)).unwrap();
    save(&m, models.baseline.as_ref().unwrap(), DataMode::Inline).expect("save the baseline");
    std::fs::write(&stamp, want).unwrap();
    models
}

/// The 3x-width ResNet-152 ACNet (BN nodes, external data), written streaming: every weight goes
/// to the data file as it is drawn, only the graph is held in memory.
pub(crate) fn generate_big(dir: &Path) -> Models {
    let arch = Arch::ResNet152x3;
    let stamp = dir.join(format!("{}.stamp", arch.name()));
    let want = format!("big {BIG_VERSION} seed {SEED}\n");
    let path = model_path(dir, arch, "acnet-bn", true);
    let data = data_file(&path);
    let models =
        Models { acnet: vec![Variant { arch, style: Style::Bn, external: true, path: path.clone() }], baseline: None };
    if cached(&stamp, &want, &[&path, &data]) {
        eprintln!("[{}] using the model generated earlier in {}", arch.label(), dir.display());
        return models;
    }
    let _ = std::fs::remove_file(&stamp);
    let t = Instant::now();
    let location = data.file_name().unwrap().to_string_lossy().into_owned();
    let mut sink = ExtSink {
        file: BufWriter::with_capacity(8 << 20, File::create(&data).expect("create the data file")),
        location,
        offset: 0,
    };
    let proto = resnet(arch, Style::Bn, true, SEED + 11, Some(&mut sink));
    let file = sink.file.into_inner().expect("flush the data file");
    file.sync_all().unwrap();
    std::fs::write(&path, proto.encode_to_vec()).expect("write the generated model");
    File::open(&path).unwrap().sync_all().unwrap();
    eprintln!(
        "[{}] generated ACNet (bn, external, {} MiB) in {:.1} s",
        arch.label(),
        mib(sink.offset),
        t.elapsed().as_secs_f64()
    );
    std::fs::write(&stamp, want).unwrap();
    models
}

pub(crate) fn generate_chain(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join(format!("chain-{n}.onnx"));
    let stamp = dir.join(format!("chain-{n}.stamp"));
    let want = format!("chain {CHAIN_VERSION} seed {SEED}\n");
    if cached(&stamp, &want, &[&path]) {
        return path;
    }
    let _ = std::fs::remove_file(&stamp);
    std::fs::write(&path, chain(n, SEED + n as u64).encode_to_vec()).expect("write the chain model");
    std::fs::write(&stamp, want).unwrap();
    path
}
