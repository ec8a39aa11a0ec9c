"""Any network by reference: a built-in name, `path/to/file.py:Class` or `package.module:Class`.

    net = locate("examples/gap_net.py:GapNet")        # the class, its source file and SHA-256
    model = create(net, num_classes=10, model_args={"width": 12})
    check_contract(model, num_classes=10, device)     # a test batch, before any run folder exists

A checkpoint holds no code, but a user network is code: the checkpoint records the
reference and the source's SHA-256, and the run folder keeps a copy of the source
(SOURCE_COPY). A reference the user names (train --model) is imported; one that a
checkpoint names is imported only with trust_code (`--trust-code`), like Hugging
Face's trust_remote_code, since a run folder may come from anyone:

    net = locate(cfg.model, copy=run / SOURCE_COPY, trust_code=False)  # ConfigError: what would run

Loading imports from the reference, or from that copy when the original has moved;
a changed source is a warning, a missing one a one-line error that says where it looked.
Finding the file runs nothing: not the module, not its parent packages.

A network can also be a Python object the caller holds (a class written in a notebook cell):
an nn.Module instance, its class, or a zero-argument factory. Its reference is
`object:module.QualName`, what a run folder records (with the class's source and its SHA-256
where inspect can get it); the object itself is handed over for the length of a call:

    with given_networks({reference_of(Net): Net}):   # what mnist_cnn.train(model=Net) does
        net = locate("object:__main__.Net")           # a class: each create() builds a new one, seeded
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib.util
import inspect
import linecache
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from mnist_cnn.config import brief
from mnist_cnn.data.contract import normalize
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.data.idx import IMAGE_SIZE
from mnist_cnn.errors import ConfigError, first_line
from mnist_cnn.networks.builtin import MODELS, count_parameters

log = logging.getLogger("mnist_cnn")

SOURCE_COPY = "network_source.py"  # the network's source file, copied into the run folder
CHECK_BATCH = 2  # images in the contract's test batch (2: BatchNorm needs more than one in training mode)
# Bounds on a network before it is built (create): a stored config is data, and a crafted one must not
# allocate unbounded memory. The family's most classes are EMNIST letters' 26; its networks have at
# most tens of thousands of parameters (the teacher 72,666) in at most a hundred parameter tensors.
MAX_CLASSES = 1_000
MAX_PARAMETERS = 100_000_000  # 400 MB in fp32
MAX_PARAMETER_TENSORS = 2_000  # a FamilyNet with d1 = 10**9 would take hours to build, even on the meta device
KWARGS_CHARS = 160  # of a network's constructor arguments quoted in a one-line error


OBJECT = "object:"  # the reference of a network handed over as a Python object: object:module.QualName
GIVEN_KINDS = ("instance", "class", "factory")  # how a network object was handed over

# A network object handed over by the caller: an instance, its class, or a zero-argument factory.
GivenModel = nn.Module | type[nn.Module] | Callable[[], nn.Module]
_given: ContextVar[dict[str, GivenModel]] = ContextVar("mnist_cnn_given_networks", default={})


@dataclass
class Network:
    reference: str  # a built-in name, "/abs/path/file.py:Class", "package.module:Class" or "object:module.Class"
    cls: type[nn.Module]
    source: Path | None = None  # the file the class was imported from (None for built-ins and objects)
    sha256: str | None = None  # of that file, or of an object's class source
    given: GivenModel | None = None  # the object itself, for an object: reference
    source_text: str | None = None  # an object's class source, where inspect can read it

    @property
    def builtin(self) -> bool:
        return self.source is None and self.given is None

    @property
    def kind(self) -> str | None:
        """How an object network was handed over: instance, class or factory (None for the others)."""
        if self.given is None:
            return None
        if isinstance(self.given, nn.Module):
            return "instance"
        return "class" if inspect.isclass(self.given) else "factory"


def is_object(reference: str) -> bool:
    return reference.startswith(OBJECT)


def reference_of(given: Any) -> str:
    """object:module.QualName of a network object: for a factory, of the function (its class is known
    only once it has built one)."""
    if isinstance(given, nn.Module):
        given = type(given)
    elif not (inspect.isclass(given) and issubclass(given, nn.Module)) and not callable(given):
        raise ConfigError(
            f"model must be a built-in name, a file.py:Class reference, or an nn.Module (an instance, its class "
            f"or a factory that returns one), got {type(given).__name__}"
        )
    if inspect.isclass(given) and not issubclass(given, nn.Module):
        raise ConfigError(f"model {given.__qualname__} is a class, but not an nn.Module")
    module = getattr(given, "__module__", None) or "unknown"
    return f"{OBJECT}{module}.{getattr(given, '__qualname__', type(given).__name__)}"


@contextmanager
def given_networks(objects: dict[str, GivenModel]) -> Iterator[None]:
    """The network objects that object: references name, for the length of the block (this thread's)."""
    token = _given.set({**_given.get(), **objects})
    try:
        yield
    finally:
        _given.reset(token)


def source_of(thing: Any) -> str | None:
    """A class's or function's source, where inspect can read it, or a notebook cell's class (cell_class_source)."""
    try:
        return inspect.getsource(thing)
    except (OSError, TypeError):
        return cell_class_source(thing) if inspect.isclass(thing) else None


def cell_class_source(cls: type) -> str | None:
    """A class defined in a notebook cell: inspect looks for the class in its module's file, which
    __main__ of a kernel has not, but IPython keeps each cell's text in linecache under the name its
    functions' code carries; the class is the `class` block there that holds one of its methods."""
    for function in vars(cls).values():
        if not inspect.isfunction(function):
            continue
        code = function.__code__
        lines = linecache.getlines(code.co_filename)
        try:
            tree = ast.parse("".join(lines))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ClassDef)
                and node.name == cls.__name__
                and node.lineno <= code.co_firstlineno <= (node.end_lineno or node.lineno)
            ):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                return "".join(lines[first - 1 : node.end_lineno])
    return None


