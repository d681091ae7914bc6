"""Tests of the installed package (the wheel in a virtual environment): the Python API and the
``acnet-onnx`` command it puts on PATH, on the repository's committed fixtures.

    python -m unittest discover -s python/tests -v      # from the repository, the wheel installed

Run them from outside ``python/`` so that ``import acnet_onnx`` finds the installed package. The
tests that pass numpy arrays are skipped when numpy is not installed (CI installs it).
"""

import ast
import faulthandler
import json
import os
import pathlib
import pickle
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import unittest
import warnings

import acnet_onnx
from acnet_onnx import _native

# the repository (its fixtures): ACNET_ONNX_REPO, or the one this file is in
ROOT = pathlib.Path(os.environ.get("ACNET_ONNX_REPO") or pathlib.Path(__file__).resolve().parents[2])
CONV2 = ROOT / "fixtures" / "conv2"
TS_FOLD = CONV2 / "ts_fold.onnx"  # three Conv2 blocks, inline weights, input [1,3,32,32]
DEPLOY = CONV2 / "deploy.onnx"  # the same network, fused by PyTorch
DYNBATCH = CONV2 / "ts_dynbatch.onnx"  # a symbolic batch dim
DYNAMO_EXT = CONV2 / "dynamo_ext.onnx"  # external data in dynamo_ext.onnx.data
IO_NPZ = CONV2 / "io.npz"  # real inputs: input.npy [1,3,32,32], input_b2.npy, ...
# QARepVGG exports with a custom-domain node (com.example.vendor::Decode) between blocks b2 and b3
CUT = ROOT / "fixtures" / "cut_qarepvgg"

try:
    import numpy
except ImportError:
    numpy = None

# the bench fields that are measured times (every other field of a report is deterministic)
TIMES = {"before_ms", "after_ms", "speedup", "min_before_ms", "min_after_ms"}


def command():
    """The console script of the environment the tests run in."""
    name = "acnet-onnx.exe" if os.name == "nt" else "acnet-onnx"
    return str(pathlib.Path(sysconfig.get_path("scripts")) / name)


def cli(*args):
    return subprocess.run([command(), *map(str, args)], capture_output=True, text=True, timeout=600)


def without_times(report):
    r = dict(report)
    if r.get("bench") is not None:
        r["bench"] = {k: v for k, v in r["bench"].items() if k not in TIMES}
    return r


class FakeModelProto:
    """What the API uses of an onnx.ModelProto (onnx is not installed here)."""

    def __init__(self, data, external=False):
        self.data = data
        tensor = type("Tensor", (), {"data_location": 1 if external else 0})()
        self.graph = type("Graph", (), {"initializer": [tensor]})()

    def SerializeToString(self):
        return self.data


class Case(unittest.TestCase):
    def setUp(self):
        t = tempfile.TemporaryDirectory(prefix="acnet-onnx-test-")
        self.addCleanup(t.cleanup)
        self.tmp = pathlib.Path(t.name)

    def fuse_quietly(self, *args, **kwargs):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = acnet_onnx.fuse(*args, **kwargs)
        return r, [str(x.message) for x in w if issubclass(x.category, acnet_onnx.FuseWarning)]


