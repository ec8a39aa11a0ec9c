"""Typed configuration: one dataclass per concern; recipes are TOML files.

    cfg = load_config("seed", overrides={"epochs": 5, "optim.lr": 2e-3})
    cfg.optim.lr                     # 0.002
    dump_toml(cfg)                   # the resolved config, as written to config.toml

A recipe file holds any subset of the fields below (nested ones as [optim],
[augment], [run] tables). Unknown keys, wrong types and out-of-range values
are ConfigErrors, whether they come from a file or the command line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mnist_cnn.errors import ConfigError, first_line

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("mnist_cnn")
RECIPES_DIR = Path(__file__).parent / "recipes"
BRIEF_CHARS = 80  # of a value quoted in a one-line error
TOO_DEEP = "arrays or tables nested too deeply to read"
DataclassT = TypeVar("DataclassT", bound="DataclassInstance")


@dataclass
class AugmentConfig:
    zoom_p: float = 0.1  # probability of the seed's "centre-crop then resize to 28" zoom
    zoom_crop: int = 22  # side of that crop: a zoom of 28/22
    max_rotation: float = 15.0  # degrees; each sample draws uniformly in +-max_rotation
    max_shift: float = 0.0  # pixels per axis, uniform in +-max_shift (the seed has none)
    # nearest: the seed's torchvision RandomRotation (its default); bilinear: one smoother warp
    interpolation: str = "nearest"
    hflip_p: float = 0.0  # probability of a left-right mirror: right for clothes, wrong for digits
    max_scale: float = 0.0  # each sample's scale times a factor uniform in 1 +- max_scale
    elastic: float = 0.0  # pixels: a smooth random displacement field of about this size (data.augment)

    @property
    def warps(self) -> bool:
        """Whether any sample is moved (a grid_sample to do); a mirror alone is not a warp."""
        return self.zoom_p > 0 or self.max_rotation > 0 or self.max_shift > 0 or self.max_scale > 0 or self.elastic > 0

    @property
    def enabled(self) -> bool:
        return self.warps or self.hflip_p > 0


@dataclass
class OptimConfig:
    name: str = "adam"  # a key of training.state.OPTIMIZERS: adam | adamw | sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    schedule: str = "step"  # a key of training.state.SCHEDULES: step | onecycle | cosine | constant
    step_size: int = 15  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    warmup: float = 0.2  # onecycle: fraction of steps spent rising to lr
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights (0 = off); evaluated and saved
    lr_found: str = ""  # train --lr auto: how lr-find read the rate (its reason); "" when lr was given


@dataclass
class DistillConfig:
    """Knowledge distillation (training.distill): on when teachers are named (train --teacher)."""

    teachers: list[str] = field(default_factory=list)  # run folders or model files; recorded as absolute paths
    sha256: list[str] = field(default_factory=list)  # of each teacher's file, recorded when the run starts
    temperature: float = 4.0  # T: both sides' logits divided by T before the KL term
    alpha: float = 0.5  # weight of the KL term; 1 - alpha on the label loss


@dataclass
class RunConfig:
    """How and where a run happens; none of it is part of a recipe's result."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto picks CUDA when present
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; the loss stays fp32). auto: bf16 where
    # the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32
    channels_last: bool = True  # NHWC convolutions: ~1.4x faster on the 2-core CPU
    compile: str = "no"  # no | model: torch.compile the network | step: the whole training step as one
    # function (training.graph), compiled whole. Both measured no faster than eager on the 2-core CPU
    threads: int = 0  # CPU threads for torch; 0 = torch's default (one per core)
    deterministic: bool = False  # torch.use_deterministic_algorithms; bitwise-repeatable on CPU
    data_dir: str = ""  # "" = $MNIST_CNN_DATA, else the cache folder
    out: str = ""  # "" = runs/<timestamp>
    train_limit: int = 0  # 0 = all; else only the first N training images (quick runs)
    verify: bool = True  # SHA-256 check of the data; turn off only for your own IDX files
    progress: bool = True  # tqdm bar per epoch (hidden anyway when stderr is not a terminal)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over all processes (CUDA only)
    tensorboard: bool = False  # also write TensorBoard event files into the run folder
    test: bool = True  # evaluate on the test split each epoch; false (tune): the test files are never read
    together: str = "auto"  # with --seeds: yes = train the seeds stacked in one model (training.stack), no = one
    # after another; auto = yes on CUDA, no on the CPU (measured slower there). Stored configs say what ran.


