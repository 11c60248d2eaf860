"""The command line as a user meets it: every command listed, every command's help with examples."""

from __future__ import annotations

import subprocess
import sys

import orjson
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


def test_tail_reads_a_change_log_row_for_people() -> None:
    from types import SimpleNamespace

    from streams.kafka.commands import format_record

    def line(row: dict[str, object]) -> str:
        return format_record(SimpleNamespace(partition=1, offset=7, key=b"u", value=orjson.dumps(row)))

    mapping = {"kind": "mapping", "op": "remapped", "user_id": "u", "person_id": "p2", "previous_person_id": "p1",
               "via": "identity", "identity_key": "$identity_mobile", "device_id": "d 1", "version": 3,
               "record_id": "events.raw:0:12:0", "event_time": None, "processed_time": 5, "model": "m"}
    assert line(mapping) == ('[p1@7] user=u v3 remapped: p1 -> p2 via identity key=$identity_mobile d="d 1" '
                             'by events.raw:0:12:0')
    link = {"kind": "link", "user_id": "u", "person_id": "p2", "version": 3, "key": "$identity_mobile",
            "value_hash": "h", "model": "m"}
    assert line(link) == "[p1@7] user=u v3 link $identity_mobile hash=h -> person=p2"
    unmapped = mapping | {"op": "unmapped", "person_id": None, "via": None, "record_id": None, "line": 9}
    del unmapped["identity_key"]
    assert line(unmapped) == '[p1@7] user=u v3 unmapped: p1 -> - d="d 1" by line 9'