class Fuse(Case):
    def test_fuse_returns_the_report_the_command_line_writes(self):
        out = self.tmp / "deploy.onnx"
        r, warned = self.fuse_quietly(str(TS_FOLD), str(out))
        self.assertIsInstance(r, dict)
        self.assertIs(r["passed"], True)
        self.assertIs(r["verified"], True)
        self.assertEqual(r["fuse"]["blocks_merged"], 3)
        self.assertEqual(r["fuse"]["before"]["ops"]["Conv"], 6)
        self.assertEqual(r["fuse"]["after"]["ops"]["Conv"], 3)
        self.assertEqual((r["reference"], r["candidate"]), (str(TS_FOLD), str(out)))
        self.assertEqual((r.exit_code, r.written, r.warnings, warned), (0, [str(out)], [], []))
        fused = out.read_bytes()
        self.assertGreater(len(fused), 1000)

        out.unlink()
        p = cli("fuse", TS_FOLD, "-o", out, "--report", self.tmp / "cli.json")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(r, json.loads((self.tmp / "cli.json").read_text()))
        self.assertEqual(out.read_bytes(), fused)

    def test_bench_options_reach_the_report_as_on_the_command_line(self):
        out = self.tmp / "deploy.onnx"
        r, _ = self.fuse_quietly(TS_FOLD, out, bench=True, bench_time=0, bench_runs=3, samples=1)
        b = r["bench"]
        self.assertEqual((b["runs_before"], b["runs_after"], b["plan"]), (3, 3, "tract optimised"))
        self.assertGreater(b["before_ms"], 0)
        self.assertAlmostEqual(b["speedup"], b["before_ms"] / b["after_ms"])
        cli_report = self.tmp / "cli.json"
        p = cli("fuse", TS_FOLD, "-o", out, "--bench", "--bench-time", "0", "--bench-runs", "3", "--samples", "1",
                "--report", cli_report)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(without_times(r), without_times(json.loads(cli_report.read_text())))

    def test_check_options_reach_the_report(self):
        r, _ = self.fuse_quietly(TS_FOLD, self.tmp / "d.onnx", samples=1, seed=7, atol=1e-3, rtol=0.0)
        self.assertEqual((r["samples"], r["seed"], r["atol"], r["rtol"]), (1, 7, 1e-3, 0.0))
        self.assertEqual(r["inputs"][0]["source"], "random normal (seed 7)")
        # None keeps the default
        r, _ = self.fuse_quietly(TS_FOLD, self.tmp / "d.onnx", samples=None, atol=None, report=None)
        self.assertEqual((r["samples"], r["atol"]), (3, 1e-4))

    def test_criterion_options_reach_the_report_as_on_the_command_line(self):
        r = acnet_onnx.verify(TS_FOLD, DEPLOY, samples=1)
        self.assertEqual((r["criterion"], r["noise_factor"]), ("noise", 10.0))
        r = acnet_onnx.verify(TS_FOLD, DEPLOY, samples=1, noise_factor=20, eval_bn=True, freeze_initializers=True)
        self.assertEqual((r["criterion"], r["noise_factor"]), ("noise", 20.0))
        # atol, rtol or stat imply the tolerance criterion; a mapping sets one output's tolerance
        r = acnet_onnx.verify(TS_FOLD, DEPLOY, samples=1, atol={"output": 1e-3}, stat="max")
        self.assertEqual((r["criterion"], r["stat"], r["atol"]), ("tolerance", "max", 1e-4))
        self.assertEqual((r["outputs"][0]["atol"], r["outputs"][0]["rtol"]), (1e-3, 1e-4))
        p = cli("verify", TS_FOLD, DEPLOY, "--samples", "1", "--atol", "output:1e-3", "--stat", "max",
                "--report", self.tmp / "cli.json")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(r, json.loads((self.tmp / "cli.json").read_text()))
        r = acnet_onnx.verify(TS_FOLD, DEPLOY, samples=1, atol=1e-3, criterion="noise")
        self.assertEqual(r["criterion"], "noise")
        with self.assertRaisesRegex(ValueError, "criterion='exact'.*expected noise or tolerance"):
            acnet_onnx.verify(TS_FOLD, DEPLOY, criterion="exact")
        with self.assertRaisesRegex(ValueError, "noise-factor must be a finite number >= 1"):
            acnet_onnx.verify(TS_FOLD, DEPLOY, noise_factor=0.5)

    def test_input_shape_sets_a_symbolic_dim(self):
        r, _ = self.fuse_quietly(DYNBATCH, self.tmp / "d.onnx", input_shape={"input": (2, 3, 32, 32)}, samples=1)
        self.assertIs(r["passed"], True)
        self.assertEqual(r["inputs"][0]["shape"], [2, 3, 32, 32])
        self.assertEqual(r["outputs"][0]["shape"], [2, 10])

    def test_not_equivalent_writes_nothing_and_returns_the_report(self):
        out = self.tmp / "deploy.onnx"
        # tolerances of zero: the fused model differs by float rounding (~1e-7)
        r, warned = self.fuse_quietly(TS_FOLD, out, atol=0, rtol=0, report=self.tmp / "r.json")
        self.assertIs(r["passed"], False)
        self.assertIs(r["outputs"][0]["passed"], False)
        self.assertEqual((r.exit_code, r.written), (1, []))
        self.assertFalse(out.exists())
        self.assertEqual(len(warned), 1)
        self.assertIn("nothing written", warned[0])
        self.assertEqual(r.warnings, warned)
        self.assertEqual(r, json.loads((self.tmp / "r.json").read_text()))
        p = cli("fuse", TS_FOLD, "-o", out, "--atol", "0", "--rtol", "0")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertFalse(out.exists())

        r, warned = self.fuse_quietly(TS_FOLD, out, atol=0, rtol=0, force=True)
        self.assertIs(r["passed"], False)
        self.assertEqual((r.exit_code, r.written), (0, [str(out)]))
        self.assertTrue(out.exists())
        self.assertEqual(len(warned), 1)
        self.assertIn("NOT equivalent", warned[0])

    def test_a_rewrite_that_cannot_be_checked_is_not_written_unless_accepted(self):
        # Decode's output is not declared: the part after it (which the rewrite changed) cannot run
        model, out = CUT / "undeclared_ts_fold.onnx", self.tmp / "deploy.onnx"
        r, warned = self.fuse_quietly(model, out)
        self.assertEqual((r.exit_code, r.written, r["passed"], r["checked"]), (2, [], False, False))
        self.assertEqual([(p["checked"], p["identical"]) for p in r["parts"]], [(True, None), (False, False)])
        self.assertFalse(out.exists())
        self.assertEqual(len(warned), 1)
        self.assertIn("could not be checked", warned[0])
        self.assertIn("allow_unchecked=True", warned[0])
        p = cli("fuse", model, "-o", out)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertFalse(out.exists())

        r, warned = self.fuse_quietly(model, out, allow_unchecked=True)
        self.assertEqual((r.exit_code, r.written, r["passed"], r["checked"]), (0, [str(out)], True, False))
        self.assertEqual(len(warned), 1)
        self.assertIn("--allow-unchecked", warned[0])
        r = acnet_onnx.verify(model, out)
        self.assertEqual((r.exit_code, r["passed"]), (2, False))

    def test_no_verify_and_data_modes(self):
        out = self.tmp / "deploy.onnx"
        r, _ = self.fuse_quietly(DYNAMO_EXT, out, verify=False)
        self.assertIsNone(r["passed"])
        self.assertIs(r["verified"], False)
        self.assertEqual(r.written, [str(out), str(out) + ".data"])  # external data, as the input came
        r, _ = self.fuse_quietly(DYNAMO_EXT, out, verify=False, inline=True)
        self.assertEqual(r.written, [str(out)])
        self.assertFalse(pathlib.Path(str(out) + ".data").exists())
        r, _ = self.fuse_quietly(TS_FOLD, out, verify=False, external_data=True)
        self.assertEqual(r.written, [str(out), str(out) + ".data"])

    def test_paths_bytes_and_model_protos(self):
        out = self.tmp / "deploy.onnx"
        data = TS_FOLD.read_bytes()
        for model, label in [
            (TS_FOLD, str(TS_FOLD)),
            (data, "<input: bytes>"),
            (bytearray(data), "<input: bytes>"),
            (FakeModelProto(data), "<input: onnx.ModelProto>"),
        ]:
            r, _ = self.fuse_quietly(model, out)
            self.assertIs(r["passed"], True, label)
            self.assertEqual(r["reference"], label)
        with self.assertRaises(acnet_onnx.Error) as e:
            acnet_onnx.fuse(data[:1000], out)
        self.assertTrue(str(e.exception).startswith("<input: bytes>: not an ONNX model"), str(e.exception))
        with self.assertRaisesRegex(ValueError, "external data"):
            acnet_onnx.fuse(FakeModelProto(data, external=True), out)
        with self.assertRaisesRegex(TypeError, "input: expected a path"):
            acnet_onnx.fuse(3, out)