@dataclass
class Config:
    recipe: str = "seed"  # where the values came from; informational
    about: str = ""  # one line on what the recipe is for
    dataset: str = "mnist"  # a name in datasets.DATASETS
    model: str = "seed"  # a name in models.MODELS, or path/to/file.py:Class, or package.module:Class
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the network's constructor
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 1000  # evaluation only; does not change results
    val_size: int = 0  # training images held out for validation (0 = none, as the seed)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)


MAX_SEED = 2**63 - 1  # torch's generators take seeds below 2**63 (training.keys.rng_key's range too)

CHOICES = {
    "optim.name": ("adam", "adamw", "sgd"),  # adamw: Adam with decoupled weight decay (optim.weight_decay)
    "optim.schedule": ("step", "onecycle", "cosine", "constant"),
    "run.precision": ("auto", "fp32", "bf16"),
    "run.together": ("auto", "yes", "no"),
    "run.compile": ("no", "model", "step"),
    "augment.interpolation": ("nearest", "bilinear"),
}


def brief(value: Any, limit: int = BRIEF_CHARS) -> str:
    """repr(value) on one line, cut to `limit` characters: a crafted file's value quoted in a one-line
    error (a tensor's repr has a line per row)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def read_recipe(recipe: str) -> dict[str, Any]:
    """A recipe by name (a file in recipes/) or by path to a .toml file."""
    path = Path(recipe)
    if path.suffix != ".toml":
        path = RECIPES_DIR / f"{recipe}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe {recipe!r}; known: {', '.join(list_recipes())}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"recipe file {path}: {first_line(e)}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"recipe file {path}: {TOO_DEEP}") from None


def load_config(recipe: str = "seed", overrides: dict[str, Any] | None = None) -> Config:
    values = read_recipe(recipe)
    values.setdefault("recipe", Path(recipe).stem if recipe.endswith(".toml") else recipe)
    forget_run_folder(values, recipe, overrides or {})
    cfg = from_dict(Config, values)
    for key, value in (overrides or {}).items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def forget_run_folder(values: dict[str, Any], recipe: str, overrides: dict[str, Any]) -> None:
    """A recipe says what to train, not where it went: a run's config.toml, itself a recipe, records
    the folder that run wrote (run.out), and a run started from it writes a folder of its own (--out,
    else runs/<time>), never the old one, which may even have moved away since. Everything else is
    kept as the run recorded it: the precision and together it resolved (what ran), its data folder,
    its teachers with their SHA-256 (a changed teacher is refused)."""
    run = values.get("run")
    if not isinstance(run, dict) or "out" not in run:
        return
    old = run.pop("out")
    if old and "run.out" not in overrides:
        log.info("%s: its run.out %s is not reused; this run writes a folder of its own (--out names it)", recipe, old)


def from_dict(cls: type[DataclassT], values: dict[str, Any], prefix: str = "") -> DataclassT:
    """Build dataclass `cls` from `values`, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in values if k not in known), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{shown_key(str(unknown[0]))}; known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind = hints[name]
        if _base(kind) is dict:  # dict[str, Any]: a free-form table
            kwargs[name] = check_table(f"{prefix}{name}", value)
        elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = check_type(f"{prefix}{name}", value, kind)
    return cls(**kwargs)


def _base(kind: Any) -> Any:
    """The class a type hint checks against: dict for dict[str, Any], the hint itself for a plain class."""
    return typing.get_origin(kind) or kind