def object_network(reference: str) -> Network:
    """The Network of an object: reference handed over by given_networks(), or a one-line error that
    says how to hand it over (a run folder holds no code)."""
    given = _given.get().get(reference)
    if given is None:
        qualname = reference[len(OBJECT) :].rsplit(".", 1)[-1]
        raise ConfigError(
            f"its network {reference[len(OBJECT) :]} was handed to train() as a Python object, and a run folder "
            f"holds no code: give the class again, mnist_cnn.load(path, model={qualname}) in Python, or "
            f"--model path/to/file.py:{qualname} on the command line"
        )
    cls: type[nn.Module] = nn.Module  # a factory's class is known once it has built a network
    if isinstance(given, nn.Module):
        cls = type(given)
    elif inspect.isclass(given) and issubclass(given, nn.Module):
        cls = given
    text = source_of(given if cls is nn.Module else cls)  # a factory: its own source
    digest = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
    return Network(reference, cls, None, digest, given, text)


def is_reference(name: str) -> bool:
    """Whether `name` points at user code rather than a built-in model."""
    return ":" in name


def canonical(reference: str) -> str:
    """A file reference with its path made absolute, so it still resolves from another folder."""
    if not is_reference(reference):
        return reference
    target, _, cls = reference.rpartition(":")
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{cls}"
    return reference


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locate(
    reference: str, copy: Path | None = None, recorded_sha256: str | None = None, trust_code: bool = True
) -> Network:
    """The class behind `reference`. `copy` is the run folder's copy of the source, used when
    the original cannot be found; recorded_sha256 is what the source was at training time.
    trust_code=False (a reference read from a checkpoint, not named by the user) refuses to
    import user code, with a ConfigError that names the file, its SHA-256 and the class.
    An object: reference is the object given_networks() handed over (object_network)."""
    if is_object(reference):
        return object_network(reference)
    if not is_reference(reference):
        if reference not in MODELS:
            raise ConfigError(
                f"unknown model {reference!r}; known: {', '.join(sorted(MODELS))}, "
                "or path/to/file.py:Class, or package.module:Class"
            )
        return Network(reference, MODELS[reference])
    target, _, cls_name = reference.rpartition(":")
    if not target or not cls_name.isidentifier():
        raise ConfigError(f"model {reference!r}: write path/to/file.py:ClassName or package.module:ClassName")
    source = Path(target).expanduser() if target.endswith(".py") else _module_file(target)
    looked = [str(source) if source is not None else f"module {target}"]
    moved = source is None or not source.is_file()
    if source is None or moved:
        if copy is None or not copy.is_file():
            where = " and ".join(looked + ([str(copy)] if copy is not None else []))
            raise ConfigError(f"network source for {reference!r} not found (looked in {where})")
        source = copy
    digest = file_sha256(source)
    if not trust_code:
        raise ConfigError(
            f"loading it runs Python code: class {cls_name} from {source} (SHA-256 {digest[:12]}...); "
            "pass --trust-code (trust_code=True in Python) if you trust where it came from"
        )
    if moved:
        log.warning("%s is not there any more: using the copy %s", looked[0], copy)
    if recorded_sha256 and digest != recorded_sha256:
        log.warning(
            "%s changed since this model was trained (SHA-256 %s..., trained with %s...)",
            source,
            digest[:12],
            recorded_sha256[:12],
        )
    module = _import_file(source, digest)
    cls = getattr(module, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{source} has no nn.Module class {cls_name!r}")
    return Network(reference, cls, source, digest)


def _module_file(dotted: str) -> Path | None:
    """The file of a module, looked for as `python -m` would (the current folder first, then
    sys.path), importing nothing: importlib.util.find_spec would run the parent packages'
    __init__.py, and a checkpoint's reference must not run code before it is trusted."""
    added = str(Path.cwd()) not in sys.path
    if added:
        sys.path.insert(0, str(Path.cwd()))
    try:
        parts = dotted.split(".")
        spec, search = None, None  # search: None = sys.path; then the package's own folders
        for i in range(len(parts)):
            name = ".".join(parts[: i + 1])
            spec = _find_spec(name, search)
            if spec is None:
                return None
            search = spec.submodule_search_locations
            if search is None and name != dotted:
                return None  # a module, not a package: it has no sub-modules
    except (ImportError, ValueError):
        return None
    finally:
        if added:
            sys.path.remove(str(Path.cwd()))
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _find_spec(name: str, search: list[str] | None) -> ModuleSpec | None:
    """What the import system's finders say about `name`; finding runs no module code."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, search) if find is not None else None
        if spec is not None:
            return spec
    return None


def _import_file(path: Path, digest: str) -> ModuleType:
    name = f"mnist_cnn_network_{digest[:16]}"  # one module per source version
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # only for a file that is not Python source
        raise ConfigError(f"{path}: cannot import it: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any failure is theirs to fix, in one line
        del sys.modules[name]
        raise ConfigError(f"{path}: cannot import it: {type(e).__name__}: {e}") from None
    return module


def create(
    net: Network,
    num_classes: int,
    model_args: dict[str, Any] | None = None,
    check: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """An instance; num_classes is passed when the constructor names it (the data decides it).
    The network is first built on the meta device, which allocates nothing, and refused when it
    is larger than the bounds above (a crafted checkpoint's model_args or num_classes would
    otherwise fill memory, or loop for hours over a billion layers); `check` sees that empty
    copy too (checkpoint: do the stored weights fit it?). A user network whose constructor
    cannot run on the meta device is built directly: its code is trusted, its size checked after."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must be 1..{MAX_CLASSES:,} (MAX_CLASSES), got {brief(num_classes)}")
    if net.kind in ("instance", "factory"):
        return given_model(net, model_args, check)
    kwargs = dict(model_args or {})
    if "num_classes" in inspect.signature(net.cls).parameters:
        kwargs.setdefault("num_classes", num_classes)
    built = f"model {net.reference} with {brief(kwargs, KWARGS_CHARS)}"
    try:
        with Bounded(), torch.device("meta"):
            skeleton: nn.Module | None = net.cls(**kwargs)
    except TooLarge as e:
        raise ConfigError(f"{built}: {e}") from None
    except Exception as e:  # a wrong model_args key, or the constructor failing (or needing real tensors)
        if net.builtin:
            raise ConfigError(f"{built}: cannot build it: {type(e).__name__}: {first_line(e)}") from None
        skeleton = None
    if skeleton is not None and check is not None:
        check(skeleton)
    try:
        model = net.cls(**kwargs)
    except Exception as e:  # the user's constructor failing
        raise ConfigError(f"{built}: cannot build it: {type(e).__name__}: {first_line(e)}") from None
    if skeleton is None:
        if count_parameters(model) > MAX_PARAMETERS:
            raise ConfigError(f"{built}: {TooLarge.parameters(count_parameters(model))}")
        if check is not None:
            check(model)
    return model


