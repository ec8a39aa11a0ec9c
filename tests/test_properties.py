"""Properties of every parser and loader of outside input: whatever the bytes or text, the
result is a value or the project's one-line error (MnistCnnError), never another exception and
never a hang. Hypothesis searches; derandomize=True makes every run try the same examples, so a
CI failure repeats on a laptop. Each bug these found has a plain example test beside its fix."""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import idx_bytes, synthetic_digits
from mnist_cnn.checkpoint import load_checkpoint, load_model_file, make_checkpoint, model_from_checkpoint
from mnist_cnn.config import Config, dump_toml, load_config, parse_override, set_value, to_dict, validate
from mnist_cnn.data.idx import IdxFile, load_idx, parse_idx
from mnist_cnn.errors import MnistCnnError
from mnist_cnn.inference.predict import load_digit
from mnist_cnn.networks.builtin import build_model
from mnist_cnn.training.seeds import parse_seeds
from test_bad_input import allocations_capped


def searched(examples: int) -> settings:
    """Hypothesis settings of these tests: a fixed, small budget and the same examples on every run."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def one_line(error: MnistCnnError) -> None:
    """What the CLI prints for an error is its message: one line, something to read."""
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


REFUSED = object()  # what works_or_refuses returns when the call raised the project's error


def works_or_refuses(call, *args: Any) -> Any:
    """call(*args), or REFUSED when it raised the project's error (a one-line one)."""
    try:
        result = call(*args)
    except MnistCnnError as e:
        one_line(e)
        event(f"{call.__name__}: refused")  # --hypothesis-show-statistics: how many examples got how far
        return REFUSED
    event(f"{call.__name__}: worked")
    return result


# --- --set KEY=VALUE and recipe files ---------------------------------------------------------------------------


def dotted_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        keys += dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return keys


KEYS = dotted_keys(to_dict(Config())) + ["model_args.width", "model_args.widths", "model_args.dropout"]
TOML_SCALARS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.sampled_from(
        ["true", "false", "nan", "-inf", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "0x1F", "9" * 400]
    ),
    st.text(max_size=12).map(json.dumps),
    st.text(max_size=12).map(lambda s: "'" + s.replace("'", "") + "'"),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=8,
)
OVERRIDES = st.one_of(
    st.tuples(st.sampled_from(KEYS), TOML_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(KEYS), st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=30),
    st.integers(1, 3000).map(lambda n: "model_args.x=" + "[" * n),  # deep nesting: the parser's recursion
)


