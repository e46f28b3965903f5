"""toolkit.hub: an unreachable hub is known within 2 s, once, and the libraries are put offline."""

import os
import socket
import time

import pytest

from toolkit import hub


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(hub, "_answer", False)
    for var in (*hub.OFFLINE_VARS, "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: refused at once


def test_a_refused_connection_means_offline_names_the_variable_and_sets_offline_mode(fresh):
    fresh.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    reason = hub.offline_reason()
    assert reason is not None and "HF_HUB_OFFLINE is unset" in reason and "HF_HUB_OFFLINE=1" in reason
    assert all(os.environ[var] == "1" for var in hub.OFFLINE_VARS)
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    fresh.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # undone for the other tests


def test_a_silent_network_is_given_up_within_two_seconds_and_asked_once(fresh):
    fresh.setattr(hub, "go_offline", lambda: None)
    # a name server or a route that never answers: resolution and connection hang
    fresh.setattr(hub.socket, "create_connection", lambda *a, **k: time.sleep(30))
    start = time.monotonic()
    assert hub.offline_reason() is not None
    assert time.monotonic() - start <= 2.0
    calls = []
    fresh.setattr(hub, "reachable", lambda *a: calls.append(a) or True)
    assert hub.offline_reason() is not None and calls == []  # the answer is kept for the process


def test_hf_hub_offline_set_is_not_probed(fresh):
    fresh.setenv("HF_HUB_OFFLINE", "1")
    fresh.setattr(hub, "reachable", lambda *a: pytest.fail("probed although HF_HUB_OFFLINE=1"))
    assert "HF_HUB_OFFLINE=1 is set" in hub.offline_reason()


def test_a_listening_endpoint_is_online(fresh):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        fresh.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.offline_reason() is None
