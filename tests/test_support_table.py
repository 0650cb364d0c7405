"""README's support table is the registry's, and every registered method declares its support."""

import sys
from pathlib import Path

from wsurgery.methods import registered

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from update_support_table import render  # noqa: E402


def test_readme_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "README.md is stale: run python scripts/update_support_table.py"


def test_every_method_declares_support_rows():
    assert all(method.support for method in registered().values())


def test_every_peft_type_is_supported_or_refused_with_a_reason():
    from peft.utils.peft_types import PeftType

    from wsurgery.methods import not_mergeable

    handled = set(registered()) | set(not_mergeable())
    assert {t.value for t in PeftType} - handled == set()
    assert all(reason for reason in not_mergeable().values())