def round_trips(cfg: Config) -> None:
    """A config that validates is written (dump_toml) as a recipe that reads back as the same config."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.toml"
        path.write_text(dump_toml(cfg), encoding="utf-8")
        again = load_config(str(path))
    again.run.out = cfg.run.out  # a recipe file's run.out is not reused (config.forget_run_folder)
    assert dump_toml(again) == dump_toml(cfg)  # as text: a nan in model_args is not == itself


@searched(300)
@given(st.lists(OVERRIDES, min_size=1, max_size=3))
def test_set_values_apply_or_refuse_and_what_applies_round_trips(texts):
    cfg = load_config("seed")
    for text in texts:
        parsed = works_or_refuses(parse_override, text)
        if parsed is REFUSED or works_or_refuses(set_value, cfg, *parsed) is REFUSED:
            return
    if works_or_refuses(validate, cfg) is not REFUSED:
        round_trips(cfg)


RECIPE_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(OVERRIDES, max_size=6).map(lambda lines: "\n".join(lines).replace("=", " = ", 1)),
    st.lists(
        st.tuples(
            st.sampled_from(["", "[optim]", "[run]", "[augment]", "[model_args]", "[distill]", "[x]"]), OVERRIDES
        ),
        max_size=5,
    ).map(lambda parts: "\n".join(f"{table}\n{line.split('.')[-1]}" for table, line in parts)),
    st.integers(1, 3000).map(lambda n: "x = " + "[" * n + "]" * n),
)


@searched(200)
@given(RECIPE_TEXT)
def test_recipe_files_load_or_refuse(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.toml"
        path.write_text(text, encoding="utf-8")
        cfg = works_or_refuses(load_config, str(path))
    if cfg is not REFUSED:
        round_trips(cfg)


# --- IDX headers --------------------------------------------------------------------------------------------------

VALID_IDX = idx_bytes(synthetic_digits(3)[0])  # 3 images: 2,368 bytes


@searched(200)
@given(
    zero=st.sampled_from([0, 0, 0, 1, 0xFFFF]),
    dtype=st.sampled_from([0x08, 0x0C, 0x08, 0x09, 0x0D, 0x0E, 0]),
    dims=st.lists(st.one_of(st.integers(0, 40), st.just(28), st.integers(0, 2**32 - 1)), max_size=5),
    data=st.one_of(st.none(), st.integers(0, 4000)),
    extra_ndim=st.one_of(st.none(), st.integers(0, 255)),
)
def test_idx_headers_parse_to_their_shape_or_refuse(zero, dtype, dims, data, extra_ndim):
    """data=None: as many data bytes as the header asks for (when that is a small file)."""
    ndim = len(dims) if extra_ndim is None else extra_ndim
    needed = math.prod(dims) * (4 if dtype == 0x0C else 1)
    raw = struct.pack(">HBB", zero, dtype, ndim) + struct.pack(f">{len(dims)}I", *dims)
    raw += bytes(needed if data is None and needed <= 100_000 else data or 0)
    out = works_or_refuses(parse_idx, raw, "fuzz")
    if out is not REFUSED:
        assert list(out.shape) == dims and out.dtype in (torch.uint8, torch.int64)


@searched(100)
@given(
    header=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, len(VALID_IDX))),
    gz=st.booleans(),
)
def test_valid_idx_with_a_mutated_header_loads_or_refuses(header, cut, gz):
    raw = bytearray(VALID_IDX)
    for pos, value in header:
        raw[pos] = value
    raw = raw[:cut] if cut is not None else raw
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.gz" if gz else "f")
        path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
        out = works_or_refuses(load_idx, path, IdxFile("f", (3, 28, 28)), False)
    if out is not REFUSED:
        assert out.dtype == torch.uint8 and tuple(out.shape[1:]) == (28, 28)


# --- checkpoints --------------------------------------------------------------------------------------------------

GOOD_CKPT = make_checkpoint(
    build_model("tiny"), load_config("tiny"), epoch=1, metrics=[{"epoch": 1, "test_acc": 0.5}]
).to_dict()  # the file's dict


def saved(ckpt: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


GOOD_BYTES = saved(GOOD_CKPT)


def load_everything(data: bytes, name: str = "c.pt") -> None:
    """The checkpoint file's way through every reader: load_checkpoint, model_from_checkpoint, load_model_file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        ckpt = works_or_refuses(load_checkpoint, path)
        if ckpt is not REFUSED:
            works_or_refuses(model_from_checkpoint, ckpt, str(path))
        works_or_refuses(load_model_file, path)


@searched(100)
@given(st.one_of(st.binary(max_size=2000), st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b)))
def test_arbitrary_bytes_as_a_checkpoint_are_refused(data):
    load_everything(data)