class Errors(Case):
    def test_a_bad_file_raises_the_error_the_command_line_prints(self):
        bad = self.tmp / "bad.onnx"
        bad.write_bytes(TS_FOLD.read_bytes()[:1000])
        out = self.tmp / "out.onnx"
        with self.assertRaises(acnet_onnx.Error) as e:
            acnet_onnx.fuse(bad, out)
        msg = str(e.exception)
        self.assertTrue(msg.startswith(f"{bad}: not an ONNX model, or a truncated or damaged one"), msg)
        self.assertNotIn("\n", msg)
        self.assertEqual(e.exception.exit_code, 2)
        self.assertIsInstance(e.exception, Exception)
        self.assertFalse(out.exists())
        self.assertEqual(os.listdir(self.tmp), ["bad.onnx"])  # no staging folder left
        p = cli("fuse", bad, "-o", out)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stderr, f"acnet-onnx: {msg}\n")
        # verify and inspect too
        for call in (lambda: acnet_onnx.verify(TS_FOLD, bad), lambda: acnet_onnx.inspect(bad)):
            with self.assertRaises(acnet_onnx.Error) as e:
                call()
            self.assertEqual(str(e.exception), msg)
        with self.assertRaises(acnet_onnx.Error) as e:
            acnet_onnx.inspect(self.tmp / "missing.onnx")
        self.assertIn("missing.onnx", str(e.exception))

    def test_the_error_pickles_and_has_a_default_exit_code(self):
        e = pickle.loads(pickle.dumps(acnet_onnx.Error("m.onnx: bad")))
        self.assertIsInstance(e, acnet_onnx.Error)
        self.assertEqual((str(e), e.exit_code), ("m.onnx: bad", 2))

    def test_wrong_options(self):
        out = self.tmp / "out.onnx"
        cases = [
            (TypeError, "unexpected keyword argument 'sample'", dict(sample=1)),
            (TypeError, "samples='3'", dict(samples="3")),
            (TypeError, "verify=1", dict(verify=1)),
            (TypeError, "input_shape", dict(input_shape=[1, 3, 32, 32])),
            (ValueError, "samples must be at least 1", dict(samples=0)),
            (ValueError, "samples=-1", dict(samples=-1)),
            (ValueError, "atol must be a finite number", dict(atol=float("nan"))),
            (ValueError, "external_data and inline exclude each other", dict(external_data=True, inline=True)),
            (ValueError, "bench_time needs bench=True", dict(bench_time=1.0)),
            (ValueError, "bench_runs must be at least 1", dict(bench=True, bench_runs=0)),
        ]
        for exc, msg, kwargs in cases:
            with self.assertRaisesRegex(exc, msg, msg=str(kwargs)):
                acnet_onnx.fuse(TS_FOLD, out, **kwargs)
        with self.assertRaisesRegex(TypeError, "verify\\(\\) got an unexpected keyword argument 'force'"):
            acnet_onnx.verify(TS_FOLD, DEPLOY, force=True)
        self.assertFalse(out.exists())

    def test_options_the_pipeline_refuses_raise_the_error(self):
        with self.assertRaisesRegex(acnet_onnx.Error, "-o names the input itself"):
            acnet_onnx.fuse(TS_FOLD, TS_FOLD)
        with self.assertRaises(acnet_onnx.Error) as e:
            acnet_onnx.verify(TS_FOLD, DEPLOY, input_shape={"nope": (1, 3, 32, 32)})
        self.assertIn("nope", str(e.exception))


