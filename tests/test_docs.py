"""The docs: README stays a two-minute read, no relative link is broken, and the generated CLI
reference (tools/docs_hooks.py, run by `mkdocs build`) lists every command of the real parser.

`make test` also builds the whole site with `mkdocs build --strict`, which checks links between
pages and their anchors; these tests are the fast part that runs with pytest alone."""

import argparse
import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "tools" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subcommand_names(parser: argparse.ArgumentParser) -> list[str]:
    return [
        name for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices
    ]


def relative_links(markdown: str) -> list[str]:
    """Link and image targets that point into the repository (no URL, no bare #anchor), outside code."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", t)]


def test_cli_reference_has_every_command_and_flag():
    from mnist_cnn.cli import build_parser

    hooks = docs_hooks()
    page = f"# Command line\n\n{hooks.MARKER}\n"
    markdown = hooks.on_page_markdown(page, page=None, config=None, files=None)
    assert hooks.MARKER not in markdown
    names = subcommand_names(build_parser())
    assert {"train", "evaluate", "predict", "serve", "export", "tune"} <= set(names)
    for name in names:
        assert f"## `mnist-cnn {name}`" in markdown, name
    train = markdown.split("## `mnist-cnn train`")[1].split("\n## ")[0]
    assert "| `--recipe RECIPE` |" in train and "usage: mnist-cnn train" in train
    assert "| `--together {auto,yes,no}` |" in train


def test_cli_reference_walks_any_parser():
    """A command added tomorrow appears with its flags; | and <...> in a help cannot break the table."""
    parser = argparse.ArgumentParser(prog="tool", description="a tool")
    sub = parser.add_subparsers(dest="command")
    new = sub.add_parser("new", help="a new command")
    new.add_argument("path", help="where")
    new.add_argument("--mode", choices=("a", "b"), default="a", help="a | b (default %(default)s)")
    new.add_argument("--out", help="default runs/<timestamp>")
    deeper = new.add_subparsers(dest="verb").add_parser("deeper", help="a nested one")
    deeper.add_argument("--flag", action="store_true")

    markdown = docs_hooks().render_cli(parser)
    assert "## `tool new`" in markdown and "a new command" in markdown and "### `tool new path deeper`" in markdown
    assert "| `--mode {a,b}` | `a` | a \\| b (default a) |" in markdown
    assert "| `path` |  | where |" in markdown and "runs/&lt;timestamp&gt;" in markdown
    assert "| `--flag` |" in markdown


def test_readme_is_a_two_minute_read():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_relative_links_point_at_files():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in relative_links(page.read_text()):
            path = target.split("#")[0].split("?")[0]
            if path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)
    assert relative_links((REPO / "README.md").read_text()), "the link pattern found no links at all"


def test_readme_results_table_is_what_compare_prints_for_the_published_runs():
    """README's results table is `mnist-cnn compare --markdown` over the runs whose rows
    docs/results/frontier.json holds (`compare --json` of the same folders)."""
    import json

    from mnist_cnn.inference.compare import format_markdown

    rows = json.loads((REPO / "docs" / "results" / "frontier.json").read_text())
    published = [r for r in rows if r["split"] == "test"]
    assert format_markdown(published) in (REPO / "README.md").read_text()
    assert format_markdown(rows) in (REPO / "docs" / "results.md").read_text()


def test_the_model_zoo_page_is_what_its_files_say():
    """docs/models.md is generated (tools/models_page.py) from the shipped models, their int8 reports and
    benchmarks, and the recipes: a changed file without a regenerated page fails here."""
    spec = importlib.util.spec_from_file_location("models_page", REPO / "tools" / "models_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "models.md").read_text() == module.page()
    for name in pretrained_names():  # each shipped model has its measured figures
        report = json.loads((REPO / "docs" / "results" / "zoo" / f"{name}-int8.json").read_text())
        assert report["quantized"]["n"] == 10_000 and report["quantized"]["calibration"] == 1000


def pretrained_names() -> list[str]:
    from mnist_cnn.pretrained import names

    return names()
