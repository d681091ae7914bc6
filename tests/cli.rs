//! The binary's contract: exit codes, one-line errors, atomic writes with no staging
//! folder or stale data file left, the input never modified, `-o` naming an input file refused
//! unless `--in-place`, reports, verify and inspect.

use acnet_onnx::Model;
use acnet_onnx::{save, DataMode};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

const MODELS: [&str; 8] = ["cifar_quick", "resnet20", "corners", "dbb", "mobileone", "qarepvgg", "conv2", "repopt"];
const FILES: [&str; 6] = ["ts_fold", "ts_nofold_op11", "dynamo_ext", "dynamo_inline", "ts_dynbatch", "deploy"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn fixture(model: &str, file: &str) -> PathBuf {
    fixtures().join(model).join(file)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_acnet-onnx")).args(args).env("RUST_BACKTRACE", "1").output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn no_crash(r: &Run, what: &str) {
    for bad in ["panicked", "backtrace", "internal error", "RUST_BACKTRACE"] {
        assert!(!r.stderr.contains(bad), "{what}: {bad} on stderr:\n{}", r.stderr);
    }
}

/// Exit 2, one line on stderr naming `file` and containing `words`.
fn fails_with(r: &Run, file: &str, words: &[&str], what: &str) {
    no_crash(r, what);
    assert_eq!(r.code, 2, "{what}: exit {}\nstderr: {}\nstdout: {}", r.code, r.stderr, r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{what}: not one line:\n{}", r.stderr);
    assert!(
        r.stderr.starts_with("acnet-onnx: ") && r.stderr.contains(file),
        "{what}: does not name {file}: {}",
        r.stderr
    );
    for w in words {
        assert!(r.stderr.contains(w), "{what}: lacks {w:?}: {}", r.stderr);
    }
}

fn ok(r: &Run, what: &str) {
    no_crash(r, what);
    assert_eq!(r.code, 0, "{what}: exit {}\nstderr: {}\nstdout: {}", r.code, r.stderr, r.stdout);
}

/// Every file of a folder (not recursing) and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn no_staging_left(dir: &Path) {
    let left: Vec<String> = names(dir).into_iter().filter(|n| n.starts_with(".acnet-onnx-")).collect();
    assert!(left.is_empty(), "staging folders left in {}: {left:?}", dir.display());
}

fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// Copy a fixture (and its external data) into `dir`.
fn copy_fixture(model: &str, file: &str, dir: &Path) -> PathBuf {
    let p = dir.join(format!("{file}.onnx"));
    std::fs::copy(fixture(model, &format!("{file}.onnx")), &p).unwrap();
    let data = fixture(model, &format!("{file}.onnx.data"));
    if data.exists() {
        std::fs::copy(&data, dir.join(format!("{file}.onnx.data"))).unwrap();
    }
    p
}

/// Every export and deploy model of every fixture fuses: exit 0, the output (with `.data` when
/// the input had external data) and nothing else is written, the input folder is unchanged.
#[test]
fn case_fuse_every_fixture_file() {
    let out_dir = tempdir();
    for model in MODELS {
        let before = snapshot(&fixtures().join(model));
        for file in FILES {
            let input = fixture(model, &format!("{file}.onnx"));
            let out = out_dir.path().join(format!("{model}_{file}.onnx"));
            let r = cli(&[OsStr::new("fuse"), input.as_os_str(), OsStr::new("-o"), out.as_os_str()]);
            let what = format!("{model}/{file}");
            ok(&r, &what);
            assert!(r.stdout.contains("wrote") && r.stdout.contains("EQUIVALENT"), "{what}: {}", r.stdout);
            let data = out_dir.path().join(format!("{model}_{file}.onnx.data"));
            assert_eq!(data.exists(), file == "dynamo_ext", "{what}: data file");
            Model::load(&out).unwrap();
            no_staging_left(out_dir.path());
        }
        assert!(snapshot(&fixtures().join(model)) == before, "{model}: a fixture file changed");
        no_staging_left(&fixtures().join(model));
    }
    // 8 models x 6 files, each a model and for dynamo_ext a data file
    assert_eq!(names(out_dir.path()).len(), MODELS.len() * (FILES.len() + 1));
}

/// External data in, external data out; `--inline` gives one file and removes the `.data` an
/// earlier external run left; `--external-data` forces a data file for an inline input.
#[test]
fn case_external_inline_and_stale_data() {
    let d = tempdir();
    let ext = fixture("resnet20", "dynamo_ext.onnx");
    let out = d.path().join("deploy.onnx");
    let data = d.path().join("deploy.onnx.data");
    let fuse = |input: &Path, extra: &[&str]| {
        let mut args: Vec<&OsStr> = vec!["fuse".as_ref(), input.as_os_str(), "-o".as_ref(), out.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        cli(&args)
    };

    ok(&fuse(&ext, &[]), "external");
    assert!(out.exists() && data.exists());
    assert!(Model::load(&out).unwrap().has_external_data());
    assert_eq!(names(d.path()), ["deploy.onnx", "deploy.onnx.data"]);

    // inline over the external output: the stale data file goes
    let r = fuse(&ext, &["--inline"]);
    ok(&r, "inline");
    assert!(out.exists() && !data.exists(), "{:?}", names(d.path()));
    assert!(!Model::load(&out).unwrap().has_external_data());
    assert_eq!(names(d.path()), ["deploy.onnx"]);

    // an inline input is written inline by default, with a data file on request
    let inline = fixture("resnet20", "ts_fold.onnx");
    ok(&fuse(&inline, &[]), "inline input");
    assert!(!data.exists());
    ok(&fuse(&inline, &["--external-data"]), "--external-data");
    assert!(data.exists() && Model::load(&out).unwrap().has_external_data());
    // and an inline run over it removes the data file again
    ok(&fuse(&inline, &["--inline", "--no-verify"]), "inline, no verify");
    assert!(!data.exists());
    // --inline and --external-data together: a usage error, one line
    let r = fuse(&inline, &["--inline", "--external-data"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    no_staging_left(d.path());
    // the fused output verifies against the original
    ok(&cli(&[OsStr::new("verify"), ext.as_os_str(), out.as_os_str()]), "verify output");
}

/// `-o` naming the input, or a file of the input (its external data, or the data file a save
/// of the output would write or remove), is refused unless --in-place, and changes nothing.
#[test]
fn case_output_naming_the_input_is_refused_unless_in_place() {
    let d = tempdir();
    let input = copy_fixture("conv2", "dynamo_ext", d.path());
    let before = snapshot(d.path());
    let data = d.path().join("dynamo_ext.onnx.data");

    let r = cli(&[OsStr::new("fuse"), input.as_os_str(), OsStr::new("-o"), input.as_os_str()]);
    fails_with(&r, "dynamo_ext.onnx", &["--in-place"], "-o input");
    // the same file by another spelling
    let other = d.path().join(".").join("dynamo_ext.onnx");
    let r = cli(&[OsStr::new("fuse"), input.as_os_str(), OsStr::new("-o"), other.as_os_str()]);
    fails_with(&r, "dynamo_ext.onnx", &["--in-place"], "-o ./input");
    // the input's data file
    let r = cli(&[OsStr::new("fuse"), input.as_os_str(), OsStr::new("-o"), data.as_os_str()]);
    fails_with(&r, "dynamo_ext.onnx.data", &["a file of the input"], "-o input data");
    // an output whose `.data` is the input's data file
    let renamed = d.path().join("renamed.onnx");
    std::fs::copy(&input, &renamed).unwrap();
    let before_renamed = snapshot(d.path());
    let r =
        cli(&[OsStr::new("fuse"), renamed.as_os_str(), OsStr::new("-o"), input.as_os_str(), OsStr::new("--inline")]);
    fails_with(&r, "dynamo_ext.onnx.data", &["a file of the input"], "-o output whose .data is the input's");
    assert!(snapshot(d.path()) == before_renamed);
    std::fs::remove_file(&renamed).unwrap();
    assert!(snapshot(d.path()) == before, "the input changed");
    no_staging_left(d.path());

    // --in-place: works, and the result is loadable and equivalent to the original fixture
    let r =
        cli(&[OsStr::new("fuse"), input.as_os_str(), OsStr::new("-o"), input.as_os_str(), OsStr::new("--in-place")]);
    ok(&r, "--in-place");
    assert!(snapshot(d.path()) != before, "--in-place changed nothing");
    assert_eq!(names(d.path()), ["dynamo_ext.onnx", "dynamo_ext.onnx.data"]);
    let fused = Model::load(&input).unwrap();
    assert!(fused.proto.graph.as_ref().unwrap().node.iter().all(|n| n.op_type() != "BatchNormalization"));
    let original = fixture("conv2", "dynamo_ext.onnx");
    ok(&cli(&[OsStr::new("verify"), original.as_os_str(), input.as_os_str()]), "verify in-place result");
    // in place, inline: the model's data file goes with it
    let r = cli(&[
        OsStr::new("fuse"),
        input.as_os_str(),
        OsStr::new("-o"),
        input.as_os_str(),
        OsStr::new("--in-place"),
        OsStr::new("--inline"),
    ]);
    ok(&r, "--in-place --inline");
    assert_eq!(names(d.path()), ["dynamo_ext.onnx"]);
    assert!(!Model::load(&input).unwrap().has_external_data());
}

/// Files a run is asked to write in places it cannot: one line, exit 2, nothing written.
#[test]
fn case_output_where_it_cannot_go() {
    let d = tempdir();
    let input = fixture("conv2", "ts_fold.onnx");
    let missing = d.path().join("no_such_folder").join("out.onnx");
    let r = cli(&[OsStr::new("fuse"), input.as_os_str(), OsStr::new("-o"), missing.as_os_str()]);
    fails_with(&r, "out.onnx", &["no folder"], "missing folder");
    let folder = d.path().join("a_folder");
    std::fs::create_dir(&folder).unwrap();
    let r = cli(&[OsStr::new("fuse"), input.as_os_str(), OsStr::new("-o"), folder.as_os_str()]);
    fails_with(&r, "a_folder", &["folder"], "output is a folder");
    // a report naming the input, or the output
    let out = d.path().join("out.onnx");
    let r = cli(&[
        OsStr::new("fuse"),
        input.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--report"),
        input.as_os_str(),
    ]);
    fails_with(&r, "ts_fold.onnx", &["--report"], "report = input");
    let r = cli(&[
        OsStr::new("fuse"),
        input.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--report"),
        out.as_os_str(),
    ]);
    fails_with(&r, "out.onnx", &["--report"], "report = output");
    let r =
        cli(&[OsStr::new("verify"), input.as_os_str(), input.as_os_str(), OsStr::new("--report"), input.as_os_str()]);
    fails_with(&r, "ts_fold.onnx", &["--report"], "verify report = input");
    assert_eq!(names(d.path()), ["a_folder"]);
    assert!(names(&folder).is_empty());
}

/// Bad arguments: one line, exit 2.
#[test]
fn case_bad_arguments() {
    let input = fixture("conv2", "ts_fold.onnx");
    let d = tempdir();
    let out = d.path().join("o.onnx");
    let i = input.as_os_str();
    let o = out.as_os_str();
    for (what, args) in [
        ("unknown flag", vec![OsStr::new("fuse"), i, OsStr::new("-o"), o, OsStr::new("--frobnicate")]),
        ("no -o", vec![OsStr::new("fuse"), i]),
        ("no command", vec![]),
        ("unknown command", vec![OsStr::new("shrink"), i]),
        ("samples not a number", vec![OsStr::new("verify"), i, i, OsStr::new("--samples"), OsStr::new("many")]),
        ("zero samples", vec![OsStr::new("verify"), i, i, OsStr::new("--samples"), OsStr::new("0")]),
        ("bad input shape", vec![OsStr::new("verify"), i, i, OsStr::new("--input-shape"), OsStr::new("input:1,x")]),
        ("negative atol", vec![OsStr::new("fuse"), i, OsStr::new("-o"), o, OsStr::new("--atol=-1")]),
        (
            "bench time without --bench",
            vec![OsStr::new("fuse"), i, OsStr::new("-o"), o, OsStr::new("--bench-time"), OsStr::new("1")],
        ),
        (
            "zero bench runs",
            vec![
                OsStr::new("fuse"),
                i,
                OsStr::new("-o"),
                o,
                OsStr::new("--bench"),
                OsStr::new("--bench-runs"),
                OsStr::new("0"),
            ],
        ),
        (
            "negative bench time",
            vec![OsStr::new("fuse"), i, OsStr::new("-o"), o, OsStr::new("--bench"), OsStr::new("--bench-time=-1")],
        ),
        (
            "bench time not a number",
            vec![
                OsStr::new("fuse"),
                i,
                OsStr::new("-o"),
                o,
                OsStr::new("--bench"),
                OsStr::new("--bench-time"),
                OsStr::new("nan"),
            ],
        ),
    ] {
        let r = cli(&args);
        no_crash(&r, what);
        assert_eq!(r.code, 2, "{what}: {}\n{}", r.stderr, r.stdout);
        assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
        assert!(r.stderr.starts_with("acnet-onnx: "), "{what}: {}", r.stderr);
    }
    assert!(names(d.path()).is_empty());
    // --help is not an error
    let r = cli(&["--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("fuse"));
}

/// `fuse --report`: JSON with the verify fields, `verified` and `fuse`; null verdict with --no-verify.
#[test]
fn case_fuse_report_json() {
    let d = tempdir();
    let out = d.path().join("deploy.onnx");
    let report = d.path().join("report.json");
    let input = fixture("qarepvgg", "ts_nofold_op11.onnx");
    let r = cli(&[
        OsStr::new("fuse"),
        input.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--report"),
        report.as_os_str(),
    ]);
    ok(&r, "report");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["passed"], true);
    assert_eq!(v["verified"], true);
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(v["outputs"][0]["name"], "output");
    assert!(v["fuse"]["blocks_merged"].as_u64().unwrap() > 0);
    for k in ["bns_folded", "rewrites", "refused", "before", "after"] {
        assert!(!v["fuse"][k].is_null(), "fuse.{k} missing: {v}");
    }
    let r = cli(&[
        OsStr::new("fuse"),
        input.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--report"),
        report.as_os_str(),
        OsStr::new("--no-verify"),
    ]);
    ok(&r, "report, no verify");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(v["passed"].is_null() && v["verified"] == false && v["outputs"].is_array() && v["fuse"].is_object(), "{v}");
    assert_eq!(names(d.path()), ["deploy.onnx", "report.json"]);
}

/// The check's criterion: the noise criterion by default, with its numbers in the table and the
/// JSON; tolerances when --atol/--rtol/--stat are given (per output too), or --criterion says so.
#[test]
fn case_criterion_flags_and_report() {
    let d = tempdir();
    let (export, deploy) = (fixture("conv2", "ts_fold.onnx"), fixture("conv2", "deploy.onnx"));
    let report = d.path().join("r.json");
    let verify = |extra: &[&str]| {
        let mut args: Vec<&OsStr> = vec!["verify".as_ref(), export.as_os_str(), deploy.as_os_str()];
        args.extend([OsStr::new("--report"), report.as_os_str()]);
        args.extend(extra.iter().map(OsStr::new));
        let r = cli(&args);
        let v: Option<serde_json::Value> =
            std::fs::read_to_string(&report).ok().map(|s| serde_json::from_str(&s).unwrap());
        let _ = std::fs::remove_file(&report);
        (r, v)
    };
    let (r, v) = verify(&[]);
    ok(&r, "default");
    let v = v.unwrap();
    assert_eq!((v["criterion"].as_str(), v["noise_factor"].as_f64()), (Some("noise"), Some(10.0)), "{v}");
    let o = &v["outputs"][0];
    assert!(o["noise"].as_f64().unwrap() > 0.0 && o["ratio"].as_f64().unwrap() <= 10.0, "{o}");
    assert!(v["divergence"].is_null() && v["evaluation"] == "native");
    assert!(r.stdout.contains("ratio") && r.stdout.contains("within 10x"), "{}", r.stdout);
    for (extra, criterion) in [
        (&["--atol", "1e-3"][..], "tolerance"),
        (&["--rtol", "output:1e-3"][..], "tolerance"),
        (&["--stat", "median"][..], "tolerance"),
        (&["--criterion", "noise", "--atol", "1"][..], "noise"),
        (&["--criterion", "tolerance"][..], "tolerance"),
    ] {
        let (r, v) = verify(extra);
        ok(&r, &format!("{extra:?}"));
        assert_eq!(v.unwrap()["criterion"], criterion, "{extra:?}");
    }
    let (r, v) = verify(&["--atol", "output:0", "--rtol", "0", "--atol", "1"]);
    assert_eq!(r.code, 1, "a per-output atol of 0 wins over the default:\n{}", r.stdout);
    assert_eq!(v.unwrap()["outputs"][0]["atol"], 0.0);
    for bad in
        [&["--stat", "mode"][..], &["--criterion", "exact"][..], &["--noise-factor", "0.5"][..], &["--atol", "x:y"][..]]
    {
        let (r, _) = verify(bad);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{bad:?}: {}", r.stderr);
    }
}

/// A check that fails (tolerances of zero: the fused model differs by float rounding) writes
/// nothing and exits 1; --force writes with a one-line warning and exits 0.
#[test]
fn case_failed_check_writes_nothing_unless_forced() {
    let d = tempdir();
    let input = fixture("resnet20", "ts_nofold_op11.onnx");
    let out = d.path().join("deploy.onnx");
    let report = d.path().join("report.json");
    let strict = ["--atol", "0", "--rtol", "0"];
    let mut args: Vec<&OsStr> = vec![
        "fuse".as_ref(),
        input.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
    ];
    args.extend(strict.iter().map(OsStr::new));
    let r = cli(&args);
    no_crash(&r, "strict");
    assert_eq!(r.code, 1, "{}\n{}", r.stderr, r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("nothing written") && r.stderr.contains("ts_nofold_op11.onnx"), "{}", r.stderr);
    assert!(r.stdout.contains("NOT EQUIVALENT"), "{}", r.stdout);
    assert_eq!(names(d.path()), ["report.json"]);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["passed"], false);

    args.push("--force".as_ref());
    let r = cli(&args);
    ok(&r, "forced");
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("warning") && r.stderr.contains("--force"), "{}", r.stderr);
    assert!(out.exists());
}

/// verify: exit 0 when equivalent, 1 on a deploy model with one weight changed (built with
/// Model + prost), the JSON report says which.
#[test]
fn case_verify_exit_codes() {
    let d = tempdir();
    let reference = fixture("cifar_quick", "ts_fold.onnx");
    let deploy = fixture("cifar_quick", "deploy.onnx");
    ok(&cli(&[OsStr::new("verify"), reference.as_os_str(), deploy.as_os_str()]), "verify equivalent");

    let mut m = Model::load(&deploy).unwrap();
    let g = m.proto.graph.as_mut().unwrap();
    let w = g.node.iter().find(|n| n.op_type() == "Conv").unwrap().input[1].clone();
    let t = g.initializer.iter_mut().find(|t| t.name() == w).unwrap();
    match &mut t.raw_data {
        Some(raw) => {
            let mut v = raw.to_vec();
            let x = f32::from_le_bytes(v[..4].try_into().unwrap()) + 0.5;
            v[..4].copy_from_slice(&x.to_le_bytes());
            *raw = v.into();
        }
        None => t.float_data[0] += 0.5,
    }
    let changed = d.path().join("changed.onnx");
    save(&m, &changed, DataMode::Inline).unwrap();
    let report = d.path().join("verify.json");
    let r = cli(&[
        OsStr::new("verify"),
        reference.as_os_str(),
        changed.as_os_str(),
        OsStr::new("--report"),
        report.as_os_str(),
    ]);
    no_crash(&r, "verify changed");
    assert_eq!(r.code, 1, "{}\n{}", r.stderr, r.stdout);
    assert!(r.stdout.contains("FAIL") && r.stdout.contains("NOT EQUIVALENT"), "{}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["passed"], false);
    assert_eq!(v["outputs"][0]["passed"], false);
}

/// inspect: the header, the blocks, and every initializer with its shape and dtype; --json too;
/// it writes nothing.
#[test]
fn case_inspect_prints_the_initializers() {
    let d = tempdir();
    let input = copy_fixture("conv2", "dynamo_ext", d.path());
    let before = snapshot(d.path());
    let r = cli(&[OsStr::new("inspect"), input.as_os_str()]);
    ok(&r, "inspect");
    let m = Model::load(&input).unwrap();
    let inits = &m.proto.graph.as_ref().unwrap().initializer;
    assert!(r.stdout.contains("ir_version") && r.stdout.contains("blocks that fuse would rewrite"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("initializers ({})", inits.len())), "{}", r.stdout);
    for t in inits {
        let line = r
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{} ", t.name())))
            .unwrap_or_else(|| panic!("{} not listed", t.name()));
        let dtype = acnet_onnx::proto::tensor_proto::DataType::try_from(t.data_type()).unwrap();
        assert!(line.contains(dtype.as_str_name()), "{line}");
        assert!(line.contains(&serde_json::to_string(&t.dims).unwrap()), "{line}");
        if acnet_onnx::is_external(t) {
            assert!(line.contains("(external)"), "{line}");
        }
    }
    let r = cli(&[OsStr::new("inspect"), input.as_os_str(), OsStr::new("--json")]);
    ok(&r, "inspect --json");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["initializers"].as_array().unwrap().len(), inits.len());
    assert!(!v["analysis"]["rewrites"].as_array().unwrap().is_empty());
    assert!(snapshot(d.path()) == before);
    assert_eq!(names(d.path()).len(), 2);
}

/// The `latency: A ms -> B ms (...)` line of a `fuse --bench` run.
fn latency_line(r: &Run) -> &str {
    let l = r
        .stdout
        .lines()
        .find(|l| l.starts_with("latency: "))
        .unwrap_or_else(|| panic!("no latency line:\n{}", r.stdout));
    assert!(
        l.contains(" ms -> ")
            && l.ends_with("runs, tract optimised plan)")
            && (l.contains("x faster") || l.contains("x slower")),
        "{l}"
    );
    l
}

/// The `bench` object of a report: positive finite latencies, `speedup` = before / after.
/// (Nothing about which is faster: timing must not make a test flaky.)
fn check_bench_json(v: &serde_json::Value, max_runs: u64) {
    let b = &v["bench"];
    assert!(b.is_object(), "no bench: {v}");
    let num = |k: &str| {
        let x = b[k].as_f64().unwrap_or_else(|| panic!("bench.{k} is not a number: {b}"));
        assert!(x.is_finite() && x > 0.0, "bench.{k} = {x}");
        x
    };
    let (before, after, speedup) = (num("before_ms"), num("after_ms"), num("speedup"));
    assert!((speedup - before / after).abs() <= 1e-9 * speedup, "speedup {speedup} vs {before} / {after}");
    assert!(num("min_before_ms") <= before && num("min_after_ms") <= after, "{b}");
    for k in ["runs_before", "runs_after", "warmup_runs"] {
        let n = b[k].as_u64().unwrap_or_else(|| panic!("bench.{k}: {b}"));
        assert!(n >= 1 && n <= max_runs, "bench.{k} = {n}");
    }
    assert_eq!(b["plan"], "tract optimised");
    assert_eq!(b["inputs"][0]["shape"], serde_json::json!([1, 3, 32, 32]), "{b}");
}

/// `fuse --bench`: a latency line in the summary and a `bench` object in the report, with and
/// without the check, with the timing knobs; no `bench` (null) without `--bench`. The fuse
/// itself is the same.
#[test]
fn case_fuse_bench_reports_latency() {
    let d = tempdir();
    let out = d.path().join("deploy.onnx");
    let report = d.path().join("report.json");
    let input = fixture("resnet20", "ts_nofold_op11.onnx");
    let fuse = |extra: &[&str]| {
        let mut args: Vec<&OsStr> = vec![
            "fuse".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--report".as_ref(),
            report.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let r = cli(&args);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        (r, v)
    };

    // nothing on stderr but the check's progress lines (a check taking over a second, as on a
    // loaded machine, says how far it is)
    let quiet = |stderr: &str| stderr.lines().all(|l| l.starts_with("verify: "));
    let (r, v) = fuse(&["--bench"]);
    ok(&r, "--bench");
    assert!(quiet(&r.stderr), "{}", r.stderr);
    let line = latency_line(&r);
    // after the check's verdict, before `wrote`
    let pos = |s: &str| r.stdout.find(s).unwrap_or_else(|| panic!("no {s:?}:\n{}", r.stdout));
    assert!(pos("EQUIVALENT") < pos(line) && pos(line) < pos("wrote"), "{}", r.stdout);
    assert_eq!(v["passed"], true);
    check_bench_json(&v, 50);
    assert_eq!(v["fuse"]["blocks_merged"], 19);
    let fused = std::fs::read(&out).unwrap();

    // independent of the check; --bench-runs bounds the runs
    let (r, v) = fuse(&["--bench", "--no-verify", "--bench-time", "0.05", "--bench-runs", "4"]);
    ok(&r, "--bench --no-verify");
    assert!(quiet(&r.stderr), "{}", r.stderr);
    latency_line(&r);
    assert!(!r.stdout.contains("EQUIVALENT"), "{}", r.stdout);
    assert!(v["passed"].is_null() && v["verified"] == false, "{v}");
    check_bench_json(&v, 4);
    assert!(std::fs::read(&out).unwrap() == fused, "--bench changed the output");

    // without --bench: no line, bench null
    let (r, v) = fuse(&[]);
    ok(&r, "no --bench");
    assert!(!r.stdout.contains("latency"), "{}", r.stdout);
    assert!(v.get("bench").is_some_and(|b| b.is_null()), "{v}");
    assert!(std::fs::read(&out).unwrap() == fused);
    assert_eq!(names(d.path()), ["deploy.onnx", "report.json"]);

    // a symbolic batch: run at 1, said in a note, also with --no-verify
    let dynbatch = fixture("conv2", "ts_dynbatch.onnx");
    let r = cli(&[
        OsStr::new("fuse"),
        dynbatch.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--no-verify"),
        OsStr::new("--bench"),
        OsStr::new("--bench-time"),
        OsStr::new("0"),
        OsStr::new("--report"),
        report.as_os_str(),
    ]);
    ok(&r, "dynbatch --bench");
    latency_line(&r);
    assert!(r.stdout.contains("note: ") && r.stdout.contains("symbolic; defaulting to 1"), "{}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    check_bench_json(&v, 3);
}

/// A model tract cannot run: `--bench` warns in one line and leaves `bench` null; the fuse is
/// written as without it (exit 0), checked around the operator tract cannot run.
#[test]
fn case_fuse_bench_unsupported_operator_warns() {
    let d = tempdir();
    let mut m = Model::load(fixture("qarepvgg", "ts_fold.onnx")).unwrap();
    // Bernoulli is not in tract-onnx's op register (see tests/verify.rs)
    let g = m.proto.graph.as_mut().unwrap();
    g.node.iter_mut().rfind(|n| n.op_type() == "Relu").unwrap().op_type = Some("Bernoulli".into());
    let input = d.path().join("bernoulli.onnx");
    save(&m, &input, DataMode::Inline).unwrap();
    let out = d.path().join("deploy.onnx");
    let report = d.path().join("report.json");
    for extra in [&["--bench"][..], &["--bench", "--no-verify"]] {
        let mut args: Vec<&OsStr> = vec![
            "fuse".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--report".as_ref(),
            report.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let r = cli(&args);
        let what = format!("{extra:?}");
        ok(&r, &what);
        assert!(r.stdout.contains("wrote") && !r.stdout.contains("latency"), "{what}: {}", r.stdout);
        let warning = r
            .stderr
            .lines()
            .find(|l| l.contains("no latency measured"))
            .unwrap_or_else(|| panic!("{what}: no warning: {}", r.stderr));
        assert!(
            warning.starts_with("acnet-onnx: warning: ")
                && warning.contains("Bernoulli")
                && warning.contains("bernoulli.onnx"),
            "{what}: {warning}"
        );
        assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert!(v["bench"].is_null() && v["fuse"]["blocks_merged"].as_u64().unwrap() > 0, "{what}: {v}");
        // with the check: made around Bernoulli (the blocks before it, which the rewrite changed,
        // are compared; the head after it is the same in both models)
        if extra.len() == 1 {
            assert_eq!(
                (&v["passed"], &v["checked"], &v["cuts"][0]["op"]),
                (&true.into(), &true.into(), &"Bernoulli".into())
            );
        }
        assert!(Model::load(&out).unwrap().proto.graph.unwrap().node.iter().any(|n| n.op_type() == "Bernoulli"));
        std::fs::remove_file(&out).unwrap();
    }
}
