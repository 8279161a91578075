"""The paper's Figure 1 modules (paper_plain/res/resbnN) and the CIFAR pre-activation ResNets (preactresnetN).

Each block is checked against its equation written out with torch.nn.functional
from the block's own parameters (float64, BatchNorm in eval mode with random
running statistics and affine parameters); the models against key sets and
parameter counts derived independently of the modules; the inference from
plain state dicts; and ``resdyn archs``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from auditor.errors import ArchitectureError
from auditor.models.catalog import BLOCK_EQUATIONS, PAPER_DEPTHS, TORCHVISION_CONFIGS
from auditor.models.infer import infer_architecture
from auditor.models.load import load_checkpoint, load_model
from auditor.models.paper_modules import (
    PlainPreActBlock,
    PlainPreActBottleneck,
    ResBlockNoBN,
    ResBottleneckNoBN,
    paper_resnet,
)
from auditor.models.preact_resnet import PreActBlock, PreActBottleneck, preact_resnet
from auditor.models.registry import build_model, get_arch, list_models

from conftest import run_cli, save_safetensors

PAPER_NAMES = [f"paper_{form}{depth}" for form in ("plain", "res", "resbn") for depth in PAPER_DEPTHS]
PREACT_NAMES = [f"preactresnet{depth}" for depth in PAPER_DEPTHS]


# ---------------------------------------------------------------- the equations, by hand


def _randomize(block: nn.Module, seed: int) -> nn.Module:
    """float64, eval mode, every parameter and BatchNorm statistic random (none at its default)."""
    generator = torch.Generator().manual_seed(seed)
    block = block.double().eval()
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
                module.weight.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
                module.bias.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
            elif isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.out_channels, generator=generator, dtype=torch.float64))
    return block


def _bn(x: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, training=False, eps=m.eps)


def _conv(x: torch.Tensor, m: nn.Conv2d, stride: int = 1, padding: int = 0) -> torch.Tensor:
    return F.conv2d(x, m.weight, m.bias, stride=stride, padding=padding)


def _plain_basic(b: nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    # x' = W2 σ(BN2(W1 σ(BN1 x)))
    return _conv(F.relu(_bn(_conv(F.relu(_bn(x, b.bn1)), b.conv1, s, 1), b.bn2)), b.conv2, 1, 1)


def _plain_bottleneck(b: nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    # x' = W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x)))))
    h = _conv(F.relu(_bn(x, b.bn1)), b.conv1)
    h = _conv(F.relu(_bn(h, b.bn2)), b.conv2, s, 1)
    return _conv(F.relu(_bn(h, b.bn3)), b.conv3)


def _res_basic(b: nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    # x' = σ(W2 σ(W1 x)) + x   (+ Ws x where the shape changes)
    f = _conv(F.relu(_conv(x, b.conv1, s, 1)), b.conv2, 1, 1)
    shortcut = x if b.shortcut is None else _conv(x, b.shortcut[0], s)
    return F.relu(f) + shortcut


def _res_bottleneck(b: nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    # x' = σ(W3 σ(W2 σ(W1 x))) + x
    f = _conv(F.relu(_conv(F.relu(_conv(x, b.conv1)), b.conv2, s, 1)), b.conv3)
    shortcut = x if b.shortcut is None else _conv(x, b.shortcut[0], s)
    return F.relu(f) + shortcut


def _resbn_basic(b: nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    # x' = W2 σ(BN2(W1 σ(BN1 x))) + x   (+ Ws σ(BN1 x) where the shape changes)
    a = F.relu(_bn(x, b.bn1))
    out = _conv(F.relu(_bn(_conv(a, b.conv1, s, 1), b.bn2)), b.conv2, 1, 1)
    return out + (x if b.shortcut is None else _conv(a, b.shortcut[0], s))


def _resbn_bottleneck(b: nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    # x' = W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x))))) + x
    a = F.relu(_bn(x, b.bn1))
    h = _conv(F.relu(_bn(_conv(a, b.conv1), b.bn2)), b.conv2, s, 1)
    out = _conv(F.relu(_bn(h, b.bn3)), b.conv3)
    return out + (x if b.shortcut is None else _conv(a, b.shortcut[0], s))


Formula = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]

# (form, kind) -> (block class, formula); bottlenecks output 4 * planes
BLOCKS: dict[tuple[str, str], tuple[type[nn.Module], Formula]] = {
    ("plain", "basic"): (PlainPreActBlock, _plain_basic),
    ("plain", "bottleneck"): (PlainPreActBottleneck, _plain_bottleneck),
    ("res", "basic"): (ResBlockNoBN, _res_basic),
    ("res", "bottleneck"): (ResBottleneckNoBN, _res_bottleneck),
    ("resbn", "basic"): (PreActBlock, _resbn_basic),
    ("resbn", "bottleneck"): (PreActBottleneck, _resbn_bottleneck),
}

# (in_planes, planes, stride): the identity-shaped block and the one that changes the shape
SHAPES = {"basic": [(8, 8, 1), (8, 16, 2)], "bottleneck": [(16, 4, 1), (16, 8, 2)]}


@pytest.mark.parametrize("form, kind", list(BLOCKS))
@pytest.mark.parametrize("changes_shape", [False, True], ids=["identity", "projection"])
def test_block_computes_its_equation(form: str, kind: str, changes_shape: bool) -> None:
    cls, formula = BLOCKS[form, kind]
    in_planes, planes, stride = SHAPES[kind][changes_shape]
    torch.manual_seed(1)
    block = _randomize(cls(in_planes, planes, stride), seed=2)
    x = torch.randn(2, in_planes, 9, 9, dtype=torch.float64)
    if form == "res":
        x = x.relu()  # what a block of (b) receives: the stem and every block output is non-negative
    with torch.no_grad():
        got = block(x)
        want = formula(block, x, stride)
        traced = fx.symbolic_trace(block)(x)
    out_planes = planes * cls.expansion
    assert got.shape == (2, out_planes, 5 if stride == 2 else 9, 5 if stride == 2 else 9)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(traced, got, rtol=0, atol=0)
    children = dict(block.named_children())
    if form == "plain":
        assert "shortcut" not in children and getattr(block, "shortcut", None) is None
    else:
        assert (block.shortcut is not None) == changes_shape
        if changes_shape:
            (projection,) = block.shortcut
            assert projection.kernel_size == (1, 1) and projection.stride == (stride, stride)
            assert (projection.bias is not None) == (form == "res")
    assert all(isinstance(m, nn.ReLU) for n, m in children.items() if n == "relu")
    convs = [n for n in children if n.startswith("conv")]
    norms = [n for n in children if n.startswith("bn")]
    assert convs == (["conv1", "conv2"] if kind == "basic" else ["conv1", "conv2", "conv3"])
    assert norms == ([] if form == "res" else [c.replace("conv", "bn") for c in convs])
    for bn_name, conv_name in zip(norms, convs):  # bnK normalises convK's input
        assert children[bn_name].num_features == children[conv_name].in_channels
    assert all(c.bias is not None for c in block.modules() if isinstance(c, nn.Conv2d)) == (form == "res")


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_resbn_projection_reads_the_preactivated_input(kind: str) -> None:
    cls, formula = BLOCKS["resbn", kind]
    in_planes, planes, stride = SHAPES[kind][1]
    block = _randomize(cls(in_planes, planes, stride), seed=3)
    x = torch.randn(2, in_planes, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
        main = formula(block, x, stride) - _conv(F.relu(_bn(x, block.bn1)), block.shortcut[0], stride)
        on_raw_input = main + _conv(x, block.shortcut[0], stride)
    assert not torch.allclose(got, on_raw_input, atol=1e-3)  # the test tells the two apart


@pytest.mark.parametrize("depth", [18, 50])
def test_preactresnet_blocks_compute_the_preactivation_equation(depth: int) -> None:
    torch.manual_seed(0)
    model = preact_resnet(depth)
    kind = "basic" if depth == 18 else "bottleneck"
    formula = BLOCKS["resbn", kind][1]
    for path, stride, projection in (("layer1.1", 1, False), ("layer2.0", 2, True)):
        block = _randomize(model.get_submodule(path), seed=4)
        assert (block.shortcut is not None) == projection
        x = torch.randn(1, block.bn1.num_features, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(block(x), formula(block, x, stride), rtol=1e-10, atol=1e-10)


def test_models_end_with_final_norm_only_for_preactivation_forms() -> None:
    x = torch.randn(1, 3, 32, 32)
    for form in ("plain", "res", "resbn"):
        torch.manual_seed(0)
        model = paper_resnet(form, 18, num_classes=10).eval()
        assert (model.bn is not None) == (form != "res")
        assert isinstance(model.bn1, nn.BatchNorm2d) == (form != "res")
        assert (model.conv1.bias is not None) == (form == "res")
        # the forward is stem -> stages -> [bn, relu] -> pool -> fc, written out
        with torch.no_grad():
            h = model.maxpool(F.relu(model.bn1(model.conv1(x))))
            h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
            if model.bn is not None:
                h = F.relu(_bn(h, model.bn))
            want = model.fc(h.mean((2, 3)))
            torch.testing.assert_close(model(x), want)
            torch.testing.assert_close(fx.symbolic_trace(model)(x), want)


# ---------------------------------------------------------------- registry, shapes, counts


def _bn_keys(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def _expected_state(form: str, depth: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes from the description alone (not from the modules)."""
    kind, layers, _ = TORCHVISION_CONFIGS[f"resnet{depth}"]
    cifar = form == "preact"
    norm, bias = form != "res", form == "res"
    expansion = 4 if kind == "bottleneck" else 1
    state: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3) if cifar else (64, 3, 7, 7)}
    if bias:
        state["conv1.bias"] = (64,)
    if norm and not cifar:
        state |= _bn_keys("bn1", 64)
    c_in = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for index in range(blocks):
            p = f"layer{stage}.{index}"
            if kind == "basic":
                convs = [(c_in, planes, 3), (planes, planes, 3)]
            else:
                convs = [(c_in, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)]
            for k, (i, o, size) in enumerate(convs, start=1):
                if norm:
                    state |= _bn_keys(f"{p}.bn{k}", i)
                state[f"{p}.conv{k}.weight"] = (o, i, size, size)
                if bias:
                    state[f"{p}.conv{k}.bias"] = (o,)
            out = planes * expansion
            if form != "plain" and (index == 0 and (stage > 1 or c_in != out)):
                state[f"{p}.shortcut.0.weight"] = (out, c_in, 1, 1)
                if bias:
                    state[f"{p}.shortcut.0.bias"] = (out,)
            c_in = out
    if norm:
        state |= _bn_keys("bn", 512 * expansion)
    head = "linear" if cifar else "fc"
    state[f"{head}.weight"] = (num_classes, 512 * expansion)
    state[f"{head}.bias"] = (num_classes,)
    return state


