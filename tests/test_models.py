"""Registry, every family and variant, inference from keys, anatomy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from auditor.errors import ArchitectureError, CheckpointError, Remedy
from auditor.models.anatomy import analyze_anatomy
from auditor.models.infer import infer_architecture
from auditor.models.load import load_checkpoint, load_model
from auditor.models.registry import build_model, get_arch, list_models
from auditor.models.torchvision_resnet import TORCHVISION_CONFIGS

from conftest import CHECKPOINTS, needs_shared, save_safetensors

VARIANTS = ["", "_nobn", "_plain", "_plain_nobn"]


def _meta_state(name: str, num_classes: int = 7) -> dict[str, torch.Tensor]:
    """State dict with the right keys and shapes, without allocating weights."""
    with torch.device("meta"):
        model = get_arch(name).builder(num_classes)
    return model.state_dict()


def test_registry_lists_every_family_and_variant() -> None:
    names = set(list_models())
    for base in TORCHVISION_CONFIGS:
        assert {base + v for v in VARIANTS} <= names
    for depth in (20, 32, 44, 56, 110, 1202):
        assert {f"resnet{depth}{v}" for v in VARIANTS} <= names
        assert f"resnet{depth}_optb" in names and f"resnet{depth}_optb_nobn" in names


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ArchitectureError, match="resnet20.*resnet50"):
        get_arch("resnet21")


@pytest.mark.parametrize("base", list(TORCHVISION_CONFIGS))
def test_torchvision_inference_round_trip(base: str) -> None:
    for variant in ("", "_nobn", "_plain_nobn"):
        name = base + variant
        inferred = infer_architecture(_meta_state(name))
        assert inferred.arch == name, inferred.reason
        assert inferred.num_classes == 7


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110, 1202])
def test_cifar_inference_round_trip(depth: int) -> None:
    variants = ("",) if depth == 1202 else ("", "_nobn", "_optb", "_optb_nobn")
    for variant in variants:
        name = f"resnet{depth}{variant}"
        inferred = infer_architecture(_meta_state(name, 10))
        assert inferred.arch == name
        assert f"{depth}" in inferred.reason


def test_plain_cifar_is_ambiguous_and_says_so() -> None:
    # Option-A and plain CIFAR nets have identical keys: inference picks the
    # residual one and its reason tells the user how to ask for the plain one.
    inferred = infer_architecture(_meta_state("resnet20_plain", 10))
    assert inferred.arch == "resnet20"
    assert "_plain" in inferred.reason


def test_uninferable_names_what_it_found() -> None:
    state = {"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.weight": torch.zeros(10, 8)}
    with pytest.raises(ArchitectureError, match="no residual stages.*features.0.weight") as info:
        infer_architecture(state)
    assert info.value.remedy == Remedy("arch", None) and "arch=..." in info.value.one_line()


@pytest.mark.parametrize(
    "name, blocks, shortcuts, stages",
    [
        ("resnet18", 8, {"identity", "projection"}, ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("resnet50", 16, {"identity", "projection"}, ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("resnet50_plain", 16, {"none"}, ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("resnext50_32x4d_nobn", 16, {"identity", "projection"}, ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("resnet20", 9, {"identity", "option_a"}, ["stem", "layer1", "layer2", "layer3"]),
        ("resnet20_optb", 9, {"identity", "projection"}, ["stem", "layer1", "layer2", "layer3"]),
        ("resnet20_plain_nobn", 9, {"none"}, ["stem", "layer1", "layer2", "layer3"]),
    ],
)
def test_anatomy_of_registered_models(name: str, blocks: int, shortcuts: set[str], stages: list[str]) -> None:
    model, spec = build_model(name, 10)
    size = 64 if spec.family == "torchvision" else 32
    anatomy = analyze_anatomy(model, (3, size, size))
    assert len(anatomy.blocks) == blocks
    assert {b.shortcut for b in anatomy.blocks} == shortcuts
    assert [s.name for s in anatomy.stages] == stages
    bottleneck = "50" in name
    assert all(len(b.convs) == (3 if bottleneck else 2) for b in anatomy.blocks)
    assert all(b.batchnorm == spec.batchnorm for b in anatomy.blocks)
    # Every stage shape is what an independent forward hook sees.
    seen = {}
    modules = dict(model.named_modules())
    handles = [
        modules[s.module_path].register_forward_hook(
            lambda m, i, o, n=s.name: seen.setdefault(n, tuple(o.shape[1:])) and None
        )
        for s in anatomy.stages if s.hook == "output"
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    for stage in anatomy.stages:
        if stage.hook == "output":
            assert seen[stage.name] == stage.shape
    # Down-sampling blocks are the first of layer2.. and are strided.
    for block in anatomy.blocks:
        strided = any(c.stride != (1, 1) for c in block.convs)
        assert strided == (block.output_shape[1] < block.input_shape[1])


def test_option_a_parameters_found_by_probing() -> None:
    model, _ = build_model("resnet20", 10)
    anatomy = analyze_anatomy(model, (3, 32, 32))
    down = [b for b in anatomy.blocks if b.shortcut == "option_a"]
    assert [b.name for b in down] == ["layer2.0", "layer3.0"]
    assert down[0].option_a.stride == 2 and down[0].option_a.pad_before == 8
    assert down[0].option_a.out_channels == 32


def test_layer_input_shapes_match_forward_hooks() -> None:
    model, _ = build_model("resnet18", 10)
    anatomy = analyze_anatomy(model, (3, 64, 48))
    conv1 = anatomy.layer("conv1")
    assert conv1.input_shape == (3, 64, 48) and conv1.output_shape == (64, 32, 24)
    assert anatomy.layer("fc").input_shape == (512,)
    assert anatomy.penultimate is not None and anatomy.penultimate.module_path == "fc"


def test_input_size_the_network_cannot_take(resnet4b_file: Path) -> None:
    model, _ = build_model(f"{resnet4b_file}:resnet4b")
    with pytest.raises(ArchitectureError, match="cannot take input size 64x64"):
        analyze_anatomy(model, (3, 64, 64))


def test_plain_cnn_without_blocks_uses_shape_tracing() -> None:
    model = nn.Sequential()
    model.add_module("c1", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("r1", nn.ReLU())
    model.add_module("p1", nn.MaxPool2d(2))
    model.add_module("c2", nn.Conv2d(8, 8, 3, padding=1))
    model.add_module("p2", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8, 3))
    anatomy = analyze_anatomy(model, (3, 16, 16))
    assert anatomy.blocks == ()
    assert [s.name for s in anatomy.stages] == ["r1", "c2"]
    assert anatomy.notes


def test_strict_key_matching_names_missing_and_unexpected(tmp_path: Path) -> None:
    model, _ = build_model("resnet8", 10)
    path = save_safetensors(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: conv1.bias.*unexpected keys: bn1"):
        load_model(load_checkpoint(path), "resnet8_nobn")
    other, _ = build_model("resnet8", 5)
    wrong = save_safetensors(other, tmp_path / "five.safetensors", num_classes="10")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*linear.weight \(5, 64\) vs \(10, 64\)"):
        load_model(load_checkpoint(wrong), "resnet8")


def test_metadata_arch_is_used(tmp_path: Path) -> None:
    model, _ = build_model("resnet8_plain", 10)
    path = save_safetensors(model, tmp_path / "m.safetensors", arch="resnet8_plain", num_classes="10")
    loaded = load_model(load_checkpoint(path))
    assert loaded.arch == "resnet8_plain" and loaded.arch_source == "metadata"


def test_user_factory_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ArchitectureError, match="does not exist"):
        build_model(f"{tmp_path}/none.py:f")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ArchitectureError, match="boom"):
        build_model(f"{broken}:f")
    ok = tmp_path / "ok.py"
    ok.write_text("def f():\n    return 3\n")
    with pytest.raises(ArchitectureError, match="not an nn.Module"):
        build_model(f"{ok}:f")
    with pytest.raises(ArchitectureError, match="no callable 'g'"):
        build_model(f"{ok}:g")


@needs_shared
@pytest.mark.parametrize(
    "name, arch, blocks",
    [
        ("cifar10-resnet20-akamaster.th", "resnet20", 9),
        ("cifar10-resnet20-akamaster.safetensors", "resnet20", 9),
        ("cifar10-resnet56-akamaster.th", "resnet56", 27),
    ],
)
def test_real_checkpoints_are_recognised(name: str, arch: str, blocks: int) -> None:
    loaded = load_model(load_checkpoint(CHECKPOINTS / name))
    assert loaded.arch == arch and loaded.arch_source == "inferred"
    anatomy = analyze_anatomy(loaded.model, (3, 32, 32))
    assert len(anatomy.blocks) == blocks
    assert sum(b.shortcut == "option_a" for b in anatomy.blocks) == 2


@needs_shared
def test_real_resnet4b_with_user_factory(resnet4b_file: Path) -> None:
    checkpoint = load_checkpoint(CHECKPOINTS / "cifar10-resnet4b-nobn-abcrown.pth")
    with pytest.raises(ArchitectureError, match="cannot infer"):
        load_model(checkpoint)
    loaded = load_model(checkpoint, f"{resnet4b_file}:resnet4b")
    anatomy = analyze_anatomy(loaded.model, (3, 32, 32))
    assert [b.shortcut for b in anatomy.blocks] == ["projection", "identity", "projection", "identity"]
    assert not any(b.batchnorm for b in anatomy.blocks)
    assert [s.name for s in anatomy.stages] == ["stem", "layer1", "layer2"]
    assert anatomy.penultimate.module_path == "linear1"
    # Strict matching really loaded the weights: compare one tensor.
    assert torch.equal(loaded.model.linear2.weight, checkpoint.state_dict["linear2.weight"])
