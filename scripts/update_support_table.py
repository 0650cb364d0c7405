"""Rewrite the support table in README.md from the method registry.

    python scripts/update_support_table.py

The table sits between the markers ``<!-- support-table -->`` and ``<!-- /support-table -->``;
``tests/test_support_table.py`` fails when README.md and the registry disagree.
"""

from __future__ import annotations

from pathlib import Path

from wsurgery.support import support_markdown

START, END = "<!-- support-table -->\n", "<!-- /support-table -->\n"


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + support_markdown() + END + tail


def main() -> None:
    path = Path(__file__).resolve().parent.parent / "README.md"
    path.write_text(render(path.read_text()))


if __name__ == "__main__":
    main()