# Values that older versions wrote, read as today's: run.compile was a boolean before 0.5.0.
OLD_VALUES: dict[str, dict[bool, str]] = {"run.compile": {False: "no", True: "model"}}


def check_type(key: str, value: Any, kind: Any) -> Any:
    if isinstance(value, bool) and key in OLD_VALUES:
        value = OLD_VALUES[key][value]
    base = _base(kind)  # isinstance() needs a class, not dict[str, Any]
    if base is dict:  # model_args as a whole (--set 'model_args={width = 8}'): the same checks as its keys
        return check_table(key, value)
    # bool is a subclass of int in Python; a config value of `true` is not a number.
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key} must be a float, got the integer {brief(value)}, too large for one") from None
    if isinstance(value, base) and not (base is not bool and isinstance(value, bool)):
        if base is list:
            check_plain(key, value)
        return check_text(key, value) if base is str else value
    raise ConfigError(f"{key} must be {base.__name__}, got {type(value).__name__} {brief(value)}")


def check_table(key: str, value: Any) -> dict[str, Any]:
    """A free-form table (model_args): string keys, values TOML scalars or (nested) lists of them."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table, got {type(value).__name__} {brief(value)}")
    for k, v in value.items():
        if not isinstance(k, str):
            raise ConfigError(f"{key} keys must be strings, got {brief(k)}")
        check_text(f"{key}.{shown_key(k)}", k)
        check_plain(f"{key}.{shown_key(k)}", v)
    return dict(value)


def check_plain(key: str, value: Any) -> None:
    """A number, string, boolean or a list of those (nested lists too): what a config.toml can hold
    and read back (a table inside a list, or a TOML date, cannot be a constructor's argument here)."""
    if isinstance(value, list):
        for item in value:
            check_plain(key, item)
    elif isinstance(value, str):
        check_text(key, value)
    elif not isinstance(value, (bool, int, float)):
        raise ConfigError(f"{key} must be a number, string, boolean or list of those, got {type(value).__name__}")


def check_text(key: str, value: str) -> str:
    """A string that can be written as UTF-8 (a lone surrogate from a JSON or pickled config cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{key} is not valid text: {brief(value)}") from None
    return value


def shown_key(key: str) -> str:
    """A config key as written in a one-line error: as is when printable, else quoted with escapes."""
    return key if key.isprintable() and len(key) <= BRIEF_CHARS else brief(key)


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key ("optim.lr", "model_args.width") on cfg, with the same checks as a recipe file."""
    *parents, name = key.split(".")
    if parents == ["model_args"]:
        cfg.model_args[name] = check_table("model_args", {name: value})[name]
        return
    target = cfg
    for part in parents:
        if not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
            raise ConfigError(f"unknown config key {shown_key(key)}")
        target = getattr(target, part)
    hints = typing.get_type_hints(type(target))
    if name not in hints or dataclasses.is_dataclass(hints[name]):
        raise ConfigError(f"unknown config key {shown_key(key)}")
    setattr(target, name, check_type(key, value, hints[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=2e-3' -> ('optim.lr', 0.002); a value that is not TOML is a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ConfigError(f"override {brief(text)}: {TOO_DEEP}") from None
    return key.strip(), value


def numbers(*sections: Any) -> list[tuple[dataclasses.Field[Any], float]]:
    """The float fields of config sections, with their values."""
    found = [(f, getattr(s, f.name)) for s in sections for f in dataclasses.fields(s)]
    return [(f, v) for f, v in found if isinstance(v, float)]


def validate(cfg: Config) -> None:
    from mnist_cnn.networks.builtin import MODELS  # late: models does not depend on config

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(
        cfg.model in MODELS or ":" in cfg.model,
        f"unknown model {cfg.model!r}; known: {', '.join(sorted(MODELS))}, or path/to/file.py:Class, "
        "or package.module:Class",
    )
    from mnist_cnn.data.datasets import DATASETS

    need(cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}")
    need(cfg.epochs > 0, f"epochs must be > 0, got {cfg.epochs}")
    need(cfg.batch_size > 0, f"batch_size must be > 0, got {cfg.batch_size}")
    need(cfg.eval_batch_size > 0, f"eval_batch_size must be > 0, got {cfg.eval_batch_size}")
    need(cfg.val_size >= 0, f"val_size must be >= 0, got {cfg.val_size}")
    o, a, r = cfg.optim, cfg.augment, cfg.run
    infinite = [f"{f.name} must be a finite number, got {v}" for f, v in numbers(o, a, cfg.distill) if math.isinf(v)]
    need(not infinite, infinite[0] if infinite else "")  # inf passes every bound below and diverges later
    need(0 <= r.seed <= MAX_SEED, f"run.seed must be in 0..{MAX_SEED} (2**63 - 1, what torch's generators take)")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.step_size > 0, f"optim.step_size must be > 0, got {o.step_size}")
    need(0 < o.gamma <= 1, f"optim.gamma must be in (0, 1], got {o.gamma}")
    need(0 <= o.warmup < 1, f"optim.warmup must be in [0, 1), got {o.warmup}")
    need(0 <= o.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    need(0 <= o.ema < 1, f"optim.ema must be in [0, 1) (0 = off), got {o.ema}")
    need(0 <= a.zoom_p <= 1, f"augment.zoom_p must be in [0, 1], got {a.zoom_p}")
    need(0 < a.zoom_crop <= 28, f"augment.zoom_crop must be in 1..28, got {a.zoom_crop}")
    need(0 <= a.max_rotation <= 180, f"augment.max_rotation must be in [0, 180], got {a.max_rotation}")
    need(0 <= a.max_shift <= 14, f"augment.max_shift must be in [0, 14] pixels, got {a.max_shift}")
    need(0 <= a.hflip_p <= 1, f"augment.hflip_p must be in [0, 1], got {a.hflip_p}")
    need(0 <= a.max_scale < 1, f"augment.max_scale must be in [0, 1), got {a.max_scale}")
    need(0 <= a.elastic <= 14, f"augment.elastic must be in [0, 14] pixels, got {a.elastic}")
    d = cfg.distill
    need(d.temperature > 0, f"distill.temperature must be > 0, got {d.temperature}")
    need(0 <= d.alpha <= 1, f"distill.alpha must be in [0, 1], got {d.alpha}")
    need(all(isinstance(t, str) and t for t in d.teachers), "distill.teachers must be a list of paths")
    need(
        all(isinstance(h, str) for h in d.sha256) and len(d.sha256) in (0, len(d.teachers)),
        "distill.sha256 must hold one digest per teacher",
    )
    need(r.train_limit >= 0, f"run.train_limit must be >= 0, got {r.train_limit}")
    need(r.threads >= 0, f"run.threads must be >= 0, got {r.threads}")
    need(r.test or cfg.val_size > 0, "run.test = false needs val_size > 0: a run must be scored on some split")
    need(
        r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"),
        f"run.device must be auto, cpu or cuda[:N], got {r.device!r}",
    )
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        need(value in allowed, f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_checkpoint(values: dict[str, Any]) -> Config:
    cfg = from_dict(Config, values)
    validate(cfg)
    return cfg


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML that load_config() reads back unchanged."""
    top, tables = [], []
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):  # the sections, and model_args
            tables.append(f"\n[{key}]")
            tables += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
        else:
            top.append(f"{key} = {_toml_value(value)}")
    return "\n".join(top + tables) + "\n"


BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML's bare keys; any other key is written as a quoted string


def _toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # TOML writes inf, -inf and nan as Python does
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped, everything else as is
    (json.dumps would write characters past U+FFFF as surrogate pairs, which TOML refuses)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in escaped) + '"'