class VerifyInspect(Case):
    def test_verify_returns_the_report_the_command_line_writes(self):
        r = acnet_onnx.verify(TS_FOLD, DEPLOY)
        self.assertIs(r["passed"], True)
        self.assertEqual(r.exit_code, 0)
        self.assertEqual((r["reference"], r["candidate"], r["samples"]), (str(TS_FOLD), str(DEPLOY), 3))
        p = cli("verify", TS_FOLD, DEPLOY, "--report", self.tmp / "cli.json")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(r, json.loads((self.tmp / "cli.json").read_text()))

        r = acnet_onnx.verify(pathlib.Path(TS_FOLD), DEPLOY.read_bytes(), atol=0, rtol=0, report=self.tmp / "r.json")
        self.assertIs(r["passed"], False)
        self.assertEqual(r.exit_code, 1)
        self.assertEqual(r["candidate"], "<candidate: bytes>")
        self.assertEqual(r, json.loads((self.tmp / "r.json").read_text()))

    def test_a_model_tract_cannot_run_whole_is_checked_in_parts(self):
        r = acnet_onnx.verify(CUT / "mid_ts_fold.onnx", CUT / "mid_deploy.onnx", samples=1)
        self.assertEqual((r.exit_code, r["passed"], r["checked"]), (0, True, True))
        self.assertEqual([(c["op"], c["domain"], c["problem"]) for c in r["cuts"]], [("Decode", "com.example.vendor", None)])
        self.assertEqual([(p["index"], p["checked"], p["passed"]) for p in r["parts"]], [(0, True, True), (1, True, True)])
        self.assertEqual([o["part"] for o in r["outputs"]], [0, 1])
        p = cli("verify", CUT / "mid_ts_fold.onnx", CUT / "mid_deploy.onnx", "--samples", "1", "--report", self.tmp / "cli.json")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(r, json.loads((self.tmp / "cli.json").read_text()))

    def test_real_inputs_from_an_npz(self):
        r = acnet_onnx.verify(TS_FOLD, DEPLOY, inputs=IO_NPZ)
        self.assertIs(r["passed"], True)
        self.assertEqual(r["samples"], 1)
        self.assertIn("io.npz", r["inputs"][0]["source"])

    @unittest.skipIf(numpy is None, "numpy is not installed")
    def test_real_inputs_as_files_and_arrays(self):
        x = numpy.load(IO_NPZ)["input"]
        numpy.save(self.tmp / "x.npy", x)
        by_file = acnet_onnx.verify(TS_FOLD, DEPLOY, input_files={"input": self.tmp / "x.npy"})
        by_array = acnet_onnx.verify(TS_FOLD, DEPLOY, input_files={"input": x})
        self.assertIs(by_file["passed"], True)
        self.assertIn("x.npy", by_file["inputs"][0]["source"])
        self.assertIn("<input_files['input']: array>", by_array["inputs"][0]["source"])
        self.assertEqual(by_file["outputs"], by_array["outputs"])
        with self.assertRaises(acnet_onnx.Error) as e:
            acnet_onnx.verify(TS_FOLD, DEPLOY, input_files={"input": x.astype("int32")})
        self.assertIn("<input_files['input']: array>", str(e.exception))
        self.assertNotIn(tempfile.gettempdir(), str(e.exception))

    def test_inspect_returns_what_inspect_json_prints(self):
        r = acnet_onnx.inspect(DYNAMO_EXT)
        self.assertEqual(r["model"], str(DYNAMO_EXT))
        self.assertEqual(len(r["analysis"]["rewrites"]), 6)
        self.assertTrue(any(i["external"] for i in r["initializers"]))
        p = cli("inspect", DYNAMO_EXT, "--json")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(r, json.loads(p.stdout))
        self.assertEqual(acnet_onnx.inspect(TS_FOLD.read_bytes())["model"], "<model: bytes>")

    @unittest.skipUnless(hasattr(os, "mkfifo"), "needs a named pipe")
    def test_the_gil_is_released_while_rust_works(self):
        # inspect reads the model from a pipe, so it waits inside the Rust code until this thread
        # writes the model: if it held the GIL, this thread could not run and the test would hang
        # (the watchdog ends the process).
        fifo = self.tmp / "model.onnx"
        os.mkfifo(fifo)
        result = []
        t = threading.Thread(target=lambda: result.append(acnet_onnx.inspect(fifo)))
        faulthandler.dump_traceback_later(120, exit=True)
        try:
            t.start()
            time.sleep(0.5)  # the other thread is now blocked in the Rust code, reading the pipe
            with open(fifo, "wb") as f:
                f.write(TS_FOLD.read_bytes())
            t.join()
        finally:
            faulthandler.cancel_dump_traceback_later()
        self.assertEqual(result[0]["analysis"]["blocks_merged"], 3)


