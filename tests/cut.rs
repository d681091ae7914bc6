//! Models holding a node tract cannot run (issue 26): the check cuts both models at it and checks
//! every part between the cuts as a model of its own; the cut node must be the same in both.
//! Real exports (fixtures/cut_qarepvgg, fixtures/cut_resnet20: a custom-domain `Decode` inserted
//! by fixtures/gen_cut.py at the end, between two blocks, first, and with a symbolic shape).

use acnet_onnx::verify::{verify, VerifyOptions, VerifyReport};
use acnet_onnx::{fuse, fuse_file, save, DataMode, FuseOptions, Model};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(set: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(set).join(file)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_acnet-onnx")).args(args).output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `model` fused in memory (the rewrite as `fuse` makes it), then changed by `edit`, saved inline.
fn fused_and_edited(model: &Path, out: &Path, edit: impl FnOnce(&mut Model)) {
    let mut m = Model::load(model).unwrap();
    let r = fuse(&mut m).unwrap();
    assert!(r.blocks_merged > 0, "{}", r.summary());
    edit(&mut m);
    save(&m, out, DataMode::Inline).unwrap();
}

/// Adds `delta` to the first weight of the Conv named `conv`.
fn nudge_conv(m: &mut Model, conv: &str, delta: f32) {
    let g = m.proto.graph.as_mut().unwrap();
    let w = g.node.iter().find(|n| n.name() == conv).unwrap_or_else(|| panic!("no Conv {conv}")).input[1].clone();
    let t = g.initializer.iter_mut().find(|t| t.name() == w).unwrap();
    match &mut t.raw_data {
        Some(raw) => {
            let mut v = raw.to_vec();
            let x = f32::from_le_bytes(v[..4].try_into().unwrap()) + delta;
            v[..4].copy_from_slice(&x.to_le_bytes());
            *raw = v.into();
        }
        None => t.float_data[0] += delta,
    }
}

/// The part (by index) and its report.
fn part(r: &VerifyReport, k: usize) -> &acnet_onnx::verify::PartReport {
    &r.parts.as_ref().unwrap_or_else(|| panic!("not cut:\n{}", r.table()))[k]
}

/// What a part reads and what it compares, by name.
type Part<'a> = (&'a [&'a str], &'a [&'a str]);
/// A change to a node.
type Edit = fn(&mut acnet_onnx::proto::NodeProto);

/// The one cut of the fixtures: Decode, the same in both models.
fn assert_decode_cut(r: &VerifyReport) {
    let cuts = r.cuts.as_ref().unwrap();
    assert_eq!(cuts.len(), 1, "{}", r.table());
    let c = &cuts[0];
    assert_eq!((c.node.as_str(), c.op.as_str(), c.domain.as_str()), ("vendor_decode", "Decode", "com.example.vendor"));
    assert!(c.why.contains("domain `com.example.vendor`"), "{}", c.why);
    assert_eq!(c.problem, None, "{}", r.table());
}

/// `fuse` of every fixture writes the rewrite checked around the cut (exit 0, no warning): every
/// part ran and passed, the graph output Decode writes is named in a note, the cut tensors are
/// fed as the report says; PyTorch's own deploy model passes `verify` against the export too.
#[test]
fn case_a_correct_fusion_around_the_cut_passes_fuse_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let decoded = "/b2/nonlinearity/Relu_output_0_decoded";
    // (set, export, deploy to verify against, parts: (reads, compares) each)
    let cases: &[(&str, &str, Option<&str>, &[Part])] = &[
        ("cut_qarepvgg", "end_ts_fold", Some("end_deploy"), &[(&["input"], &["logits"])]),
        ("cut_qarepvgg", "first_ts_fold", Some("first_deploy"), &[(&["input_decoded"], &["output"])]),
        (
            "cut_qarepvgg",
            "mid_ts_fold",
            Some("mid_deploy"),
            &[(&["input"], &["/b2/nonlinearity/Relu_output_0"]), (&[decoded], &["output"])],
        ),
        ("cut_qarepvgg", "mid_dynamo_ext", None, &[(&["input"], &["relu_1"]), (&["relu_1_decoded"], &["output"])]),
        (
            "cut_qarepvgg",
            "sym_ts_dynbatch",
            None,
            &[(&["input"], &["/b2/nonlinearity/Relu_output_0"]), (&[decoded], &["output"])],
        ),
        (
            "cut_resnet20",
            "mid_ts_fold",
            Some("mid_deploy"),
            &[
                (
                    &["input"],
                    &["/layers/layers.2/relu2/Relu_output_0", "/layers/layers.3/shortcut/shortcut.0/Conv_output_0"],
                ),
                (
                    &[
                        "/layers/layers.2/relu2/Relu_output_0_decoded",
                        "/layers/layers.3/shortcut/shortcut.0/Conv_output_0",
                    ],
                    &["output"],
                ),
            ],
        ),
    ];
    for &(set, export, deploy, parts) in cases {
        let what = format!("{set}/{export}");
        let input = fixture(set, &format!("{export}.onnx"));
        let out = dir.path().join(format!("{set}_{export}.onnx"));
        let f = fuse_file(&input, &out, &FuseOptions::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let r = f.check.as_ref().unwrap();
        assert_eq!((f.exit_code(), r.passed, r.checked), (0, true, true), "{what}:\n{}", r.table());
        assert!(f.warnings.is_empty(), "{what}: {:?}", f.warnings);
        assert!(f.fuse.blocks_merged >= 4, "{what}: {}", f.fuse.summary());
        assert_decode_cut(r);
        let reports = r.parts.as_ref().unwrap();
        assert_eq!(reports.len(), parts.len(), "{what}:\n{}", r.table());
        for (p, (reads, compares)) in reports.iter().zip(parts) {
            let names: Vec<&str> = p.inputs.iter().map(|i| i.name.as_str()).collect();
            assert_eq!(
                (&names[..], &p.outputs[..]),
                (*reads, &compares.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..]),
                "{what}"
            );
            assert_eq!((p.checked, p.passed), (true, Some(true)), "{what}:\n{}", r.table());
            assert!(p.nodes > p.candidate_nodes, "{what}: part {} not rewritten", p.index);
            for i in p.inputs.iter().filter(|i| i.name != "input") {
                assert!(i.source.starts_with("random normal (seed 0), cut: "), "{what}: {}", i.source);
            }
        }
        // every compared tensor ran: a real difference, measured against a real noise
        for o in &r.outputs {
            assert!(o.max_abs_reference > 0.1 && o.noise.unwrap() > 0.0 && o.ratio.unwrap() < 10.0, "{what}: {o:?}");
        }
        if export.starts_with("end") {
            assert!(r.notes.iter().any(|n| n.contains("`output` is written by Decode")), "{what}: {:?}", r.notes);
        }
        // the rewrite left Decode as it was, and wrote the model
        let written = Model::load(&out).unwrap();
        assert!(written.graph().node.iter().any(|n| n.op_type() == "Decode" && n.domain() == "com.example.vendor"));
        if let Some(deploy) = deploy {
            let r = verify(&input, &fixture(set, &format!("{deploy}.onnx")), &VerifyOptions::default()).unwrap();
            assert_eq!((r.exit_code(), r.checked), (0, true), "{what} vs PyTorch's deploy:\n{}", r.table());
            assert_decode_cut(&r);
        }
    }
}

/// A cut tensor between the parts is one tensor crossing the cut from the part before it: its
/// values are drawn at the shape tract gave it there, and the part after reads both.
#[test]
fn case_a_tensor_crossing_the_cut_is_fed_at_the_shape_of_the_part_before() {
    let r = verify(
        &fixture("cut_resnet20", "mid_ts_fold.onnx"),
        &fixture("cut_resnet20", "mid_deploy.onnx"),
        &VerifyOptions { samples: 1, ..Default::default() },
    )
    .unwrap();
    let p = part(&r, 1);
    let crossing = p.inputs.iter().find(|i| i.name.contains("shortcut")).unwrap();
    assert_eq!(crossing.shape, vec![1, 16, 16, 16]);
    assert!(crossing.source.ends_with("cut: computed by part 0"), "{}", crossing.source);
    let decoded = &p.inputs[0];
    assert_eq!(decoded.shape, vec![1, 8, 32, 32]);
    assert!(decoded.source.ends_with("cut: written by Decode 'vendor_decode'"), "{}", decoded.source);
    // compared in part 0 at that shape
    let o = r.outputs.iter().find(|o| o.name == crossing.name).unwrap();
    assert_eq!((o.part, &o.shape), (Some(0), &crossing.shape));
}

/// One weight of the fused model wrong before the cut, or after it: `verify` fails (exit 1),
/// the report names the part that fails (the other passes) and the tensor where it goes wrong.
#[test]
fn case_a_wrong_weight_upstream_or_downstream_of_the_cut_fails_naming_its_part() {
    let dir = tempfile::tempdir().unwrap();
    // (set, export, a conv before the cut, one after it)
    let cases = [
        ("cut_resnet20", "mid_ts_fold", "/stem/square_conv/Conv", "/layers/layers.4/conv1/square_conv/Conv"),
        ("cut_qarepvgg", "mid_dynamo_ext", "node_Conv_124", "node_Conv_131"),
    ];
    for (set, export, up, down) in cases {
        let input = fixture(set, &format!("{export}.onnx"));
        for (conv, failing) in [(up, 0), (down, 1)] {
            let what = format!("{set}/{export}, {conv}");
            let bad = dir.path().join(format!("{set}_{export}_{failing}.onnx"));
            fused_and_edited(&input, &bad, |m| nudge_conv(m, conv, 0.5));
            let report = dir.path().join("report.json");
            let run =
                cli(&["verify".as_ref(), input.as_os_str(), bad.as_os_str(), "--report".as_ref(), report.as_os_str()]);
            assert_eq!(run.code, 1, "{what}: {}\n{}", run.stderr, run.stdout);
            assert!(
                run.stdout.contains(&format!("part {failing}: ")) && run.stdout.contains("NOT EQUIVALENT"),
                "{what}: {}",
                run.stdout
            );
            let v = json(&report);
            assert_eq!((&v["passed"], &v["checked"]), (&false.into(), &true.into()), "{what}");
            let parts = v["parts"].as_array().unwrap();
            assert_eq!(parts.len(), 2);
            for (k, p) in parts.iter().enumerate() {
                assert_eq!(p["passed"], (k != failing), "{what}: part {k}: {p}");
            }
            assert!(parts[failing]["ratio"].as_f64().unwrap() > 10.0, "{what}");
            assert!(v["outputs"].as_array().unwrap().iter().all(|o| o["passed"] == (o["part"] != failing)), "{what}");
            // localised inside the part: the Conv changed (the fused block keeps its name)
            let d = &parts[failing]["divergence"];
            assert_eq!((&d["op"], &d["node"]), (&"Conv".into(), &conv.into()), "{what}: {d}");
            assert_eq!(&v["divergence"], d, "{what}");
        }
    }
}

/// Decode as the model's first node: the one part reads Decode's output, not the graph input
/// (which only Decode reads, and both models get the same); a wrong weight still fails.
#[test]
fn case_a_cut_at_the_first_node() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("cut_qarepvgg", "first_ts_fold.onnx");
    let r = verify(&input, &fixture("cut_qarepvgg", "first_deploy.onnx"), &VerifyOptions::default()).unwrap();
    assert!(r.passed, "{}", r.table());
    assert_eq!(r.inputs.len(), 1);
    assert_eq!(r.inputs[0].name, "input");
    let p = part(&r, 0);
    assert_eq!(p.inputs.len(), 1);
    assert_eq!((p.inputs[0].name.as_str(), &p.inputs[0].shape), ("input_decoded", &vec![1, 3, 32, 32]));
    let bad = dir.path().join("bad.onnx");
    fused_and_edited(&input, &bad, |m| nudge_conv(m, "/b1/rbr_dense/conv/Conv", 0.5));
    let r = verify(&input, &bad, &VerifyOptions::default()).unwrap();
    assert_eq!((r.exit_code(), part(&r, 0).passed), (1, Some(false)), "{}", r.table());
}

/// A cut tensor declared `[batch, 16, 32, 32]`, `batch` the graph input's symbolic dim: it takes
/// the value the input takes (1 by default, 2 with --input-shape).
#[test]
fn case_a_cut_tensor_of_symbolic_shape_the_graph_fixes() {
    let input = fixture("cut_qarepvgg", "sym_ts_dynbatch.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fused.onnx");
    for batch in [None, Some(2usize)] {
        let mut opts = FuseOptions::default();
        if let Some(b) = batch {
            opts.check.input_shapes = vec![("input".into(), vec![b, 3, 32, 32])];
        }
        let f = fuse_file(&input, &out, &opts).unwrap();
        let r = f.check.as_ref().unwrap();
        assert_eq!((f.exit_code(), r.checked), (0, true), "{}", r.table());
        let b = batch.unwrap_or(1);
        let cut = &part(r, 1).inputs[0];
        assert_eq!((cut.name.as_str(), &cut.shape), ("/b2/nonlinearity/Relu_output_0_decoded", &vec![b, 16, 32, 32]));
        assert_eq!(r.outputs.iter().find(|o| o.name == "output").unwrap().shape, vec![b, 10]);
    }
}

/// A cut tensor whose size is not known (no value_info, or a symbol no graph input has, and the
/// graph fixes only its channels): the part after the cut cannot run. `fuse` changed that part:
/// nothing written, exit 2, the report (kept) says which tensor and why; `--allow-unchecked`
/// writes it with a warning (exit 0). `verify` of the model against itself passes: the part
/// that did not run is the same in both.
#[test]
fn case_a_cut_tensor_of_unknown_size_leaves_its_part_unchecked_unless_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let decoded = "/b2/nonlinearity/Relu_output_0_decoded";
    // the committed export whose Decode declares nothing, and one declaring `[N, 16, 32, 32]`
    let mut m = Model::load(fixture("cut_qarepvgg", "mid_ts_fold.onnx")).unwrap();
    let v = m.graph_mut().value_info.iter_mut().find(|v| v.name() == decoded).unwrap();
    let Some(acnet_onnx::proto::type_proto::Value::TensorType(t)) = v.r#type.as_mut().unwrap().value.as_mut() else {
        panic!("{v:?}")
    };
    t.shape.as_mut().unwrap().dim[0].value =
        Some(acnet_onnx::proto::tensor_shape_proto::dimension::Value::DimParam("N".into()));
    let unnamed = dir.path().join("unnamed.onnx");
    save(&m, &unnamed, DataMode::Inline).unwrap();
    for (name, input) in [("undeclared", fixture("cut_qarepvgg", "undeclared_ts_fold.onnx")), ("unnamed", unnamed)] {
        let dims = (name == "unnamed").then_some(());
        let out = dir.path().join(format!("{name}_fused.onnx"));
        let report = dir.path().join(format!("{name}.json"));
        let args = |extra: &[&str]| {
            let mut a: Vec<&OsStr> = vec![
                "fuse".as_ref(),
                input.as_os_str(),
                "-o".as_ref(),
                out.as_os_str(),
                "--report".as_ref(),
                report.as_os_str(),
            ];
            a.extend(extra.iter().map(OsStr::new));
            cli(&a)
        };
        let run = args(&[]);
        assert_eq!(run.code, 2, "{name}: {}\n{}", run.stderr, run.stdout);
        assert_eq!(run.stderr.lines().count(), 1, "{name}: {}", run.stderr);
        assert!(
            run.stderr.contains("nothing written") && run.stderr.contains("--allow-unchecked"),
            "{name}: {}",
            run.stderr
        );
        assert!(run.stderr.contains(decoded), "{name}: {}", run.stderr);
        if dims.is_some() {
            assert!(run.stderr.contains("`N`, named like no dim of a graph input"), "{name}: {}", run.stderr);
        } else {
            assert!(run.stderr.contains("dims 0, 2, 3 of cut tensor"), "{name}: {}", run.stderr);
        }
        assert!(run.stdout.contains("NOT CHECKED"), "{name}: {}", run.stdout);
        assert!(!out.exists());
        let v = json(&report);
        assert_eq!((&v["passed"], &v["checked"]), (&false.into(), &false.into()), "{name}");
        let parts = v["parts"].as_array().unwrap();
        assert_eq!((&parts[0]["checked"], &parts[0]["passed"]), (&true.into(), &true.into()));
        assert_eq!((&parts[1]["checked"], &parts[1]["identical"]), (&false.into(), &false.into()));
        assert!(parts[1]["problem"].as_str().unwrap().contains(decoded));

        let run = args(&["--allow-unchecked"]);
        assert_eq!(run.code, 0, "{name}: {}\n{}", run.stderr, run.stdout);
        assert_eq!(run.stderr.lines().count(), 1, "{name}: {}", run.stderr);
        assert!(
            run.stderr.contains("warning") && run.stderr.contains("written anyway (--allow-unchecked)"),
            "{}",
            run.stderr
        );
        assert!(out.exists() && run.stdout.contains("EQUIVALENT WHERE CHECKED"), "{name}: {}", run.stdout);
        let v = json(&report);
        assert_eq!((&v["passed"], &v["checked"]), (&true.into(), &false.into()), "{name}");

        // the same model: the part that did not run is the same in both
        let run = cli(&["verify".as_ref(), input.as_os_str(), input.as_os_str()]);
        assert_eq!(run.code, 0, "{name}: {}\n{}", run.stderr, run.stdout);
        assert!(run.stdout.contains("the same nodes and weights in both models"), "{}", run.stdout);
        // the fused one: not checked, exit 2, one line naming it
        let run = cli(&["verify".as_ref(), input.as_os_str(), out.as_os_str()]);
        assert_eq!(run.code, 2, "{name}: {}\n{}", run.stderr, run.stdout);
        assert_eq!(run.stderr.lines().count(), 1, "{name}: {}", run.stderr);
    }
}