def _meta_state(name: str, num_classes: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return get_arch(name).builder(num_classes).state_dict()


def _form_depth(name: str) -> tuple[str, int]:
    if name.startswith("preactresnet"):
        return "preact", int(name.removeprefix("preactresnet"))
    stem = name.removeprefix("paper_")
    form = stem.rstrip("0123456789")
    return form, int(stem[len(form):])


@pytest.mark.parametrize("name", PAPER_NAMES + PREACT_NAMES)
def test_registered_keys_and_shapes_match_the_description(name: str) -> None:
    form, depth = _form_depth(name)
    state = _meta_state(name, 7)
    assert {k: tuple(v.shape) for k, v in state.items()} == _expected_state(form, depth, 7)
    spec = get_arch(name)
    kind = TORCHVISION_CONFIGS[f"resnet{depth}"][0]
    assert spec.equation == BLOCK_EQUATIONS["resbn" if form == "preact" else form, kind]
    assert (spec.family, spec.input_size, spec.default_classes) == (
        ("cifar-preact", 32, 10) if form == "preact" else ("paper", 224, 1000))
    assert (spec.batchnorm, spec.residual) == (form != "res", form != "plain")


def test_parameter_counts() -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    # kuangliu's PreActResNet18 (no final BatchNorm): 11,171,146; ours adds bn's 2 x 512
    assert count(preact_resnet(18, final_norm=False)) == 11_171_146
    assert count(build_model("preactresnet18")[0]) == 11_171_146 + 2 * 512
    # paper_resbn18 is torchvision's resnet18 (11,689,512) with BN moved before each conv, the
    # downsample BNs dropped and a final bn added: recount from the description
    with torch.device("meta"):
        resbn18 = get_arch("paper_resbn18").builder(1000)
    described = _expected_state("resbn", 18, 1000)
    trainable = sum(torch.Size(s).numel() for k, s in described.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert count(resbn18) == trainable == 11_687_848


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n.endswith(("34", "101")) else n for n in PAPER_NAMES + PREACT_NAMES
])
def test_every_new_name_builds_and_runs(name: str) -> None:
    torch.manual_seed(0)
    model, spec = build_model(name, 5)
    size = 32  # paper_*: the stem and three strided stages leave 1x1 at layer4
    with torch.no_grad():
        y = model(torch.randn(1, 3, size, size))
    assert y.shape == (1, 5) and torch.isfinite(y).all()
    assert not model.training


