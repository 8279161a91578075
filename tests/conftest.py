"""Shared test helpers: paths to real data, tiny checkpoints, CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CHECKPOINTS = SHARED / "checkpoints"
CIFAR_IMAGES = SHARED / "images" / "cifar10-test-200"
FIXTURES = ROOT / "fixtures"

needs_shared = pytest.mark.skipif(
    not CHECKPOINTS.is_dir(), reason=f"real third-party data not present at {SHARED}"
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


RESNET4B_SOURCE = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride))

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet4B(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.layer1 = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1))
        self.layer2 = nn.Sequential(Block(32, 32, 2), Block(32, 32, 1))
        self.linear1 = nn.Linear(512, 100)
        self.linear2 = nn.Linear(100, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.layer2(self.layer1(x))
        return self.linear2(F.relu(self.linear1(x.flatten(1))))


def resnet4b():
    return ResNet4B()
'''


@pytest.fixture
def resnet4b_file(tmp_path: Path) -> Path:
    """Our own definition of the ResNet-4B of ../shared/data/README.md."""
    path = tmp_path / "resnet4b.py"
    path.write_text(RESNET4B_SOURCE)
    return path


def save_safetensors(model: torch.nn.Module, path: Path, **metadata: str) -> Path:
    """Save a model's state dict as safetensors with string metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in metadata.items()})
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A randomly initialised resnet8 saved as safetensors with arch metadata."""
    from auditor.models.registry import build_model

    torch.manual_seed(0)
    model, _ = build_model("resnet8", 10)
    return save_safetensors(model, tmp_path / "resnet8.safetensors", arch="resnet8", num_classes="10")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run resdyn in-process; return (exit code, stdout, stderr)."""
    from auditor.cli import run

    code = run([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """Run resdyn with --format json, assert success and a single JSON document."""
    from auditor.report.document import validate

    code, out, err = run_cli([*args, "--format", "json"], capsys)
    assert code in (0, 1), err
    document = json.loads(out)
    validate(document)  # every report the tests produce must match the shipped schema
    return document
