"""The one opening step of the commands that read images: DataRequest, cli's data_request, tasks' open_data (#25)."""

from __future__ import annotations

import dataclasses

import pytest

from auditor.cli._data_options import Preset, data_request
from auditor.errors import UsageError
from auditor.tasks.data_request import DataRequest
from conftest import FIXTURES

CKPT = FIXTURES / "resnet8-digits.safetensors"
DIGITS = FIXTURES / "digits"
NOTHING = dict(arch=None, input_size=None, preset=None, size=None, mean=None, std=None, classes=None,
               per_class=None, seed=None)


def test_the_options_become_typed_values() -> None:
    request = data_request(DIGITS, **{**NOTHING, "input_size": "32", "preset": Preset.cifar10, "mean": "0.5,0.25,1",
                                      "std": "1,2,3", "classes": " 3, 1,", "per_class": 4, "seed": 7, "arch": "resnet8"})
    assert request == DataRequest(DIGITS, classes=("3", "1"), per_class=4, seed=7, arch="resnet8", input_size=(32, 32),
                                  preset="cifar10", size=None, mean=(0.5, 0.25, 1.0), std=(1.0, 2.0, 3.0))
    assert request.image_options() == dict(preset="cifar10", size=None, mean=(0.5, 0.25, 1.0), std=(1.0, 2.0, 3.0),
                                           classes=("3", "1"), per_class=4, seed=7)
    assert request.options() == dict(classes=("3", "1"), per_class=4, seed=7, arch="resnet8", input_size=(32, 32),
                                     preset="cifar10", size=None, mean=(0.5, 0.25, 1.0), std=(1.0, 2.0, 3.0))
    assert data_request(None, **NOTHING) == DataRequest()
    assert DataRequest().random_seed == 0 and DataRequest(seed=5).random_seed == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("change,needle", [
    ({"input_size": "32,a"}, "input size '32,a' is not a size"),
    ({"mean": "1,2"}, "--mean '1,2' is not three numbers"),
    ({"std": "a,b,c"}, "--std 'a,b,c' is not three numbers"),
    ({"input_size": "0", "mean": "1"}, "input size '0' is not a size"),  # the size first, as before
])
def test_malformed_options_are_one_usage_error(change: dict, needle: str) -> None:
    with pytest.raises(UsageError) as caught:
        data_request(DIGITS, **{**NOTHING, **change})
    assert needle in caught.value.one_line()


def test_open_data_is_open_subject_then_open_images() -> None:
    """The same network and the same images, preprocessed alike, as the two steps taken by hand."""
    from auditor.subject import open_subject
    from auditor.tasks.images import open_data, open_images

    request = DataRequest(DIGITS, classes=("7", "2"), per_class=3, seed=11, input_size=(32, 32), preset="none")
    subject, images = open_data(CKPT, request)
    by_hand = open_subject(CKPT, input_size=(32, 32))
    expected = open_images(DIGITS, by_hand, preset="none", classes=["7", "2"], per_class=3, seed=11)
    assert subject.checkpoint.sha256 == by_hand.checkpoint.sha256 and subject.input_size_source == "--input-size"
    assert list(images.dataset.classes) == list(expected.dataset.classes) == ["7", "2"]
    assert images.dataset.samples == expected.dataset.samples and len(images.dataset.samples) == 6
    assert images.section() == expected.section()
    with pytest.raises(ValueError, match="request.data"):
        open_data(CKPT, dataclasses.replace(request, data=None))
