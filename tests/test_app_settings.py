"""The worker's Faust app takes its settings from `config.Settings` only, whatever the environment holds."""

from __future__ import annotations

import pytest
from faust.types.enums import ProcessingGuarantee
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from streams.config import Settings
from streams.state.devicestore import DeviceStore, DeviceTable
from streams.state.keys import OFFSET_KEY, is_internal
from streams.worker.app import create_app
from streams.worker.consumer import BatchConsumer
from streams.worker.startup import Layout, controller_node


def test_fausts_variables_change_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("BROKER_URL", "kafka://elsewhere:9999")
    monkeypatch.setenv("WEB_PORT", "tcp://10.1.2.3:80")
    monkeypatch.setenv("PROCESSING_GUARANTEE", "exactly_once")
    monkeypatch.setenv("APP_ENV_PREFIX", "OTHER_")
    monkeypatch.setenv("OTHER_BROKER_URL", "kafka://elsewhere:9999")
    monkeypatch.setenv("TABLE_STANDBY_REPLICAS", "7")
    settings = Settings(brokers="127.0.0.1:9092,127.0.0.1:9093", web_port=7123, web_bind="127.0.0.2",
                        state_dir=str(tmp_path))
    app = create_app(settings, Layout(4, {}))
    assert app.conf.broker == [URL("kafka://127.0.0.1:9092"), URL("kafka://127.0.0.1:9093")]
    assert app.conf.processing_guarantee == ProcessingGuarantee.AT_LEAST_ONCE
    assert app.conf.web_port == 7123
    assert app.conf.table_standby_replicas != 7
    assert app.conf.canonical_url == URL("http://127.0.0.2:7123")


def test_the_app_runs_the_worker_s_consumer_and_controller_lookup(tmp_path: object) -> None:
    """The two pieces of Faust's transport the worker replaces: the consumer that feeds the batch step, and the
    lookup of the broker to create topics through (Faust's own gives up while one broker of three is down)."""
    app = create_app(Settings(state_dir=str(tmp_path)), Layout(4, {}))
    assert app.transport.Consumer is BatchConsumer
    assert app.transport._get_controller_node is controller_node


def test_the_advertised_url_is_what_the_group_shares(tmp_path: object) -> None:
    settings = Settings(web_port=7124, advertised_url="http://worker-3.streams.svc:7124", state_dir=str(tmp_path))
    app = create_app(settings, Layout(4, {}))
    assert app.conf.canonical_url == URL("http://worker-3.streams.svc:7124")


def test_the_device_table_keeps_its_offset_where_no_device_id_reaches(tmp_path: object) -> None:
    app = create_app(Settings(state_dir=str(tmp_path)), Layout(4, {}))
    table = app.streams_table
    assert isinstance(table, DeviceTable) and isinstance(table.data, DeviceStore)
    assert table.data.offset_key == OFFSET_KEY and is_internal(OFFSET_KEY)
    for device_id in ["__faust\x00offset__", "\x00", "\u00ff", "\U0001f600", "a" * 255]:
        assert not is_internal(device_id.encode())


@given(st.text(min_size=1, max_size=255))
def test_no_device_id_encodes_to_an_internal_key(device_id: str) -> None:
    try:
        key = device_id.encode()
    except UnicodeEncodeError:  # a lone surrogate: the codec refuses such input before (not_json)
        return
    assert not is_internal(key)


def test_a_wildcard_bind_advertises_the_hosts_name() -> None:
    import socket

    assert Settings(web_bind="0.0.0.0", web_port=6066).web_url == f"http://{socket.gethostname()}:6066"
    assert Settings(web_bind="127.0.0.2", web_port=6067).web_url == "http://127.0.0.2:6067"


@pytest.mark.parametrize(("name", "value"), [("STREAMS_PROCESSING_GUARANTEE", "exactly-once"),
                                             ("STREAMS_PARTITIONER", "consistent_random"),
                                             ("STREAMS_PARTITIONS", "four")])
def test_a_setting_with_no_valid_value_is_refused_at_start(name: str, value: str) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    run = subprocess.run([sys.executable, "-m", "streams", "worker"], env={"PATH": "/usr/bin", name: value},
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 78  # EX_CONFIG: restarting will not help
    assert name in run.stderr and value in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
