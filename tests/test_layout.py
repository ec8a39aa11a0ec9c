"""The package's shape: imports run one way between the parts, and functions stay small.

Read from the source with ast, lazy imports inside functions included, so a shortcut taken
anywhere fails here rather than in a reader's head."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mnist_cnn"
MAX_LINES, MAX_PARAMS = 60, 8  # per function, in src/
# A built-in network's constructor takes one scalar per searchable choice (`tune` suggests each as
# model_args.NAME), so its parameter list is its search space: not bundled into a config object.
SEARCH_SPACES = {"networks/builtin.py:__init__"}
# The Python API's evaluate and export take their command's flags one for one, keyword-only (the CLI is
# a loop over them): what a caller names, not a bag that a loop threads through.
FLAG_MIRRORS = {"api.py:evaluate", "api.py:export"}

PARTS = ("data", "networks", "training", "inference", "serving", "tuning", "checkpoint", "cli", "api")
GROUND_IMPORTS_NONE = {*PARTS, "config", "files", "plots", "pretrained"}  # what a ground module must not import
# part -> the parts it must never import (the top-level modules count as parts of their own)
FORBIDDEN = {
    "data": {"networks", "training", "inference", "serving", "tuning", "checkpoint", "cli", "api"},
    "networks": {"training", "inference", "serving", "tuning", "checkpoint", "cli", "api"},
    "checkpoint": {"training", "inference", "serving", "tuning", "cli", "api"},
    "inference": {"training", "serving", "tuning", "cli", "api"},
    "serving": {"training", "tuning", "cli", "api"},
    "training": {"serving", "tuning", "cli", "api"},
    "tuning": {"serving", "cli", "api"},
    "config": {"training", "inference", "serving", "tuning", "checkpoint", "cli", "api"},
    "device": {"data", "networks", "training", "inference", "serving", "tuning", "cli", "api"},
    "errors": {"data", "networks", "training", "inference", "serving", "tuning", "checkpoint", "cli", "api"},
    "files": {"data", "networks", "training", "inference", "serving", "tuning", "checkpoint", "cli", "api"},
    "plots": {"training", "inference", "serving", "tuning", "cli", "api"},
    "api": {"cli"},
    # ground modules that any part may import: they import none of the package's parts
    "version": GROUND_IMPORTS_NONE,
    "say": GROUND_IMPORTS_NONE,
    "pretrained": {"data", "networks", "training", "inference", "serving", "tuning", "checkpoint", "cli", "api"},
}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def part_of(name: str) -> str:
    """'mnist_cnn.training.loop' -> 'training'; 'mnist_cnn' -> ''."""
    return name.split(".")[1] if name.count(".") >= 1 else ""


def module_name(path: Path) -> str:
    return "mnist_cnn." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported(path: Path, here: str) -> set[str]:
    """The mnist_cnn modules (or names in the package root) that the file of module `here` imports,
    anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnist_cnn")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = here.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            if base == "mnist_cnn":  # from mnist_cnn import api / __version__
                found |= {f"mnist_cnn.{a.name}" for a in node.names}
            elif base.startswith("mnist_cnn"):
                found.add(base)
    return found


def violations(files: list[tuple[Path, str]]) -> list[str]:
    broken = []
    for path, here in files:
        for name in sorted(imported(path, here)):
            if part_of(name) in FORBIDDEN.get(part_of(here), set()):
                broken.append(f"{here} imports {name}")
    return broken


def test_imports_run_one_way_between_the_parts():
    files = [(path, module_name(path)) for path in modules()]
    assert {"mnist_cnn.cli", "mnist_cnn.training.loop", "mnist_cnn.data.idx"} <= {here for _, here in files}
    assert imported(PACKAGE / "cli.py", "mnist_cnn.cli") >= {"mnist_cnn.api"}  # the reader sees real imports
    broken = violations(files)
    assert not broken, "\n".join(broken)


