#!/usr/bin/env python3
"""Write small seed models for the cargo-fuzz target into fuzz/seeds/.

The fixtures are 20-400 KB each and a fuzz execution on them takes tens of milliseconds (most of
it in verifying regions on 32x32 inputs). These seeds hold one re-parameterisable block each
(2 channels in, 2 out, a 1x2x6x6 input), so an execution takes well under a millisecond, while
every block kind and export style of fixtures/generate.py (whose block classes this imports) is
still represented: the rules see the same graph shapes as on the fixtures.

Usage (torch, onnx, onnxscript as pinned in fixtures/requirements.txt):
    /tmp/fx/bin/python fuzz/make_seeds.py
"""

import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import generate as g  # noqa: E402

BLOCKS = {
    "acb": lambda: g.ACBlock(2, 2, 3, padding=1),
    "acb_crop": lambda: g.ACBlock(2, 2, 3, padding=0),
    "acb_lastbn": lambda: g.ACBlock(2, 2, 5, padding=1, use_last_bn=True),
    "acb_g2_noaffine": lambda: g.ACBlock(2, 2, 3, padding=1, groups=2, use_affine=False),
    "acb_dilated_s2": lambda: g.ACBlock(2, 2, 3, stride=2, padding=2, dilation=2),
    "acb_3on5": lambda: g.ACBlock(2, 2, 5, padding=2, k_asym=3),
    "repvgg": lambda: g.RepVGGBlock(2, 2, stride=1),
    "dbb": lambda: g.DiverseBranchBlock(2, 2, 3, padding=1),
    "mobileone": lambda: g.MobileOneBlock(2, 2, 3, stride=1, padding=1),
    "qarepvgg": lambda: g.QARepVGGBlock(2, 2),
    "conv2": lambda: g.Conv2(2, 2),
    "repopt": lambda: g.LinearAddBlock(2, 2),
}
# TorchScript exports of a DBB are ~1,000 nodes of shape arithmetic even for one block: seeded
# by the dynamo export only, to keep executions fast.
STYLES = {"ts_fold", "ts_nofold_op11", "dynamo_inline"}


def main():
    out = os.path.join(HERE, "seeds")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    x = torch.randn((1, 2, 6, 6), generator=torch.Generator().manual_seed(0))
    for i, (name, make) in enumerate(BLOCKS.items()):
        torch.manual_seed(i)
        model = make()
        g.randomise(model, torch.Generator().manual_seed(i))
        model.eval()
        for style in sorted(STYLES):
            if name == "dbb" and style.startswith("ts_"):
                continue
            path = os.path.join(out, f"{name}_{style}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g.export_style(style, model, model, x, path)
            print(f"{path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