@searched(60)
@given(edits=st.lists(st.tuples(st.integers(0, len(GOOD_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_a_checkpoint_file_with_edited_bytes_loads_or_refuses(edits):
    data = bytearray(GOOD_BYTES)
    for pos, value in edits:
        data[pos] = value
    load_everything(bytes(data))


SMALL_TENSORS = st.builds(
    lambda dtype, shape: torch.zeros(shape, dtype=dtype),
    st.sampled_from(
        [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]
    ),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
)
ODD_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, 1, 10, 62, 1000, 1001, 200_000_000, -1]),
        st.floats(),
        st.text(max_size=10),
        SMALL_TENSORS,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
CONFIG_EDITS = st.sampled_from(
    [("config", k) for k in ("model", "dataset", "epochs", "model_args", "optim", "run", "recipe")]
    + [("config", "model_args", k) for k in ("widths", "w1", "d1", "num_classes", "dropout")]
    + [("network",), ("network", "num_classes"), ("network", "sha256"), ("model",), ("epoch",), ("metrics",)]
    + [("metrics", 0, "test_acc"), ("model", "head.weight"), ("model", "head.bias"), ("model", "extra"), ("version",)]
    + [("partial",), ("partial", "step"), ("partial", "rng"), ("mnist_cnn",), ("train_model",), ("optimizer",)]
)
FORMAT_1_DROPS = st.sets(
    st.sampled_from(["network", "partial", "metrics", "epoch", "optimizer", "scheduler", "mnist_cnn", "train_model"])
)
GIANT = st.sampled_from(
    [
        (("network", "num_classes"), 200_000_000),
        (("config", "model_args", "widths"), [8, 12, 16, 16, 100_000]),
        (("config", "model_args", "widths"), [10**12] * 5),
        (("config", "model"), "family"),
    ]
)


def edit(ckpt: dict, where: tuple, value: Any) -> None:
    """ckpt[where[0]][where[1]]... = value, where that place still exists (an earlier edit may have replaced it)."""
    *parents, last = where
    target: Any = ckpt
    for key in parents:
        if not has(target, key):
            return
        target = target[key]
    if isinstance(target, dict) or has(target, last):
        target[last] = value


def has(container: Any, key: Any) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(container, list) and isinstance(key, int) and key < len(container)


@searched(150)
@given(st.lists(st.one_of(st.tuples(CONFIG_EDITS, ODD_VALUES), GIANT), min_size=1, max_size=3))
def test_a_checkpoint_with_edited_entries_loads_or_refuses_before_allocating(edits):
    ckpt = copy.deepcopy(GOOD_CKPT)
    for where, value in edits:
        edit(ckpt, where, value)
    if ckpt["config"].get("model") == "family":
        ckpt["config"]["model_args"] = {"d1": 10**9, "w1": 1}  # a billion layers: refused by their count
    with allocations_capped():  # a regression fails here instead of allocating 32 GB
        load_everything(saved(ckpt))


@searched(60)
@given(dropped=FORMAT_1_DROPS, edits=st.lists(st.tuples(CONFIG_EDITS, ODD_VALUES), max_size=2))
def test_a_format_1_checkpoint_missing_entries_migrates_or_refuses(dropped, edits):
    """The older format's reader (checkpoint.MIGRATIONS) on files of 0.1.0-0.5.0's shape, entries missing or odd."""
    ckpt = {k: v for k, v in copy.deepcopy(GOOD_CKPT).items() if k not in dropped}
    ckpt["version"] = 1
    for where, value in edits:
        edit(ckpt, where, value)
    with allocations_capped():
        load_everything(saved(ckpt))


# --- safetensors exports ------------------------------------------------------------------------------------------

safetensors_torch = pytest.importorskip("safetensors.torch")
GOOD_META = {
    "config": json.dumps(to_dict(load_config("tiny"))),
    "num_classes": "10",
    "network_sha256": "",
    "epochs_trained": "1",
    "final_train_accuracy": "0.5",
    "final_test_accuracy": "0.5",
}
META_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "None", "nan", "inf", "-1", "0", "200000000", "1e400", "10", "[]", "{}", "null"]),
    st.integers(-(2**70), 2**70).map(str),
    st.builds(
        lambda key, value: json.dumps({**to_dict(load_config("tiny")), key: value}),
        st.sampled_from(["model", "model_args", "epochs", "optim", "dataset"]),
        st.one_of(st.integers(), st.text(max_size=6), st.just({"widths": [8, 12, 16, 16, 10**7]})),
    ),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # JSON nesting past the recursion limit
)