def given_model(
    net: Network, model_args: dict[str, Any] | None, check: Callable[[nn.Module], None] | None
) -> nn.Module:
    """The network of an object handed over as an instance (itself: trained as it is, its weights as the
    caller set them) or a factory (called, under the seed the caller's run set)."""
    if model_args:
        raise ConfigError(f"model_args are for a class; {net.reference} was given as an {net.kind}")
    if net.kind == "instance":
        model = net.given
    else:
        try:
            model = net.given()  # type: ignore[misc]  # a factory, by kind
        except Exception as e:  # the caller's code: its failure, in one line
            raise ConfigError(f"the model factory failed: {type(e).__name__}: {first_line(e)}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the model factory returned a {type(model).__name__}, not an nn.Module")
    assert isinstance(model, nn.Module)
    if count_parameters(model) > MAX_PARAMETERS:
        raise ConfigError(f"{net.reference}: {TooLarge.parameters(count_parameters(model))}")
    if check is not None:
        check(model)
    return model


class TooLarge(Exception):
    """A network past MAX_PARAMETERS or MAX_PARAMETER_TENSORS, raised while it is being built."""

    @staticmethod
    def parameters(count: int) -> str:
        return (
            f"{count:,} parameters or more, past the bound of {MAX_PARAMETERS:,} (MAX_PARAMETERS); "
            "a compact CNN has tens of thousands"
        )