@pytest.mark.parametrize("name", ["paper_res18", "paper_plain18", "preactresnet18"])
def test_seeded_build_is_reproducible(name: str) -> None:
    torch.manual_seed(3)
    first = build_model(name)[0].state_dict()
    torch.manual_seed(3)
    second = build_model(name)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    conv = first["layer1.0.conv1.weight"]
    assert 0.5 < conv.std().item() * (conv.shape[0] * conv[0, 0].numel()) ** 0.5 < 2  # Kaiming fan-out


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("name", PAPER_NAMES + PREACT_NAMES)
def test_inference_names_every_new_architecture(name: str) -> None:
    inferred = infer_architecture(_meta_state(name, 7))
    assert inferred.arch == name, inferred.reason
    assert inferred.num_classes == 7
    form, depth = _form_depth(name)
    assert f"depth {depth}" in inferred.reason
    expected = {
        "preact": "CIFAR pre-activation ResNet",
        "plain": "Figure 1(a)", "res": "Figure 1(b)", "resbn": "Figure 1(c)",
    }[form]
    assert expected in inferred.reason


@pytest.mark.parametrize("name", ["preactresnet18", "paper_plain18", "paper_res18", "paper_resbn18"])
def test_saved_state_dict_loads_by_inference(name: str, tmp_path: Path) -> None:
    torch.manual_seed(5)
    model, _ = build_model(name, 10)
    path = save_safetensors(model, tmp_path / "m.safetensors")  # no metadata
    loaded = load_model(load_checkpoint(path))
    assert loaded.arch == name and loaded.arch_source == "inferred" and loaded.num_classes == 10
    assert loaded.spec.equation
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.model.state_dict().items())


