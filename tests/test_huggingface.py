"""Hugging Face transformers ResNets (and timm config.json): same numbers as the torchvision layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from auditor.models.registry import build_model

from conftest import run_cli, run_json, save_safetensors


def _hf_name(key: str, bottleneck: bool) -> str:
    """torchvision -> transformers key, written out here independently of auditor.models.huggingface."""
    parts = key.split(".")
    if parts[0] == "conv1":
        return "resnet.embedder.embedder.convolution." + parts[1]
    if parts[0] == "bn1":
        return "resnet.embedder.embedder.normalization." + parts[1]
    if parts[0] == "fc":
        return "classifier.1." + parts[1]
    stage = int(parts[0].removeprefix("layer")) - 1
    head = f"resnet.encoder.stages.{stage}.layers.{parts[1]}."
    if parts[2] == "downsample":
        kind = "convolution" if parts[3] == "0" else "normalization"
        return head + f"shortcut.{kind}." + parts[4]
    index = int(parts[2][-1]) - 1
    kind = "convolution" if parts[2].startswith("conv") else "normalization"
    return head + f"layer.{index}.{kind}." + parts[3]


def _randomized(name: str, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, _ = build_model(name, classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model.eval()


def _save_hf(model: torch.nn.Module, folder: Path, config: dict, processor: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    bottleneck = config.get("layer_type") == "bottleneck"
    state = {_hf_name(k, bottleneck): v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def _config(layer_type: str, depths: list[int], classes: int, **extra) -> dict:
    widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    return {"model_type": "resnet", "architectures": ["ResNetForImageClassification"], "layer_type": layer_type,
            "depths": depths, "hidden_sizes": widths, "embedding_size": 64, "hidden_act": "relu",
            "downsample_in_first_stage": False, "downsample_in_bottleneck": False, "num_channels": 3,
            "id2label": {str(i): f"c{i}" for i in range(classes)}, **extra}


def test_renamed_keys_cover_a_real_transformers_model_when_installed() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], num_labels=5)
    reference = transformers.ResNetForImageClassification(config).eval()
    ours = build_model("resnet50", 5)[0].eval()
    names = {_hf_name(k, True) for k in ours.state_dict()}
    assert names == set(reference.state_dict())
    reference.load_state_dict({_hf_name(k, True): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reference(x).logits, ours(x))


def test_hf_bottleneck_loads_the_same_tensors_as_torchvision(tmp_path) -> None:
    from auditor.subject import open_subject

    model = _randomized("resnet50", 4, seed=7)
    folder = _save_hf(model, tmp_path / "hf", _config("bottleneck", [3, 4, 6, 3], 4))
    subject = open_subject(folder, input_size=(32, 32))
    assert (subject.loaded.arch, subject.loaded.arch_source) == ("resnet50", "config")
    loaded, reference = subject.loaded.model.state_dict(), model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(subject.loaded.model(x), model(x))


@pytest.mark.parametrize("name,layer_type,depths", [("resnet18", "basic", [2, 2, 2, 2])])
def test_hf_folder_gives_the_numbers_of_the_torchvision_file(tmp_path, capsys, name, layer_type, depths) -> None:
    model = _randomized(name, 4, seed=7)
    folder = _save_hf(model, tmp_path / "hf", _config(layer_type, depths, 4))
    reference = save_safetensors(model, tmp_path / "tv.safetensors")
    args = ["condition", "--input-size", "32"]
    ours = run_json([*args[:1], folder, *args[1:]], capsys)
    theirs = run_json([*args[:1], reference, *args[1:]], capsys)
    assert ours["checkpoint"]["arch"] == theirs["checkpoint"]["arch"] == name
    assert ours["checkpoint"]["arch_source"] == "config"
    assert ours["checkpoint"]["metadata"]["layout"] == "huggingface-transformers"
    assert ours["checkpoint"]["path"].endswith("model.safetensors")
    for mine, other in zip(ours["layers"], theirs["layers"], strict=True):
        assert mine == other
    for mine, other in zip(ours["blocks"], theirs["blocks"], strict=True):
        assert mine == other


def test_hf_activations_equal_torchvision(tmp_path) -> None:
    from auditor.subject import open_subject

    model = _randomized("resnet18", 3, seed=2)
    folder = _save_hf(model, tmp_path / "hf", _config("basic", [2, 2, 2, 2], 3))
    subject = open_subject(folder / "model.safetensors", input_size=(64, 64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(subject.loaded.model(x), model(x))
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        assert torch.equal(subject.loaded.model.layer2(subject.loaded.model.layer1(stem)), model.layer2(model.layer1(stem)))


def test_hf_preprocessor_config_sets_the_preprocessing(tmp_path) -> None:
    from auditor.models.load import load_checkpoint

    processor = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.4, 0.3],
                 "image_std": [0.2, 0.25, 0.3], "resample": 3, "size": {"shortest_edge": 96}}
    folder = _save_hf(_randomized("resnet18", 3, 0), tmp_path / "hf", _config("basic", [2, 2, 2, 2], 3), processor)
    checkpoint = load_checkpoint(folder)
    assert json.loads(checkpoint.metadata["preprocessing"]) == {
        "size": 96, "resize": int(96 / 0.875), "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    assert checkpoint.metadata["layout_files"] == "config.json, preprocessor_config.json"


@pytest.mark.parametrize("change,needle", [
    ({"depths": [3, 4, 6, 3]}, "depths [3, 4, 6, 3] in config.json, [2, 2, 2, 2] in the weights"),
    ({"depths": [2, 2, 3, 2]}, "depths = [2, 2, 3, 2]"),
    ({"id2label": {"0": "a"}}, "num_labels 1 in config.json, 3 in the weights"),
    ({"downsample_in_bottleneck": True}, "downsample_in_bottleneck"),
    ({"hidden_sizes": [32, 64, 128, 256]}, "hidden_sizes"),
    ({"layer_type": "bottleneck", "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3]}, "disagree"),
])
def test_config_and_weights_that_disagree_are_refused(tmp_path, capsys, change, needle) -> None:
    model = _randomized("resnet18", 3, 0)
    config = _config("basic", [2, 2, 2, 2], 3)
    config.update(change)
    folder = _save_hf(model, tmp_path / "hf", config)
    out_file = tmp_path / "r.json"
    code, out, err = run_cli(["condition", folder, "--input-size", "32", "-o", out_file], capsys)
    assert code == 2 and out == "" and not out_file.exists()
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err


def test_config_json_beside_non_hf_weights_is_refused(tmp_path, capsys) -> None:
    path = save_safetensors(_randomized("resnet18", 3, 0), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_config("basic", [2, 2, 2, 2], 3)))
    code, out, err = run_cli(["inspect", path], capsys)
    assert code == 2 and "disagree" in err and len(err.strip().splitlines()) == 1


def test_folder_without_weights_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run_cli(["inspect", tmp_path], capsys)
    assert code == 2 and "model.safetensors" in err


def test_timm_config_json_names_the_architecture_and_preprocessing(tmp_path) -> None:
    from auditor.models.load import load_checkpoint
    from auditor.subject import open_subject

    torch.manual_seed(0)
    model, _ = build_model("resnet18d", 6)
    path = save_safetensors(model, tmp_path / "model.safetensors")
    config = {"architecture": "resnet18d", "num_classes": 6, "num_features": 512,
              "pretrained_cfg": {"tag": "x", "input_size": [3, 160, 160], "crop_pct": 0.95,
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.metadata["layout"] == "timm"
    assert json.loads(checkpoint.metadata["preprocessing"]) == {
        "size": 160, "resize": 168, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    subject = open_subject(tmp_path)
    assert (subject.loaded.arch, subject.loaded.arch_source) == ("resnet18d", "config")
    assert subject.anatomy.input_shape == (3, 160, 160)
    assert subject.input_size_source == "checkpoint metadata"


def test_report_says_where_each_preprocessing_value_came_from(tmp_path, capsys) -> None:
    from auditor.tasks.images import open_images
    from auditor.subject import open_subject

    from conftest import FIXTURES

    processor = {"crop_pct": 1.0, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "size": 8}
    folder = _save_hf(_randomized("resnet18", 10, 0), tmp_path / "hf", _config("basic", [2, 2, 2, 2], 10), processor)
    subject = open_subject(folder)
    assert subject.anatomy.input_shape == (3, 8, 8) and subject.input_size_source == "checkpoint metadata"
    images = open_images(FIXTURES / "digits", subject, per_class=1)
    section = images.section()
    assert section["preprocessing"] == {"size": 8, "resize": 8, "mean": [0.5] * 3, "std": [0.25] * 3}
    files = "config.json, preprocessor_config.json"
    assert section["preprocessing_source"] == {"size": files, "resize": files, "mean": files, "std": files}
    overridden = open_images(FIXTURES / "digits", subject, per_class=1, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    origin = overridden.section()["preprocessing_source"]
    assert (origin["mean"], origin["std"], origin["size"]) == ("option", "option", files)
    plain = open_images(FIXTURES / "digits", open_subject(FIXTURES / "resnet8-digits.safetensors"), per_class=1)
    assert plain.section()["preprocessing_source"]["mean"] == "checkpoint metadata"  # the fixture's own metadata
    bare = save_safetensors(build_model("resnet8", 10)[0], tmp_path / "bare.safetensors")
    guessed = open_images(FIXTURES / "digits", open_subject(bare), per_class=1).section()["preprocessing_source"]
    assert set(guessed.values()) == {"cifar10 default for a 32 px input"}
