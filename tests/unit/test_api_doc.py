"""docs/api.md is the public reference as implemented: it names every public name, and
every ``keybus.Name`` it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import keybus

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_public_name_is_documented() -> None:
    text = API_DOC.read_text()
    missing = [name for name in keybus.__all__ if not re.search(rf"keybus\.{name}\b", text)]
    assert not missing, f"docs/api.md does not describe: {missing}"


def test_every_documented_class_exists() -> None:
    text = API_DOC.read_text()
    named = set(re.findall(r"keybus\.([A-Z][A-Za-z]+)\b", text))
    unknown = sorted(name for name in named if not hasattr(keybus, name))
    assert not unknown, f"docs/api.md names what keybus does not have: {unknown}"


def test_every_public_name_is_importable() -> None:
    for name in keybus.__all__:
        assert getattr(keybus, name) is not None, name