def test_existing_families_are_not_taken_for_preactivation() -> None:
    for name in ("resnet18", "resnet18_plain", "resnet50_plain", "resnet18_nobn", "resnet18_plain_nobn",
                 "wide_resnet50_2_plain", "resnet18d", "resnet20", "resnet20_optb"):
        assert infer_architecture(_meta_state(name, 10)).arch == name


def test_preactivation_layouts_that_fit_no_name_are_refused() -> None:
    kuangliu = {k: v for k, v in _meta_state("preactresnet18", 10).items() if not k.startswith("bn.")}
    with pytest.raises(ArchitectureError, match="without a final BatchNorm 'bn'.*kuangliu"):
        infer_architecture(kuangliu)
    deeper = dict(_meta_state("paper_resbn18", 10))
    deeper |= {k.replace("layer4.1.", "layer4.2."): v for k, v in deeper.items() if k.startswith("layer4.1.")}
    with pytest.raises(ArchitectureError, match="2x2x2x3 basic blocks.*no registered depth"):
        infer_architecture(deeper)
    stem_bn = _meta_state("paper_res18", 10) | {"bn1.weight": torch.zeros(64)}
    with pytest.raises(ArchitectureError, match="paper_resN has none"):
        infer_architecture(stem_bn)


# ---------------------------------------------------------------- resdyn archs


def test_archs_json_lists_the_new_names_with_equations(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["archs", "--format", "json"], capsys)
    assert code == 0
    entries = json.loads(out)
    by_name = {e["name"]: e for e in entries}
    for name in PAPER_NAMES + PREACT_NAMES:
        assert by_name[name]["equation"] == get_arch(name).equation != ""
    assert by_name["paper_res50"]["equation"] == "x' = σ(W3 σ(W2 σ(W1 x))) + x"
    assert by_name["resnet20"]["equation"] is None
    families = [e["family"] for e in entries]
    assert families == sorted(families)  # grouped
    names = [e["name"] for e in entries]
    assert names.index("resnet14") < names.index("resnet20") < names.index("resnet110") < names.index("resnet1202")
    assert names.index("paper_plain18") < names.index("paper_plain101")
    assert [n for n in names if n.startswith("preact")] == PREACT_NAMES
    assert set(names) == set(list_models())
