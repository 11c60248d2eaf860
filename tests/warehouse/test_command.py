"""`python -m streams load` as a user meets it without a broker: listed, its help with examples, a usage error."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_load_is_listed_and_its_help_has_examples() -> None:
    assert "    load " in run("--help").stdout
    out = run("load", "--help")
    assert out.returncode == 0, out.stderr
    assert "examples:" in out.stdout and "python -m streams load --into" in out.stdout
    for flag in ("--into", "--follow", "--chunk-records", "--brokers", "--enriched-topic", "--identity-changes-topic",
                 "--security-protocol"):
        assert flag in out.stdout, flag


def test_into_is_required_and_a_chunk_holds_a_record() -> None:
    assert run("load").returncode == 2
    out = run("load", "--into", "w.duckdb", "--chunk-records", "0")
    assert out.returncode == 2
    assert "streams load: --chunk-records must be 1 or more" in out.stderr
