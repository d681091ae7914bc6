"""Fuse structurally re-parameterised CNN blocks (ACNet, RepVGG, MobileOne, DBB, ...) in ONNX
models into plain convolutions, and prove in tract that the fused model computes the same function.

    import acnet_onnx

    report = acnet_onnx.fuse("model.onnx", "deploy.onnx")   # writes deploy.onnx if equivalent
    if not report["passed"]:
        raise SystemExit("fused model is not equivalent")

The three functions are the command line's three commands, and their keyword arguments are the
command line's flags in snake_case (``--input-shape`` is ``input_shape``, ``--no-verify`` is
``verify=False``); ``None`` leaves an option at its default. Each returns a :class:`Report`: the
JSON report of ``--report`` (``inspect --json``) as a dict. Models are paths (``str`` or
``os.PathLike``), a model's bytes, or an ``onnx.ModelProto`` (written to a temporary folder).

Errors (an unreadable or invalid model, an operator tract cannot run, ...) raise
:class:`acnet_onnx.Error` with the one-line message the command line prints; a wrong option raises
``TypeError`` (unknown name, wrong type) or ``ValueError`` (a value out of range). A fused model
that is not equivalent is not an error: ``fuse`` returns its report (``passed`` False) and writes
nothing. The GIL is released while the Rust code runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings as _warnings

from . import _native
from ._native import Error

__all__ = ["fuse", "verify", "inspect", "Report", "Error", "FuseWarning", "__version__"]

__version__: str = _native.__version__


class FuseWarning(UserWarning):
    """What ``fuse`` warns about: a model written although not equivalent (``force=True``) or
    although a part the rewrite changed could not be checked (``allow_unchecked=True``), not
    written because it is not equivalent or could not be checked, or no latency measured
    (``bench=True``)."""


class Report(dict):
    """The JSON report as a dict: exactly what the command line's ``--report`` writes (``inspect
    --json`` for :func:`inspect`), with ``passed`` True, False, or None when not checked.

    Attributes:
        exit_code: the command line's exit code for this result: 0 written / equivalent, 1 not
            equivalent (and, for ``fuse``, nothing written), 2 a part of the models in which they
            differ could not be checked (cut off by nodes tract cannot run; ``fuse`` wrote
            nothing).
        written: the files ``fuse`` wrote (the model, then its external data file if any); empty
            when nothing was written.
        warnings: the warnings of ``fuse``, one line each (also issued as :class:`FuseWarning`).
    """

    def __init__(self, data=(), exit_code=0, written=(), warnings=()):
        super().__init__(data)
        self.exit_code = exit_code
        self.written = list(written)
        self.warnings = list(warnings)


class _Files(contextlib.ExitStack):
    """Models given as bytes or ``onnx.ModelProto`` and arrays given as inputs, written to a
    temporary folder for the Rust code, whose paths are replaced by a label such as
    ``<input: bytes>`` in messages and reports."""

    def __init__(self):
        super().__init__()
        self._dir = None
        self.labels = {}

    def _path(self, name):
        if self._dir is None:
            self._dir = self.enter_context(tempfile.TemporaryDirectory(prefix="acnet-onnx-"))
        return os.path.join(self._dir, name)

    def model(self, source, param):
        if isinstance(source, (str, os.PathLike)):
            return source
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, kind = bytes(source), "bytes"
        elif hasattr(source, "SerializeToString"):
            if _has_external_data(source):
                raise ValueError(
                    f"{param}: the ModelProto's weights are in external data files it does not hold; "
                    "pass the model's path instead, or load it with onnx.load (which reads them in)"
                )
            data, kind = source.SerializeToString(), "onnx.ModelProto"
        else:
            raise TypeError(
                f"{param}: expected a path (str or os.PathLike), the model's bytes or an onnx.ModelProto, "
                f"got {type(source).__name__}"
            )
        path = self._path(f"{param}.onnx")
        with open(path, "wb") as f:
            f.write(data)
        self.labels[path] = f"<{param}: {kind}>"
        return path

    def options(self, options):
        files = options.get("input_files")
        if files is None or not hasattr(files, "items"):
            return options
        paths = {}
        for name, value in files.items():
            if isinstance(value, (str, os.PathLike)):
                paths[name] = value
                continue
            try:
                import numpy
            except ImportError:
                raise TypeError(
                    f"input_files[{name!r}]: expected the path of a .npy file, got {type(value).__name__}"
                ) from None
            path = self._path(f"input-{len(self.labels)}.npy")
            numpy.save(path, numpy.asarray(value))
            self.labels[path] = f"<input_files[{name!r}]: array>"
            paths[name] = path
        return {**options, "input_files": paths}

    def relabel(self, value):
        """``value`` (a report, or a message) with every temporary path replaced by its label."""
        if not self.labels:
            return value
        if isinstance(value, str):
            for path, label in self.labels.items():
                value = value.replace(path, label)
            return value
        if isinstance(value, dict):
            return {k: self.relabel(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.relabel(v) for v in value]
        return value

    def report(self, report, path):
        """Rewrite the report file at ``path`` (if any) with the labels in place of temporary paths."""
        if not self.labels or path is None:
            return
        tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def error(self, e):
        """``e`` with its message relabelled (the same exception when there is nothing to relabel)."""
        msg = str(e)
        new = self.relabel(msg)
        if new == msg:
            return e
        err = Error(new)
        err.exit_code = e.exit_code
        return err


def _has_external_data(model) -> bool:
    graph = getattr(model, "graph", None)
    return any(getattr(t, "data_location", 0) == 1 for t in getattr(graph, "initializer", ()))


def fuse(input, output, *, verify=True, **options) -> Report:
    """Fuse every re-parameterisable block of ``input`` into one Conv, check the result against
    ``input`` in tract, and write it to ``output`` (as ``acnet-onnx fuse INPUT -o OUTPUT``).

    Nothing is written when the check fails (unless ``force=True``): the report then has
    ``passed`` False, ``exit_code`` 1 and ``written`` empty, and a :class:`FuseWarning` says so.
    A model holding nodes tract cannot run is checked in parts around them (``parts``, ``cuts``);
    when a part the rewrite changed cannot run, nothing is written either (``exit_code`` 2)
    unless ``allow_unchecked=True``.
    The input is never modified (unless ``in_place=True`` and ``output`` names it).

    Args:
        input: the model: a path, the model's bytes, or an ``onnx.ModelProto``.
        output: where to write the fused model (``<output>.data`` too with external data).
        verify: check the fused model against the input (``verify=False`` is ``--no-verify``;
            ``passed`` is then None).

    Keyword options (the ``fuse`` flags; ``None`` keeps the default):
        external_data (bool): write the weights to ``<output>.data`` (default: as the input came).
        inline (bool): write every weight inside the model file.
        force (bool): write the output even when the check fails (with a warning).
        in_place (bool): allow ``output`` to be the input itself.
        report (path): also write the JSON report to this file.
        bench (bool): measure tract's latency before and after fusion (``report["bench"]``).
        bench_time (float): with ``bench``: seconds of timed runs per model (default 1).
        bench_runs (int): with ``bench``: most timed runs per model (default 50).
        seed, samples, criterion, noise_factor, atol, rtol, stat, input_shape, input_files,
            inputs, save_outputs, load_outputs, eval_bn, freeze_initializers, allow_unchecked,
            progress: the check's options, as in :func:`verify`.

    Returns:
        the report of ``--report``: the check (``passed``, ``outputs``, ...), ``verified``,
        ``fuse`` (blocks merged, rewrites, refusals and their reasons, counts before and after)
        and ``bench``.

    Raises:
        Error: the model cannot be read or fused, or the check cannot run (exit code 2).
    """
    with _Files() as files:
        path = files.model(input, "input")
        opts = files.options({"verify": verify, **options})
        try:
            text, code, written, warns = _native.fuse(path, output, opts)
        except Error as e:
            raise files.error(e) from None
        report = Report(files.relabel(json.loads(text)), code, (str(p) for p in written), files.relabel(warns))
        files.report(report, options.get("report"))
        if not report.written:
            name = input if isinstance(input, (str, os.PathLike)) else files.labels[path]
            if report.exit_code == 2:
                unchecked = "; ".join(
                    f"part {p['index']}: {p['problem']}"
                    for p in report.get("parts") or []
                    if not p["checked"] and p["identical"] is not True
                )
                report.warnings.append(
                    f"{os.fsdecode(name)}: the rewrite could not be checked where it changed the model "
                    f"({unchecked}); nothing written (allow_unchecked=True writes it anyway)"
                )
            else:
                report.warnings.append(
                    f"{os.fsdecode(name)}: the fused model is not equivalent to the input; nothing written "
                    "(force=True writes anyway)"
                )
    for w in report.warnings:
        _warnings.warn(w, FuseWarning, stacklevel=2)
    return report


def verify(reference, candidate, **options) -> Report:
    """Run both models in tract on the same inputs and compare every output (as
    ``acnet-onnx verify REFERENCE CANDIDATE``): by default an output passes when it is no further
    from the reference than ``noise_factor`` times the reference's own rounding noise; with
    ``atol``/``rtol`` an element passes when ``|a - b| <= atol + rtol * |a|`` (a = reference).

    Args:
        reference, candidate: the models: paths, bytes, or ``onnx.ModelProto``s.

    Keyword options (the ``verify`` flags; ``None`` keeps the default):
        seed (int): seed of the random inputs (default 0).
        samples (int): number of random input sets (default 3).
        criterion (str): ``"noise"`` (the default) or ``"tolerance"`` (implied by ``atol``,
            ``rtol`` or ``stat``).
        noise_factor (float): noise criterion: how many times the reference's rounding noise an
            output may be off.
        atol (float or mapping): absolute tolerance (default 1e-4), or ``{output: atol}``.
        rtol (float or mapping): relative tolerance (default 1e-4), or ``{output: rtol}``.
        stat (str): the error statistic: ``"elementwise"`` (default), ``"max"``, ``"mean"``,
            ``"median"`` or ``"quantile:Q"``.
        input_shape (mapping): shapes of inputs with symbolic dims, ``{"input": (1, 3, 224, 224)}``
            (``--input-shape input:1,3,224,224``); a dim left symbolic is 1.
        input_files (mapping): real input data, ``{"input": "x.npy"}`` or a numpy array per input
            (``--input input=x.npy``).
        inputs (path): real input data: an .npz whose arrays are named like the graph inputs.
        save_outputs (path): write the inputs and the reference's outputs (first sample) to an .npz.
        load_outputs (path): compare the candidate with golden outputs from this .npz (made
            elsewhere from the inputs given with ``inputs``/``input_files``).
        eval_bn (bool): run training-mode BatchNormalization and Dropout in their inference forms.
        freeze_initializers (bool): treat initializers that are also graph inputs as constants.
        allow_unchecked (bool): accept a check that could not run a part of the models (cut off
            by nodes tract cannot run) in which they differ: ``exit_code`` 0 instead of 2, and
            ``fuse`` writes the output with a warning.
        report (path): also write the JSON report to this file.
        progress (bool): print progress on stderr when the check takes over a second (the
            command line always does).

    A model holding nodes tract cannot run (an operator it has no implementation of, a custom
    domain) is cut at them: each part between the cuts is checked as a model of its own
    (``parts``), the cut nodes must be the same in both models (``cuts``).

    Returns:
        the report of ``--report``: ``passed``, the tolerances, the inputs, and per output the
        max abs / rel diff, the worst element and whether it passed; ``exit_code`` 0 when
        equivalent, 1 when not, 2 when a part in which the models differ could not run.

    Raises:
        Error: a model cannot be read or run, the signatures differ, a bad input file (exit code 2).
    """
    with _Files() as files:
        paths = files.model(reference, "reference"), files.model(candidate, "candidate")
        opts = files.options(options)
        try:
            text, code = _native.verify(*paths, opts)
        except Error as e:
            raise files.error(e) from None
        report = Report(files.relabel(json.loads(text)), code)
        files.report(report, options.get("report"))
        return report


def inspect(model) -> Report:
    """What ``fuse`` would do to ``model`` (the blocks, the refused candidates and their reasons) and
    its initializers, as ``acnet-onnx inspect MODEL --json``; writes nothing.

    Args:
        model: a path, the model's bytes, or an ``onnx.ModelProto``.

    Returns:
        ``model`` (its path), ``analysis`` (as ``fuse`` in the fuse report) and ``initializers``
        (name, shape, dtype, external).

    Raises:
        Error: the model cannot be read (exit code 2).
    """
    with _Files() as files:
        path = files.model(model, "model")
        try:
            text = _native.inspect(path)
        except Error as e:
            raise files.error(e) from None
        return Report(files.relabel(json.loads(text)))