class Bounded:
    """Within the block, building modules counts their parameters as they are registered (torch's
    global registration hook) and raises TooLarge past the bounds, before the constructor goes on."""

    def __enter__(self) -> Bounded:
        self.thread, self.count, self.tensors = threading.get_ident(), 0, 0
        self.handle = register_module_parameter_registration_hook(self.registered)
        return self

    def registered(self, module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if threading.get_ident() != self.thread or param is None:
            return  # another thread's modules are not this network's
        self.count += param.numel()
        self.tensors += 1
        if self.count > MAX_PARAMETERS:
            raise TooLarge(TooLarge.parameters(self.count))
        if self.tensors > MAX_PARAMETER_TENSORS:
            raise TooLarge(
                f"more than {MAX_PARAMETER_TENSORS:,} parameter tensors (MAX_PARAMETER_TENSORS): "
                "thousands of layers, where a compact CNN has tens"
            )

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def config_network_size(model: str, dataset: str, model_args: dict[str, Any]) -> int:
    """Parameters of the network a config names (built on the CPU, never trained): a recipe's
    budget line, a study's --max-params check."""
    return count_parameters(create(locate(model), get_dataset(dataset).num_classes, model_args))


def check_contract(model: nn.Module, num_classes: int, device: torch.device, name: str = "model") -> None:
    """Refuse a network that has no parameters, fails on a test batch of normalized
    (2, 1, 28, 28) images, or returns anything but (2, num_classes)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{name} has no trainable parameters")
    shape = (CHECK_BATCH, 1, IMAGE_SIZE, IMAGE_SIZE)
    x = normalize(torch.rand(shape, device=device, generator=torch.Generator(device).manual_seed(0)))
    probe = copy.deepcopy(model).train()  # the check must not touch the model's BatchNorm statistics
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as e:  # the user's forward: report it, do not crash
        raise ConfigError(
            f"{name} fails on a test batch of shape {tuple(shape)}: {type(e).__name__}: {first_line(e, 200)}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (CHECK_BATCH, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{name} returned {got} for a batch of shape {tuple(shape)}; "
            f"expected ({CHECK_BATCH}, {num_classes}): one logit or log-probability per class"
        )
