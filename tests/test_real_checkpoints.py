"""The numbers resdyn prints for real third-party checkpoints, checked independently."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from auditor.tasks.condition import condition
from auditor.subject import open_subject

from conftest import CHECKPOINTS, CIFAR_IMAGES, needs_shared, run_json

pytestmark = needs_shared
IMAGENET = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


def _linearized_block(block: nn.Module) -> nn.Module:
    """The block with circular padding, BatchNorm as a pure per-channel scale, ReLU removed."""
    block = copy.deepcopy(block).double()

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = block.conv1, block.conv2
            for conv in (self.conv1, self.conv2):
                conv.padding_mode = "circular"
                conv.bias = None
            self.s1 = block.bn1.weight / torch.sqrt(block.bn1.running_var + block.bn1.eps)
            self.s2 = block.bn2.weight / torch.sqrt(block.bn2.running_var + block.bn2.eps)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv1(x) * self.s1[None, :, None, None]
            y = self.conv2(y) * self.s2[None, :, None, None]
            return y + x

    return Linear()


def test_real_resnet20_block_matches_the_dense_operator() -> None:
    # At 16x16 input layer3 works on 4x4 maps: a 1024 x 1024 dense operator.
    subject = open_subject(CHECKPOINTS / "cifar10-resnet20-akamaster.th", input_size=(16, 16))
    report = condition(subject)
    entry = next(b for b in report.block_entries() if b["name"] == "layer3.1")
    linear = _linearized_block(subject.loaded.model.layer3[1])
    n = 64 * 4 * 4
    with torch.no_grad():
        matrix = linear(torch.eye(n, dtype=torch.float64).reshape(n, 64, 4, 4)).reshape(n, n).T
    values = np.linalg.svd(matrix.numpy(), compute_uv=False)
    assert entry["kappa_linear_residual"] == pytest.approx(values[0] / values[-1], rel=1e-6)
    assert entry["sigma_linear_residual"][0] == pytest.approx(values[0], rel=1e-8)


def test_real_checkpoints_conditioning_is_sane() -> None:
    for name in ("cifar10-resnet20-akamaster.th", "cifar10-resnet56-akamaster.th"):
        report = condition(open_subject(CHECKPOINTS / name))
        for block in report.blocks:
            assert block.lemma1_upper_holds is True
            for kappa in (block.kappa_linear_residual, block.kappa_paper_residual):
                assert kappa is None or kappa >= 1
        for layer in report.layers:
            assert layer.sigma_max >= layer.sigma_min >= 0


def test_real_resnet4b_without_batchnorm(resnet4b_file: Path, capsys) -> None:
    doc = run_json(["condition", CHECKPOINTS / "cifar10-resnet4b-nobn-abcrown.pth", "--arch", f"{resnet4b_file}:resnet4b"], capsys)
    assert [b["shortcut"] for b in doc["blocks"]] == ["projection", "identity", "projection", "identity"]
    assert all(layer["batchnorm_folded"] is None for layer in doc["layers"])


def test_real_resnet20_audit_with_cifar_images(capsys) -> None:
    doc = run_json(["audit", CHECKPOINTS / "cifar10-resnet20-akamaster.th", "--data", CIFAR_IMAGES, *IMAGENET,
                    "--per-class", "6", "--samples", "8", "--directions", "2", "--power-iterations", "2"], capsys)
    stages = {s["name"]: s for s in doc["stages"]}
    # Classes separate with depth on a trained network: the final features beat the stem.
    assert stages["penultimate"]["separation"] > stages["stem"]["separation"]
    assert doc["stability"]["trajectory"]["flips"] <= doc["stability"]["trajectory"]["runs"]