/// The cut node itself cannot be run: where the candidate's differs from the reference's (an
/// attribute, what it reads, another operator), the check fails saying so (exit 1), whatever
/// the parts say.
#[test]
fn case_a_changed_cut_node_fails() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("cut_qarepvgg", "mid_ts_fold.onnx");
    let decode = |m: &mut Model| -> usize { m.graph().node.iter().position(|n| n.op_type() == "Decode").unwrap() };
    let edits: [(&str, &str, Edit); 3] = [
        ("attribute", "attribute `mode` differs", |n| n.attribute[0].s = Some(b"other".to_vec())),
        ("input", "reads [/b1/nonlinearity/Relu_output_0]", |n| n.input[0] = "/b1/nonlinearity/Relu_output_0".into()),
        ("op", "is Identity 'vendor_decode' (domain ``), not Decode", |n| {
            n.op_type = Some("Identity".into());
            n.domain = None;
            n.attribute.clear();
        }),
    ];
    for (what, says, edit) in edits {
        let bad = dir.path().join(format!("{what}.onnx"));
        fused_and_edited(&input, &bad, |m| {
            let i = decode(m);
            edit(&mut m.graph_mut().node[i]);
        });
        let r = verify(&input, &bad, &VerifyOptions { samples: 1, ..Default::default() }).unwrap();
        assert_eq!(r.exit_code(), 1, "{what}:\n{}", r.table());
        let problem = r.cuts.as_ref().unwrap()[0].problem.clone().unwrap_or_default();
        assert!(problem.contains(says), "{what}: {problem}");
        assert!(r.table().contains(&format!("FAIL: {problem}")), "{what}:\n{}", r.table());
    }
}

