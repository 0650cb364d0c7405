"""Rewrite every generated section of README.md from the code, so that the README cannot drift from it.

    python scripts/update_readme.py

Each section sits between ``<!-- NAME -->`` and ``<!-- /NAME -->``:
- ``commands``: the click group's commands, their usage and the first paragraph of their help;
- ``options``: the options several commands share;
- ``support-table``: the method registry's Support rows and refusals (``wsurgery.support``);
- ``encodings``: the stored-encoding registry (``wsurgery.quant.encodings.registered()``);
- ``layout``: the package's modules and subpackages, each with its docstring's first sentence.
``tests/test_support_table.py`` fails when README.md is stale.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wsurgery"
sys.path.insert(0, str(ROOT))  # this checkout's wsurgery, installed or not


def _first_sentence(text: str | None) -> str:
    """The first paragraph's first sentence, on one line."""
    paragraph = " ".join((text or "").strip().split("\n\n")[0].split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", paragraph)
    return paragraph[: match.start() + 1] if match else paragraph


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def commands_markdown() -> str:
    """One row per command of the click group: its usage line and the first paragraph of its help."""
    from wsurgery.commands import cli

    rows = ["| command | what it does |", "|---|---|"]
    with click.Context(cli, info_name="wsurgery") as group:
        for name in sorted(cli.list_commands(group)):
            command = cli.get_command(group, name)
            with click.Context(command, info_name=name, parent=group) as ctx:
                usage = " ".join(["wsurgery", name, *command.collect_usage_pieces(ctx)])
            summary = " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())
            rows.append(f"| `{_cell(usage)}` | {_cell(summary)} |")
    return "\n".join(rows) + "\n"


def options_markdown() -> str:
    """The options more than one command takes (old hidden spellings left out), with the commands that take
    them and their help where every command words it the same."""
    from wsurgery.commands import cli

    found: dict[str, list[tuple[str, str]]] = {}
    with click.Context(cli, info_name="wsurgery") as group:
        for name in sorted(cli.list_commands(group)):
            command = cli.get_command(group, name)
            with click.Context(command, info_name=name, parent=group) as ctx:
                for param in command.get_params(ctx):
                    record = param.get_help_record(ctx)
                    if isinstance(param, click.Option) and record and "--help" not in param.opts:
                        found.setdefault(record[0], []).append((name, " ".join(record[1].split())))
    rows = ["| option | commands | what it does |", "|---|---|---|"]
    for option, uses in sorted(found.items(), key=lambda item: item[0].lstrip("-").lower()):
        if len(uses) > 1:
            helps = {h for _, h in uses}
            what = helps.pop() if len(helps) == 1 else "see each command's --help"
            rows.append(f"| `{_cell(option)}` | {', '.join(n for n, _ in uses)} | {_cell(what)} |")
    return "\n".join(rows) + "\n"


def support_markdown() -> str:
    from wsurgery.support import support_markdown as generated

    return generated()


def encodings_markdown() -> str:
    """One row per registered stored encoding: what it is, the quant_method it is recognised by, and
    whether ``merge --requantize`` can write it again (its ``cannot_encode``)."""
    from wsurgery.quant.encodings import registered

    rows = ["| encoding | quant_method | what it is | `--requantize` |", "|---|---|---|---|"]
    for encoding in sorted(registered(), key=lambda e: e.name):
        module = inspect.getmodule(encoding)
        what = _first_sentence(module.__doc__ if module else None) or _first_sentence(encoding.__doc__)
        methods = ", ".join(f"`{m}`" for m in encoding.quant_methods) or "-"
        reason = inspect.getattr_static(encoding, "cannot_encode")
        if isinstance(reason, property):  # depends on the tensor's parameters
            why = _first_sentence(reason.__doc__)
            requantize = f"some: {why[:1].lower()}{why[1:]}"
        else:
            requantize = "yes, byte for byte" if reason is None else f"no: {reason}"
        rows.append(f"| {_cell(encoding.name)} | {methods} | {_cell(what)} | {_cell(requantize)} |")
    return "\n".join(rows) + "\n"


def _docstring(path: Path) -> str:
    return _first_sentence(ast.get_docstring(ast.parse(path.read_text())))


def layout_markdown() -> str:
    """The package tree: every subpackage (from its ``__init__``'s docstring) and top-level module."""
    entries: list[tuple[str, str]] = []

    def walk(folder: Path, depth: int) -> None:
        for path in sorted(folder.iterdir()):
            name = path.name
            if path.is_dir() and (path / "__init__.py").exists():
                entries.append(("  " * depth + name + "/", _docstring(path / "__init__.py")))
                walk(path, depth + 1)
            elif depth == 0 and path.suffix == ".py" and name != "__init__.py":
                entries.append((name, _docstring(path)))

    walk(PACKAGE, 0)
    width = max(len(name) for name, _ in entries) + 2
    lines = ["```", "wsurgery/", *(f"  {name.ljust(width)}{doc}".rstrip() for name, doc in entries), "```"]
    return "\n".join(lines) + "\n"


SECTIONS: dict[str, Callable[[], str]] = {
    "commands": commands_markdown,
    "options": options_markdown,
    "support-table": support_markdown,
    "encodings": encodings_markdown,
    "layout": layout_markdown,
}


def render(readme: str) -> str:
    """``readme`` with every generated section replaced by what the code says now."""
    for name, generate in SECTIONS.items():
        start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->\n"
        if readme.count(start) != 1 or readme.count(end) != 1:
            raise SystemExit(f"README.md must hold {start.strip()} and {end.strip()} once each")
        head, rest = readme.split(start, 1)
        _, tail = rest.split(end, 1)
        readme = head + start + generate() + end + tail
    return readme


def main() -> None:
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))


if __name__ == "__main__":
    main()
