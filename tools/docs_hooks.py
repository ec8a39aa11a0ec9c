"""MkDocs hooks (named in mkdocs.yml): the CLI reference, generated from the argparse parser.

docs/reference/cli.md holds the marker line below; on every build it is replaced with one
section per subcommand of `mnist_cnn.cli.build_parser()`: its help, its usage and a table of
its arguments. The parser is walked generically, so a new command or flag appears on its own.

    from docs_hooks import render_cli          # with tools/ on sys.path (tests/test_docs.py)
    from mnist_cnn.cli import build_parser
    print(render_cli(build_parser()))          # the Markdown that replaces the marker
"""

from __future__ import annotations

import argparse
import html

MARKER = "<!-- cli-reference -->"
USAGE_WIDTH = 76  # usage lines wrap here, whatever the terminal: the width of a code block on the page


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from mnist_cnn.cli import build_parser  # lazily: only the page with the marker needs torch

    return markdown.replace(MARKER, render_cli(build_parser()))


def render_cli(parser: argparse.ArgumentParser) -> str:
    """Markdown for `parser` and every subcommand under it, depth first."""
    return "\n\n".join(sections(parser, parser.description or "", level=2, root=True)) + "\n"


def sections(parser: argparse.ArgumentParser, about: str, level: int, root: bool = False) -> list[str]:
    """One section for `parser`, then its subcommands': the root's at its own level, theirs one deeper."""
    lines = [f"{'#' * level} `{parser.prog}`", ""]
    if about:
        lines += [text(about), ""]
    if parser.description and parser.description != about:
        lines += [text(parser.description), ""]
    lines += ["```text", usage(parser).rstrip(), "```"]
    rows = [
        argument_row(action, parser.prog)
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and action.help != argparse.SUPPRESS
    ]
    if rows:
        lines += ["", "| argument | default | description |", "|---|---|---|", *rows]
    if parser.epilog:
        lines += ["", text(parser.epilog)]
    out = ["\n".join(lines)]
    for child, child_help in subcommands(parser):
        out += sections(child, child_help, level if root else min(level + 1, 6))
    return out


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, str]]:
    """(subparser, its help) for every subcommand of `parser`, in the order they were added; aliases once."""
    found, seen = [], set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, child in action.choices.items():
            if id(child) not in seen:
                seen.add(id(child))
                found.append((child, helps.get(name) or ""))
    return found


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help()


def argument_row(action: argparse.Action, prog: str) -> str:
    default = action.default
    shown = "" if default in (None, False, argparse.SUPPRESS) or action.nargs == 0 else f"`{default}`"
    about = text(expand_help(action, prog)) if action.help else ""
    if action.required and action.option_strings:
        about = f"required. {about}".strip()
    if isinstance(action, argparse._AppendAction):
        about = f"{about} (repeatable)" if "repeatable" not in about else about
    return f"| {cell(invocation(action))} | {cell(shown)} | {cell(about)} |"


def invocation(action: argparse.Action) -> str:
    """`--flag METAVAR` (all spellings), or a positional argument's name, as a code span."""
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"`{name} ...`" if action.nargs in ("+", "*") else f"`{name}`"
    if action.nargs == 0:
        return ", ".join(f"`{option}`" for option in action.option_strings)
    if action.metavar is not None:
        metavar = action.metavar
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    return ", ".join(f"`{option} {metavar}`" for option in action.option_strings)


def expand_help(action: argparse.Action, prog: str) -> str:
    """The help string with its %(default)s-style fields filled in, as argparse prints it."""
    params = {k: v for k, v in dict(vars(action), prog=prog).items() if v is not argparse.SUPPRESS}
    params = {k: getattr(v, "__name__", v) for k, v in params.items()}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % params


def text(value: str) -> str:
    """Plain text as Markdown: HTML-escaped outside `code spans`, so `runs/<timestamp>` stays visible."""
    parts = value.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        return html.escape(value, quote=False)
    return "`".join(part if i % 2 else html.escape(part, quote=False) for i, part in enumerate(parts))


def cell(value: str) -> str:
    """A table cell: one line, and no | outside a code span that would end it."""
    parts = " ".join(value.split()).split("`")
    if len(parts) % 2 == 0:
        return "`".join(parts).replace("|", "\\|")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))
