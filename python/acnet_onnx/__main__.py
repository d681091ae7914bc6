"""``python -m acnet_onnx ...`` runs the command line, as the ``acnet-onnx`` command does."""

from ._cli import main

main()
