"""The real SDKs' recorded output (../shared/conformance), replayed through `python -m streams replay`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, SHARED

CONFORMANCE = SHARED / "conformance"


def test_the_conformance_sets_are_beside_the_repo() -> None:
    assert (CONFORMANCE / "check.py").is_file(), f"{CONFORMANCE} is missing: clone the repo next to shared/"


@pytest.mark.parametrize("oracle", ["seed", "wechat", "mini", "web"])
def test_sensors_sdks(oracle: str) -> None:
    run = subprocess.run([sys.executable, str(CONFORMANCE / "check.py"), sys.executable, str(CONFORMANCE / oracle)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "(100.0%) match" in run.stdout


def test_adobe_customer_ids() -> None:
    run = subprocess.run([sys.executable, str(CONFORMANCE / "check_customer_ids.py"), sys.executable],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
