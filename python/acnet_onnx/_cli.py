"""The ``acnet-onnx`` command that ``pip install`` puts on PATH: the command line of the Rust
binary, run by the extension (same arguments, output, messages and exit codes)."""

import signal
import sys

from . import _native


def main() -> None:
    # Ctrl-C ends the run as it ends the binary: Python's own handler would only set a flag that
    # nothing looks at while the Rust code runs.
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_native.main(["acnet-onnx", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
