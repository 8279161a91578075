"""RegNet, MobileNet, EfficientNet, ConvNeXt (torchvision) and ResNetV2, SE-ResNet(X), ConvNeXt (timm):
registry names, inference from a plain state dict's keys and shapes, strict loading."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from auditor.errors import ArchitectureError
from auditor.models.families import FAMILY_MODELS
from auditor.models.infer import infer_architecture
from auditor.models.infer_families import build_on_meta, family_kind, infer_family, signature
from auditor.models.load import load_checkpoint, load_model
from auditor.models.registry import build_model, get_arch, list_models

from conftest import run_cli, save_safetensors

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason='timm is not installed (pip install "resdyn[timm]")')

TORCHVISION = ["regnet_x_400mf", "regnet_y_400mf", "regnet_y_800mf", "mobilenet_v2", "mobilenet_v3_small",
               "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "convnext_tiny", "convnext_small"]
TIMM = ["resnetv2_50", "resnetv2_50d", "seresnet50", "seresnext50_32x4d", "convnext_atto", "timm_convnext_tiny"]
# the same keys and shapes: the anti-aliasing pool has no weights
ALIKE = {"seresnext101d_32x8d", "seresnextaa101d_32x8d"}


def _seeded_state(name: str, num_classes: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Seeded random weights, saved and read back as a plain dict (no metadata).

    The model is built on the meta device and filled with ``torch.randn`` (positive
    running variances, zero batch counters): the same keys and shapes as ``build_model``, without
    its truncated-normal initialisation, which takes seconds for a ConvNeXt.
    """
    torch.manual_seed(0)
    model = build_on_meta(name, num_classes).to_empty(device="cpu")
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor.normal_() if tensor.is_floating_point() else tensor.zero_()
            if key.endswith("running_var"):  # a variance is positive (resdyn refuses negative ones)
                tensor.abs_().add_(0.1)
    path = tmp_path / f"{name}.pt"
    torch.save(dict(model.state_dict()), path)
    return torch.load(path, weights_only=True)


def _meta_state(name: str, num_classes: int = 7) -> dict[str, torch.Tensor]:
    return build_on_meta(name, num_classes).state_dict()


def test_registry_names_per_family() -> None:
    names = set(list_models())
    assert set(FAMILY_MODELS) <= names
    counts = {(m.source, m.kind): 0 for m in FAMILY_MODELS.values()}
    for model in FAMILY_MODELS.values():
        counts[model.source, model.kind] += 1
        spec = get_arch(model.name)
        assert (spec.family, spec.input_size, spec.default_classes, spec.residual) == (model.source, 224, 1000, True)
        assert spec.batchnorm == ("convnext" not in model.kind)
    assert counts == {("torchvision", "regnet"): 15, ("torchvision", "mobilenet"): 3,
                      ("torchvision", "efficientnet"): 8, ("torchvision", "convnext"): 4,
                      ("timm", "resnetv2"): 11, ("timm", "seresnet"): 19, ("timm", "timm_convnext"): 19}
    # torchvision owns the plain ConvNeXt names; timm's are prefixed
    assert get_arch("convnext_tiny").family == "torchvision" and get_arch("timm_convnext_tiny").family == "timm"
    assert FAMILY_MODELS["timm_convnext_tiny"].upstream == "convnext_tiny"
    assert not any("_bit" in n or n.startswith("convnextv2") or n.endswith("ts") for n in FAMILY_MODELS)


def test_registering_imports_neither_torch_nor_torchvision() -> None:
    import subprocess

    code = ("import sys; from auditor.models.registry import list_models; assert 'seresnet50' in list_models(); "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", TORCHVISION + [pytest.param(n, marks=needs_timm) for n in TIMM])
def test_inference_names_the_exact_variant(name: str, tmp_path: Path) -> None:
    found = infer_architecture(_seeded_state(name, 7, tmp_path))
    assert (found.arch, found.num_classes) == (name, 7), found.reason
    assert "keys and shapes equal" in found.reason and FAMILY_MODELS[name].upstream in found.reason


@pytest.mark.parametrize("name, counters", [
    ("regnet_y_400mf", True), ("mobilenet_v2", False), ("efficientnet_b0", False), ("convnext_tiny", True),
    pytest.param("resnetv2_18d", False, marks=needs_timm), pytest.param("seresnet18", True, marks=needs_timm),
    pytest.param("convnext_atto", True, marks=needs_timm),
])
def test_strict_loading_of_an_inferred_checkpoint(name: str, counters: bool, tmp_path: Path) -> None:
    """``classifier.N`` and ``head.fc`` heads, ``num_batches_tracked`` present or absent."""
    state = _seeded_state(name, 5, tmp_path)
    path = tmp_path / "plain.pt"
    torch.save({k: v for k, v in state.items() if counters or not k.endswith("num_batches_tracked")}, path)
    loaded = load_model(load_checkpoint(path))
    assert (loaded.arch, loaded.arch_source, loaded.num_classes) == (name, "inferred", 5)
    for key, value in loaded.model.state_dict().items():
        if counters or not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name, wrong", [
    ("regnet_x_400mf", "regnet_y_400mf"), ("regnet_y_800mf", "regnet_x_800mf"), ("efficientnet_b1", "efficientnet_b2"),
    ("convnext_small", "convnext_base"), ("mobilenet_v3_small", "mobilenet_v3_large"),
    pytest.param("resnetv2_50", "resnetv2_50d", marks=needs_timm),
    pytest.param("seresnet50", "seresnet50t", marks=needs_timm),
    pytest.param("convnext_atto", "convnext_atto_ols", marks=needs_timm),
])
def test_a_sibling_is_not_named(name: str, wrong: str) -> None:
    """Siblings of the same blocks per stage, or the same width: the keys and shapes tell them apart."""
    assert infer_architecture(_meta_state(name)).arch == name
    assert infer_architecture(_meta_state(wrong)).arch == wrong


