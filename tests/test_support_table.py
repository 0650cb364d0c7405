"""README's generated sections are the code's, and every registered method declares its support."""

import sys
from pathlib import Path

from wsurgery.methods import registered

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import update_readme


def test_readme_generated_sections_are_current():
    readme = (ROOT / "README.md").read_text()
    assert update_readme.render(readme) == readme, "README.md is stale: run python scripts/update_readme.py"


def test_readme_opens_with_the_ci_commands():
    """`.ci/run` runs the two commands at the top of README.md: install, then test."""
    lines = (ROOT / "README.md").read_text().splitlines()
    install = ('pip install -e ".[dev]" && PYPCRE_DISABLE_NATIVE_FLAGS=1 pip install --no-deps '
               "-r tests/oracles-no-deps.txt")
    assert lines[2:6] == ["```bash", install, "pytest -q", "```"]


def test_commands_table_lists_every_command():
    from wsurgery.commands import cli

    table = update_readme.commands_markdown()
    assert sorted(cli.commands) == sorted(line.split("`")[1].split()[1] for line in table.splitlines()[2:])


def test_encodings_table_lists_every_registered_encoding():
    from wsurgery.quant.encodings import registered as encodings

    rows = update_readme.encodings_markdown().splitlines()[2:]
    assert sorted(r.split(" | ")[0].lstrip("| ") for r in rows) == sorted(e.name for e in encodings())
    for encoding, row in zip(sorted(encodings(), key=lambda e: e.name), rows):
        if isinstance(encoding.__dict__.get("cannot_encode"), str):
            assert row.endswith(f"no: {encoding.cannot_encode} |")


def test_layout_names_every_module_and_subpackage():
    layout = update_readme.layout_markdown()
    package = ROOT / "wsurgery"
    for path in package.iterdir():
        if path.suffix == ".py" and path.name != "__init__.py" or (path / "__init__.py").exists():
            assert f"  {path.name}{'/' if path.is_dir() else ''} " in layout


def test_every_method_declares_support_rows():
    assert all(method.support for method in registered().values())


def test_every_peft_type_is_supported_or_refused_with_a_reason():
    from peft.utils.peft_types import PeftType

    from wsurgery.methods import not_mergeable

    handled = set(registered()) | set(not_mergeable())
    assert {t.value for t in PeftType} - handled == set()
    assert all(reason for reason in not_mergeable().values())