def test_the_rules_see_a_forbidden_import(tmp_path):
    """The checker itself: lazy and relative imports of what a part must not see are caught."""
    source = tmp_path / "x.py"
    source.write_text(
        "import torch\n\ndef f():\n    from mnist_cnn.training.loop import fit\n"
        "    from ..cli import main\n    from . import inputs\n"
    )
    assert violations([(source, "mnist_cnn.data.idx")]) == [
        "mnist_cnn.data.idx imports mnist_cnn.cli",
        "mnist_cnn.data.idx imports mnist_cnn.training.loop",
    ]
    assert violations([(source, "mnist_cnn.training.run")]) == ["mnist_cnn.training.run imports mnist_cnn.cli"]


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def sizes(paths: list[Path], root: Path = PACKAGE) -> list[tuple[int, int, str]]:
    """(lines, parameters, 'file:function') for every function in the files (src/'s by default)."""
    out = []
    for path in paths:
        for fn in functions(ast.parse(path.read_text())):
            a = fn.args
            params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            params += [p for p in (a.vararg, a.kwarg) if p is not None]
            out.append((fn.end_lineno - fn.lineno + 1, len(params), f"{path.relative_to(root)}:{fn.name}"))
    return out


def oversized(measured: list[tuple[int, int, str]]) -> list[str]:
    too_long = [f"{where}: {n} lines" for n, _, where in measured if n > MAX_LINES]
    too_many = [
        f"{where}: {p} parameters"
        for _, p, where in measured
        if p > MAX_PARAMS and where not in SEARCH_SPACES | FLAG_MIRRORS
    ]
    return too_long + too_many


def test_no_function_is_over_60_lines_or_8_parameters():
    measured = sizes(modules())
    assert len(measured) > 100 and any(where == "cli.py:main" for _, _, where in measured)  # it read src/
    broken = oversized(measured)
    assert not broken, "\n".join(broken)


def test_the_size_rule_sees_a_long_function_and_a_long_parameter_list(tmp_path):
    """The checker itself: 61 lines, or 9 parameters (self not counted; *args and **kwargs are)."""
    lines = [f"    x{i} = {i}\n" for i in range(59)]
    source = tmp_path / "x.py"
    source.write_text(
        "def long():\n" + "".join(lines) + "    return 0\n\n"  # 61 lines
        "def fits():\n" + "".join(lines[:-1]) + "    return 0\n\n"  # 60 lines
        "class C:\n    def many(self, a, b, c, d, e, f, g, *args, **kwargs):\n        pass\n\n"  # 9
        "    def enough(self, a, b, c, d, e, f, /, g, *, h):\n        pass\n"  # 8
    )
    measured = sizes([source], root=tmp_path)
    assert [(n, p) for n, p, _ in measured] == [(61, 0), (60, 0), (2, 9), (2, 8)]
    assert oversized(measured) == ["x.py:long: 61 lines", "x.py:many: 9 parameters"]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among modules (each found once, from its smallest name)."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.append([*path, nxt])
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_no_module_imports_itself_back_through_others():
    """training.graph and training.loop imported each other once: no import circle in src/."""
    names = {module_name(path): path for path in modules()}
    graph = {here: {n for n in imported(path, here) if n in names and n != here} for here, path in names.items()}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the search sees one
    assert not cycles(graph), "\n".join(" -> ".join(c) for c in cycles(graph))


CHECKPOINT_KEYS = ("format", "version", "mnist_cnn", "config", "network", "model", "train_model", "optimizer")
CHECKPOINT_KEYS += ("scheduler", "epoch", "metrics", "partial")


def checkpoint_readers(files: list[Path]) -> list[str]:
    """file:line of every torch.load / torch.save, and every subscript of a checkpoint's entries
    (ckpt["model"], ...), outside mnist_cnn/checkpoint.py: the one module that knows the file's keys."""
    subscript = re.compile(r"(ckpt|checkpoint|raw)\[\"(" + "|".join(CHECKPOINT_KEYS) + r")\"\]")
    call = re.compile(r"(?<!`)torch\.(load|save)\(")  # not `torch.load(...)` quoted in a model card's text
    found = []
    for path in files:
        if path.name == "checkpoint.py" and path.parent.name == "mnist_cnn":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if call.search(line.split("#")[0]) or subscript.search(line):
                found.append(f"{path.name}:{number}")
    return found


def test_only_the_checkpoint_module_reads_or_writes_a_checkpoints_keys():
    assert checkpoint_readers(modules()) == []


def test_the_checkpoint_rule_sees_a_reader(tmp_path):
    other = tmp_path / "seeds.py"
    other.write_text('x = 1\nepochs = ckpt["epoch"]\nw = torch.load(f, weights_only=True)\n')
    assert checkpoint_readers([other]) == ["seeds.py:2", "seeds.py:3"]
