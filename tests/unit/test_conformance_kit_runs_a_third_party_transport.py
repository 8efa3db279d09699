"""The conformance kit as a third party uses it: the recipe of its docstring — a
transport registered under its own scheme, one test class naming URL and features — runs
the suite, and what the features do not declare is skipped by the flag's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RECIPE = '''
import keybus
from keybus.testing.conformance import Conformance, Features
from keybus.transports.memory import MemoryTransport


class ThirdPartyTransport(MemoryTransport):
    """Stands in for a transport that is not keybus's."""


keybus.register_transport("thirdparty", ThirdPartyTransport)


class TestThirdParty(Conformance):
    url = "thirdparty://kit"
    features = Features(rebalance=False)
'''


def test_a_registered_transport_runs_the_kit_and_skips_what_it_does_not_declare(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_thirdparty.py").write_text(RECIPE)
    # pytest-asyncio in its default (strict) mode: the kit marks its own tests.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    chosen = "raw_message or member_joining or unreachable or swallows"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", chosen],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "2 passed, 3 skipped" in out, out
    skipped = sorted(line.split(": ", 1)[1] for line in out.splitlines() if "SKIPPED" in line)
    assert skipped == [
        "thirdparty does not declare the feature 'rebalance'",  # both member-joining tests
        "thirdparty has no unreachable URL",
    ], out
    assert "SKIPPED [2]" in out, out