class Package(Case):
    def test_the_stubs_and_docstrings_list_every_option(self):
        stub = pathlib.Path(acnet_onnx.__file__).with_name("__init__.pyi")
        self.assertTrue(pathlib.Path(acnet_onnx.__file__).with_name("py.typed").exists())
        functions = {f.name: f for f in ast.parse(stub.read_text()).body if isinstance(f, ast.FunctionDef)}
        self.assertEqual(set(functions), {"fuse", "verify", "inspect"})
        for name, options in [("fuse", _native.FUSE_OPTIONS), ("verify", _native.VERIFY_OPTIONS)]:
            stubbed = [a.arg for a in functions[name].args.kwonlyargs]
            self.assertEqual(sorted(stubbed), sorted(options), name)
            doc = getattr(acnet_onnx, name).__doc__
            for option in options:
                self.assertRegex(doc, rf"\b{option}\b", f"{name}.__doc__ lacks {option}")

    def test_version(self):
        p = cli("--version")
        self.assertEqual((p.returncode, p.stdout), (0, f"acnet-onnx {acnet_onnx.__version__}\n"))


class Command(Case):
    def test_exit_codes(self):
        out = self.tmp / "deploy.onnx"
        p = cli("fuse", TS_FOLD, "-o", out)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("EQUIVALENT", p.stdout)
        self.assertIn(f"wrote {out}", p.stdout)
        self.assertEqual(p.stderr, "")
        p = cli("verify", TS_FOLD, out, "--atol", "0", "--rtol", "0")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("NOT EQUIVALENT", p.stdout)
        p = cli("verify", TS_FOLD, out)
        self.assertEqual(p.returncode, 0, p.stderr)
        p = cli("inspect", self.tmp / "missing.onnx")
        self.assertEqual(p.returncode, 2)
        self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)
        self.assertIn("missing.onnx", p.stderr)
        p = cli("fuse", TS_FOLD, "--bogus")
        self.assertEqual(p.returncode, 2)
        self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)
        self.assertIn("--bogus", p.stderr)

    def test_python_dash_m(self):
        p = subprocess.run([sys.executable, "-m", "acnet_onnx", "inspect", TS_FOLD], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("blocks that fuse would rewrite", p.stdout)


if __name__ == "__main__":
    unittest.main()
