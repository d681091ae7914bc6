# Type stubs: the keyword options of fuse and verify, as the command line's flags in snake_case.
# An option added to the tables of src/python.rs needs its line here (the tests check it).
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

StrPath = Union[str, os.PathLike[str]]
# a path, the model's bytes, or an onnx.ModelProto (anything with SerializeToString)
ModelSource = Union[StrPath, bytes, bytearray, memoryview, Any]

__version__: str

class Error(Exception):
    """acnet-onnx could not do it; ``str(e)`` is the command line's one-line message."""

    exit_code: int
    """The command line's exit code for this error (2)."""

class FuseWarning(UserWarning):
    """A model written although not equivalent or not checked, not written, or not benched."""

class Report(dict[str, Any]):
    """The JSON report of ``--report`` (``inspect --json``) as a dict."""

    exit_code: int
    """0 written / equivalent; 1 not equivalent, 2 not checked (``fuse``: nothing written)."""
    written: list[str]
    """The files ``fuse`` wrote (the model, then its data file); empty when nothing was written."""
    warnings: list[str]
    """The warnings of ``fuse``, one line each."""
    def __init__(
        self,
        data: Mapping[str, Any] = ...,
        exit_code: int = 0,
        written: Sequence[str] = (),
        warnings: Sequence[str] = (),
    ) -> None: ...

def fuse(
    input: ModelSource,
    output: StrPath,
    *,
    verify: bool = True,
    external_data: bool | None = None,
    inline: bool | None = None,
    force: bool | None = None,
    in_place: bool | None = None,
    report: StrPath | None = None,
    bench: bool | None = None,
    bench_time: float | None = None,
    bench_runs: int | None = None,
    seed: int | None = None,
    samples: int | None = None,
    criterion: Literal["noise", "tolerance"] | None = None,
    noise_factor: float | None = None,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    stat: str | None = None,
    input_shape: Mapping[str, Sequence[int]] | None = None,
    input_files: Mapping[str, Any] | None = None,
    inputs: StrPath | None = None,
    save_outputs: StrPath | None = None,
    load_outputs: StrPath | None = None,
    eval_bn: bool | None = None,
    freeze_initializers: bool | None = None,
    allow_unchecked: bool | None = None,
    progress: bool | None = None,
) -> Report:
    """Fuse every re-parameterisable block into one Conv, check the result in tract, write it.

    Nothing is written when the check fails (``passed`` False, ``exit_code`` 1) unless
    ``force=True``, nor when a part the rewrite changed cannot run in tract (``exit_code`` 2)
    unless ``allow_unchecked=True``. ``verify=False`` skips the check; ``external_data``/``inline``
    choose how weights are stored; ``bench`` measures tract's latency before and after; the
    check's options are those of ``verify``.
    Raises Error (exit code 2) when the model cannot be read or fused, or the check cannot run.
    """

def verify(
    reference: ModelSource,
    candidate: ModelSource,
    *,
    report: StrPath | None = None,
    seed: int | None = None,
    samples: int | None = None,
    criterion: Literal["noise", "tolerance"] | None = None,
    noise_factor: float | None = None,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    stat: str | None = None,
    input_shape: Mapping[str, Sequence[int]] | None = None,
    input_files: Mapping[str, Any] | None = None,
    inputs: StrPath | None = None,
    save_outputs: StrPath | None = None,
    load_outputs: StrPath | None = None,
    eval_bn: bool | None = None,
    freeze_initializers: bool | None = None,
    allow_unchecked: bool | None = None,
    progress: bool | None = None,
) -> Report:
    """Run both models in tract on the same inputs and compare every output element-wise.

    ``criterion``: "noise" (default: within ``noise_factor`` times the reference's own rounding
    noise) or "tolerance" (``|a - b| <= atol + rtol * |a|``, implied by ``atol``, ``rtol`` or
    ``stat``; a number, or {output: number}). ``seed``/``samples`` (0, 3) make the random inputs,
    ``input_shape`` ({name: dims}) sets symbolic dims, ``input_files`` ({name: .npy path or
    array}) or ``inputs`` (.npz) give real data; ``save_outputs``/``load_outputs`` (.npz) keep or
    compare with golden outputs; ``eval_bn``, ``freeze_initializers``, ``allow_unchecked`` as the
    flags. Around nodes tract cannot run the models are checked in parts (``parts``, ``cuts``).
    ``exit_code`` is 0 when equivalent, 1 when not, 2 when a part in which they differ could not
    run. Raises Error (exit code 2) when a model cannot be read or
    run, or the signatures differ.
    """

def inspect(model: ModelSource) -> Report:
    """The blocks ``fuse`` would rewrite, refused candidates with their reasons, and the
    initializers (``inspect --json``); writes nothing."""
