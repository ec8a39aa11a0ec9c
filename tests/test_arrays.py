"""Arrays and tensors in, answers out: predict and evaluate take an in-memory batch as every MNIST
loader returns it, and load()'s module checks its input contract instead of answering wrongly."""

from __future__ import annotations

import pytest
import torch

import mnist_cnn
from mnist_cnn.data.contract import MNIST_NORM, normalize
from mnist_cnn.data.splits import load_split
from mnist_cnn.errors import ConfigError, ImageError

N = 1500  # more than one forward pass of api.EVAL_BATCH


@pytest.fixture(scope="module")
def test_images(real_dir) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(real_dir, "test", True)
    return images, labels  # (10000, 28, 28) uint8, (10000,)


def test_load_takes_uint8_or_unit_floats_and_refuses_what_would_be_silently_wrong(real_run, test_images):
    model = mnist_cnn.load(real_run / "last.pt")
    images = test_images[0][:64]
    unit = images.float().div(255).unsqueeze(1)  # (64, 1, 28, 28) in [0, 1]
    expected = model(unit)
    assert torch.equal(model(images), expected)  # uint8 (N, 28, 28): divided by 255 for you
    assert torch.equal(model(images.unsqueeze(1)), expected)
    assert (expected.argmax(1) == test_images[1][:64]).float().mean() > 0.9
    for bad, says in (
        (normalize(unit, MNIST_NORM), "float images must be in [0, 1]"),  # normalized already: 40% before
        (images.float(), "float images must be in [0, 1] (these span 0..255)"),  # 0..255 floats: 31% before
        (images.long(), "expected uint8 (0..255) or float images in [0, 1], got torch.int64"),
        (images[:, :20, :20], "expected images shaped (N, 28, 28) or (N, 1, 28, 28), got (64, 20, 20)"),
        (torch.full((2, 28, 28), float("nan")), "float images must be in [0, 1]"),
    ):
        with pytest.raises(ImageError, match=r"^[^\n]+$") as e:
            model(bad)
        assert says in str(e.value)


def test_predict_on_a_uint8_batch_gives_one_answer_per_image_from_one_forward_per_thousand(real_run, test_images):
    model = mnist_cnn.load(real_run / "last.pt")
    images, labels = test_images[0][:N], test_images[1][:N]
    calls = []
    handle = model.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        answers = mnist_cnn.predict(model, images.numpy())  # what every MNIST loader returns
    finally:
        handle.remove()
    assert calls == [1000, N - 1000]  # batched, not N calls
    assert [a["image"] for a in answers[:3]] == ["[0]", "[1]", "[2]"] and len(answers) == N
    digits = torch.tensor([a["digit"] for a in answers])
    assert torch.equal(digits, model(images).argmax(1))
    assert (digits == labels).float().mean() > 0.9
    as_floats = mnist_cnn.predict(model, images.float().div(255).unsqueeze(1))  # a (N, 1, 28, 28) tensor
    assert [a["digit"] for a in as_floats] == [a["digit"] for a in answers]
    with pytest.raises(ImageError, match="float images must be in"):
        mnist_cnn.predict(model, images.float())


def test_evaluate_on_an_array_equals_evaluate_on_the_test_split(real_run, real_dir, test_images):
    images, labels = test_images
    on_split = mnist_cnn.evaluate(real_run / "last.pt", data_dir=real_dir, device="cpu")
    on_array = mnist_cnn.evaluate(real_run / "last.pt", images=images.numpy(), labels=labels.numpy(), device="cpu")
    assert on_array["n"] == 10_000
    for key in ("accuracy", "loss", "confusion", "per_class"):
        assert on_array[key] == on_split[key], key
    for labels_given, says in (
        (None, "needs labels"),
        (labels[:10], "must be 10000 integer class indices"),
        (labels.float(), "integer class indices"),
        (labels + 10, "class indices 0..9"),
    ):
        with pytest.raises(ConfigError, match=says):
            mnist_cnn.evaluate(real_run / "last.pt", images=images, labels=labels_given, device="cpu")