/// A candidate that does not keep the cut tensor's name: the part before the cut cannot compare
/// it (said so, a failure), and the cut node reads another tensor (a failure) — never a guess.
#[test]
fn case_a_cut_tensor_missing_in_the_candidate_fails() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("cut_qarepvgg", "mid_ts_fold.onnx");
    let bad = dir.path().join("renamed.onnx");
    let old = "/b2/nonlinearity/Relu_output_0";
    fused_and_edited(&input, &bad, |m| {
        for n in m.graph_mut().node.iter_mut() {
            for t in n.input.iter_mut().chain(n.output.iter_mut()).filter(|t| *t == old) {
                *t = "renamed".into();
            }
        }
    });
    let r = verify(&input, &bad, &VerifyOptions { samples: 1, ..Default::default() }).unwrap();
    assert_eq!(r.exit_code(), 1, "{}", r.table());
    let p = part(&r, 0);
    assert_eq!((p.checked, p.passed), (false, Some(false)));
    assert!(p.problem.as_deref().unwrap().contains(&format!("it has no tensor `{old}`")), "{:?}", p.problem);
    assert!(r.cuts.as_ref().unwrap()[0].problem.as_deref().unwrap().contains("[renamed]"), "{}", r.table());
    assert!(part(&r, 1).passed == Some(true), "{}", r.table());
}