@pytest.mark.parametrize("name", ["efficientnet_b7", "convnext_large", "regnet_y_128gf", "regnet_x_32gf",
                                  pytest.param("timm_convnext_large", marks=needs_timm),
                                  pytest.param("convnext_large_mlp", marks=needs_timm),
                                  pytest.param("seresnext101_32x8d", marks=needs_timm),
                                  pytest.param("resnetv2_152d", marks=needs_timm)])
def test_large_models_on_the_meta_device(name: str) -> None:
    found = infer_architecture(_meta_state(name, 1000))
    assert (found.arch, found.num_classes) == (name, 1000)


def test_timing_and_resnets_skip_the_family_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import auditor.models.infer_families as families

    state = _meta_state("efficientnet_b3", 10)
    families._meta_shapes.cache_clear()
    start = time.perf_counter()
    assert infer_architecture(state).arch == "efficientnet_b3"
    assert time.perf_counter() - start < 3.0
    # an ordinary ResNet: a few key look-ups, nothing built
    monkeypatch.setattr(families, "_meta_shapes", lambda *a: pytest.fail("built a candidate for a ResNet"))
    with torch.device("meta"):
        resnet = build_model("resnet50", 10)[0].state_dict()
    assert infer_family(resnet) is None
    assert infer_architecture(resnet).arch == "resnet50"


def test_unsupported_variant_is_one_line() -> None:
    torchvision = pytest.importorskip("torchvision.models")
    with torch.device("meta"):
        v2 = torchvision.efficientnet_v2_s(num_classes=5).state_dict()
        narrow = torchvision.mobilenet_v3_large(num_classes=5, width_mult=0.75).state_dict()
    with pytest.raises(ArchitectureError) as error:
        infer_architecture(v2)
    line = error.value.one_line()
    assert "\n" not in line and "torchvision EfficientNet with 2x4x4x6x9x15 blocks per stage" in line
    assert "matches no registered size" in line
    with pytest.raises(ArchitectureError, match="differ from every registered model.*nearest mobilenet_v3_large"):
        infer_architecture(narrow)


@needs_timm
def test_unregistered_timm_variants_say_why() -> None:
    import timm

    for name, why in [("resnetv2_50x1_bit", "without running statistics"), ("convnextv2_atto", "ConvNeXt V2")]:
        with torch.device("meta"):
            state = timm.create_model(name, pretrained=False, num_classes=5).state_dict()
        with pytest.raises(ArchitectureError, match=why) as error:
            infer_architecture(state)
        assert "\n" not in error.value.one_line()
    with pytest.raises(ArchitectureError, match="seresnext101d_32x8d and seresnextaa101d_32x8d alike"):
        infer_architecture(_meta_state("seresnextaa101d_32x8d"))


def test_without_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ArchitectureError) as error:
        build_model("seresnet50", 10)
    assert error.value.one_line() == 'architecture seresnet50 needs timm: pip install "resdyn[timm]"'
    # the keys still narrow it down to one name (building it would ask for timm)
    with torch.device("meta"):
        state = {f"layer{s}.{b}.conv1.weight": torch.empty(64 * s, 64, 1, 1) for s in (1, 2, 3, 4) for b in (0, 1)}
        state.update({"layer1.0.se.fc1.weight": torch.empty(4, 64, 1, 1), "fc.weight": torch.empty(3, 512)})
    found = infer_architecture(state)
    assert found.arch == "seresnet18" and "timm is not installed" in found.reason


def test_metadata_arch_reads_classes_from_the_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_model("mobilenet_v3_small", 6)
    path = save_safetensors(model, tmp_path / "m.safetensors", arch="mobilenet_v3_small")
    loaded = load_model(load_checkpoint(path))
    assert (loaded.arch, loaded.arch_source, loaded.num_classes) == ("mobilenet_v3_small", "metadata", 6)


def test_inspect_names_mobilenet_v2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model, _ = build_model("mobilenet_v2", 10)
    path = save_safetensors(model, tmp_path / "mobilenet.safetensors")
    code, out, err = run_cli(["inspect", path], capsys)
    assert code == 0, err
    assert "mobilenet_v2 (inferred" in out and "10 classes" in out


@pytest.mark.slow
@needs_timm
def test_catalog_matches_every_built_model() -> None:
    """Each entry's recorded blocks per stage and width, and inference back to its own name."""
    seen: dict[frozenset[tuple[str, tuple[int, ...]]], str] = {}
    for name, model in FAMILY_MODELS.items():
        state = _meta_state(name)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        assert family_kind(state) == model.kind, name
        assert signature(model.kind, shapes) == (model.depths, model.width), name
        full = frozenset((k, s) for k, s in shapes.items() if not k.endswith("num_batches_tracked"))
        assert full not in seen or {name, seen[full]} == ALIKE, (name, seen.get(full))
        seen[full] = name
        if name not in ALIKE:
            assert infer_architecture(state).arch == name