@searched(80)
@given(
    meta=st.dictionaries(st.sampled_from(sorted(GOOD_META)), META_TEXT, max_size=3),
    dtype=st.sampled_from([None, torch.float16, torch.int32, torch.uint8, torch.bool]),
    drop=st.booleans(),
)
def test_a_safetensors_export_with_edited_metadata_loads_or_refuses(meta, dtype, drop):
    weights = {k: v if dtype is None else v.to(dtype) for k, v in GOOD_CKPT["model"].items()}
    if drop:
        weights.pop("head.weight")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        safetensors_torch.save_file(weights, str(path), metadata={**GOOD_META, **meta})
        loaded = works_or_refuses(load_model_file, path)
    if loaded is not REFUSED:
        _, _, ckpt = loaded
        json.dumps({"epochs": ckpt.epoch, **ckpt.final})  # what serve's /api/model returns: plain values only
        assert isinstance(ckpt.epoch, int) and isinstance(ckpt.network.num_classes, int)
        assert all(isinstance(v, (int, float, type(None))) for row in ckpt.metrics for v in row.values())


# --- uploaded image bytes (serve's POST /api/predict, predict's files) -------------------------------------------


WRITABLE = {  # (format, mode) pairs PIL writes: every decoder and mode of open_image and to_gray
    "PNG": ["L", "RGB", "RGBA", "P", "1", "LA", "I;16"],
    "BMP": ["L", "RGB", "P", "1"],
    "GIF": ["L", "P"],
    "TIFF": ["L", "RGB", "RGBA", "1", "CMYK", "I;16", "F"],
    "WEBP": ["RGB", "RGBA"],
    "JPEG": ["L", "RGB", "CMYK"],
}


def encoded(fmt: str, pick: int, size: tuple[int, int], seed: int) -> bytes:
    """A small random image in `fmt`, in one of the modes that format can hold."""
    mode = WRITABLE[fmt][pick % len(WRITABLE[fmt])]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    if mode == "I;16":
        img = Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257)
    elif mode == "F":
        img = Image.fromarray(pixels[:, :, 0].astype(np.float32) / 7)
    else:
        img = img.convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = st.builds(
    encoded,
    st.sampled_from(sorted(WRITABLE)),
    st.integers(0, 6),
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.integers(0, 100),
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the corrupt TIFF tags it skips
@searched(150)
@given(
    data=st.one_of(st.binary(max_size=300), IMAGES),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 400)),
    kind=st.sampled_from(["handwriting", "object"]),
)
def test_uploaded_bytes_decode_to_a_28x28_digit_or_refuse(data, edits, cut, kind):
    raw = bytearray(data)
    for pos, value in edits:
        if raw:
            raw[pos % len(raw)] = value
    raw = raw[:cut] if cut is not None else raw
    digit = works_or_refuses(load_digit, bytes(raw), kind, "upload.png")
    if digit is not REFUSED:
        assert digit.shape == (28, 28) and digit.dtype == np.float32
        assert np.isfinite(digit).all() and 0 <= digit.min() and digit.max() <= 1


# --- --seeds ------------------------------------------------------------------------------------------------------

SEED_TEXT = st.one_of(
    st.text(alphabet="0123456789-, \t", max_size=20),
    st.lists(
        st.one_of(
            st.integers(0, 2**64 + 5).map(str),
            st.tuples(st.integers(0, 2**64), st.integers(0, 50)).map(lambda ab: f"{ab[0]}-{ab[0] + ab[1]}"),
        ),
        min_size=1,
        max_size=4,
    ).map(",".join),
    st.text(max_size=10),
)


@searched(200)
@given(SEED_TEXT)
def test_seeds_parse_to_distinct_usable_seeds_or_refuse(text):
    seeds = works_or_refuses(parse_seeds, text)
    if seeds is not REFUSED:
        assert seeds and len(set(seeds)) == len(seeds)
        assert all(0 <= s < 2**63 for s in seeds)  # what torch.manual_seed and the run's int64 fields take
