"""The command line as a user meets it: every command listed, every command's help with examples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

COMMANDS = ["replay", "worker", "state", "person", "produce", "tail", "bench"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in out.stdout, command


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "bench"])
def test_each_command_has_help_with_examples(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "examples:" in out.stdout
    assert f"python -m streams {command}" in out.stdout


def test_bench_help_shows_the_script_and_its_options() -> None:
    out = run("bench", "--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout
    script = run("bench", "--", "--help")
    assert script.returncode == 0
    assert "--quick" in script.stdout


def test_state_without_a_worker_says_so() -> None:
    out = run("state", "some-device", "--web-port", "1")
    assert out.returncode == 1
    assert "no worker answers" in out.stderr


def test_person_without_a_worker_says_so() -> None:
    out = run("person", "6b0f3c1e-8a4d-5b2e-9c7f-0d1e2f3a4b5c", "--web-port", "1")
    assert out.returncode == 1
    assert "streams person: no worker answers at http://127.0.0.1:1" in out.stderr


def test_the_dashboard_only_uses_metrics_the_worker_serves() -> None:
    import json
    import re

    from streams import web

    source = (ROOT / "streams" / "web.py").read_text()
    served = set(re.findall(r'metric\("([a-z_]+)"', source))
    dashboard = json.loads((ROOT / "dashboards" / "grafana.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"streams_([a-z_]+)", t["expr"])}
    assert used, "the dashboard queries the worker's metrics"
    assert used <= served, used - served
    assert web.render_metrics  # the function that serves them


def test_the_readme_lists_every_setting() -> None:
    from streams import config

    assert config.table_markdown() in (ROOT / "README.md").read_text(), "README's settings table is stale"
