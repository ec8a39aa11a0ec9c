"""The docs: README stays a two-minute read, no relative link is broken, and the generated CLI
reference (tools/docs_hooks.py, run by `mkdocs build`) lists every command of the real parser.

`make test` also builds the whole site with `mkdocs build --strict`, which checks links between
pages and their anchors; these tests are the fast part that runs with pytest alone."""

import argparse
import copy
import importlib.util
import json
import re
from pathlib import Path

import torch

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
    parser = build_parser()
    names = subcommand_names(parser)
    assert {"train", "evaluate", "predict", "serve", "export", "tune"} <= set(names)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = 0
    for name in names:
        assert f"## `mnist-cnn {name}`" in markdown, name
        section = markdown.split(f"## `mnist-cnn {name}`\n")[1].split("\n## ")[0]
        assert f"usage: mnist-cnn {name}" in section, name
        for action in commands[name]._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            shown = action.option_strings[0] if action.option_strings else action.metavar or action.dest
            assert f"| `{shown}" in section, f"mnist-cnn {name}: {shown}"
            flags += action.option_strings != []
    assert flags > 3 * len(names)  # every command's flags were looked for, not only their names
    train = markdown.split("## `mnist-cnn train`\n")[1].split("\n## ")[0]
    assert "| `--recipe RECIPE` |" in train and "| `--together {auto,yes,no}` |" in train


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


def test_readme_and_results_page_tables_are_the_committed_frontier_json_rendered():
    """README's results table is format_markdown of the test-set rows of docs/results/frontier.json, and
    docs/results.md's of all its rows: a changed JSON without regenerated tables fails here. That rendering
    the JSON is what `compare --markdown` prints for the runs is the next test's."""
    from mnist_cnn.inference.compare import format_markdown

    rows = json.loads((REPO / "docs" / "results" / "frontier.json").read_text())
    published = [r for r in rows if r["split"] == "test"]
    assert published and len(published) < len(rows)  # the README shows fewer rows than the results page
    assert format_markdown(published) in (REPO / "README.md").read_text()
    assert format_markdown(rows) in (REPO / "docs" / "results.md").read_text()


def test_compare_markdown_over_run_folders_is_the_table_its_json_rows_render(
    synthetic_run, tmp_path, capsys, monkeypatch
):
    """The chain README's table rests on: `mnist-cnn compare --json` over run folders gives the rows (what
    docs/results/frontier.json holds), and rendering those rows gives exactly what `compare --markdown` prints
    for the same folders. Three folders: a run, a --seeds folder of two (the ± column; copies of the run's
    last.pt with other final accuracies) and a run scored on its validation split."""
    from conftest import checkpoint_file
    from mnist_cnn.cli import main
    from mnist_cnn.inference import compare
    from mnist_cnn.inference.compare import format_markdown

    measured, describe = {}, compare.describe

    def describe_once(model):  # every folder holds the seed network: trace its layers once, not six times
        key = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
        return measured[key] if key in measured else measured.setdefault(key, describe(model))

    monkeypatch.setattr(compare, "describe", describe_once)
    _, run = synthetic_run
    ckpt = checkpoint_file(run / "last.pt")  # the file's dict: copies of it are crafted below
    seeds = tmp_path / "seeds"
    for seed, acc in ((0, 0.5), (1, 0.75)):
        (seeds / f"seed-{seed}").mkdir(parents=True)
        seeded = copy.deepcopy(ckpt)
        seeded["metrics"][-1]["test_acc"] = acc
        torch.save(seeded, seeds / f"seed-{seed}" / "last.pt")
    val = tmp_path / "val"  # as trained with val_size=100 and run.test=false: no test columns
    val.mkdir()
    scored = copy.deepcopy(ckpt)
    scored["config"]["val_size"], scored["config"]["run"]["test"] = 100, False
    scored["metrics"] = [
        {**{k: v for k, v in row.items() if not k.startswith("test_")}, "val_loss": 1.0, "val_acc": 0.625}
        for row in ckpt["metrics"]
    ]
    torch.save(scored, val / "last.pt")
    folders = [str(run), str(seeds), str(val)]
    capsys.readouterr()
    assert main(["compare", *folders, "--json", "--no-plot"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert main(["compare", *folders, "--markdown", "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert printed == format_markdown(rows) + "\n"
    # and the rows are the folders', read here without format_markdown: the lines a reader sees
    lines = printed.splitlines()
    assert len(lines) == 2 + len(folders)
    assert lines[2].startswith(f"| `{run}` | mnist | seed | 16,426 | ")
    assert f"| 2 | 1 | **{100 * ckpt['metrics'][-1]['test_acc']:.2f}** |" in lines[2]
    assert lines[3].startswith(f"| `{seeds}` |") and "| 2 | 2 | **62.50 ± 17.68** | 50.00 |" in lines[3]
    assert lines[4].startswith(f"| `{val}` |") and "| 2 | 1 | **62.50** (validation) | 62.50 |" in lines[4]
    assert not list(tmp_path.glob("*.png"))


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