/// Golden outputs compare whole models: with a cut they are refused (exit 2, one line).
#[test]
fn case_golden_outputs_of_a_cut_model_are_refused() {
    let input = fixture("cut_qarepvgg", "mid_ts_fold.onnx");
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("out.npz");
    let run =
        cli(&["verify".as_ref(), input.as_os_str(), input.as_os_str(), "--save-outputs".as_ref(), npz.as_os_str()]);
    assert_eq!(run.code, 2, "{}\n{}", run.stderr, run.stdout);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("--save-outputs") && run.stderr.contains("Decode 'vendor_decode'"), "{}", run.stderr);
    assert!(!npz.exists());
}

/// An operator tract knows but whose builder refuses the node (a BatchNormalization with the
/// `spatial = 0` of opsets before 9) is cut like an unknown one: the check runs around it; the
/// rewrite leaves it (it cannot fold it either). Its output's size is not declared, and the
/// blocks after it are rewritten: `fuse` writes nothing (exit 2); the model against itself passes.
#[test]
fn case_a_node_tract_refuses_to_build_is_cut_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qarepvgg/ts_fold.onnx")).unwrap();
    let bn = m.graph_mut().node.iter_mut().find(|n| n.name() == "/b2/bn/BatchNormalization").unwrap();
    bn.attribute.push(acnet_onnx::proto::AttributeProto {
        name: Some("spatial".into()),
        r#type: Some(acnet_onnx::proto::attribute_proto::AttributeType::Int as i32),
        i: Some(0),
        ..Default::default()
    });
    let input = dir.path().join("spatial.onnx");
    save(&m, &input, DataMode::Inline).unwrap();
    let r = verify(&input, &input, &VerifyOptions { samples: 1, ..Default::default() }).unwrap();
    assert_eq!((r.exit_code(), r.checked), (0, true), "{}", r.table());
    let cut = &r.cuts.as_ref().unwrap()[0];
    assert_eq!((cut.node.as_str(), cut.problem.as_deref()), ("/b2/bn/BatchNormalization", None));
    assert!(cut.why.starts_with("tract refuses the node: ") && cut.why.contains("'spatial'"), "{}", cut.why);
    assert_eq!(part(&r, 0).outputs, vec!["/b2/Add_1_output_0".to_string()]);
    assert_eq!((part(&r, 1).checked, part(&r, 1).identical), (false, Some(true)), "{}", r.table());

    let out = dir.path().join("fused.onnx");
    let f = fuse_file(&input, &out, &FuseOptions::default()).unwrap();
    assert_eq!((f.exit_code(), f.written.is_none()), (2, true), "{}", f.check.as_ref().unwrap().table());
    assert!(f.fuse.refused.iter().any(|x| x.reason.to_string().contains("spatial")), "{}", f.fuse.summary());
    assert!(!out.exists());
}
