# The Rust extension (src/python.rs); use the functions of the package instead.
import os
from collections.abc import Mapping
from typing import Any

from . import Error as Error

__version__: str
FUSE_OPTIONS: list[str]
VERIFY_OPTIONS: list[str]

def fuse(
    input: str | os.PathLike[str], output: str | os.PathLike[str], options: Mapping[str, Any] | None = None
) -> tuple[str, int, list[str], list[str]]: ...
def verify(
    reference: str | os.PathLike[str], candidate: str | os.PathLike[str], options: Mapping[str, Any] | None = None
) -> tuple[str, int]: ...
def inspect(model: str | os.PathLike[str]) -> str: ...
def main(args: list[str]) -> int: ...
