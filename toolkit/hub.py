"""Is the Hugging Face hub reachable? Asked once per process, answered within PROBE_SECONDS.

Without `HF_HUB_OFFLINE`, huggingface_hub retries an unreachable hub for ~25 s (five "Retrying in Ns"
lines) before a download fails. One TCP connection with a short timeout answers the same question at once;
when it fails, the libraries are put in offline mode before they are asked for anything.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

PROBE_SECONDS = 1.5
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE = {"1", "true", "yes", "on"}

_answer: str | None | bool = False  # False: not asked yet; None: online; str: why offline


def offline_reason() -> str | None:
    """Why the hub cannot be used (one sentence naming HF_HUB_OFFLINE), or None when it answers."""
    global _answer
    if _answer is False:
        _answer = _ask()
        if _answer is not None:
            go_offline()
    return _answer


def _ask() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        return "HF_HUB_OFFLINE=1 is set, so the hub is not asked"
    host, port = _target()
    start = time.monotonic()
    if reachable(host, port):
        return None
    return (
        f"the Hugging Face hub ({host}) is unreachable (checked in {time.monotonic() - start:.1f} s) and "
        "HF_HUB_OFFLINE is unset (set HF_HUB_OFFLINE=1 to skip this check)"
    )


def _target() -> tuple[str, int]:
    """Where a download would connect first: the https proxy when one is set, else the hub endpoint."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def reachable(host: str, port: int, timeout: float = PROBE_SECONDS) -> bool:
    """A TCP connection to host:port opens within `timeout` (name resolution included: it runs in a thread,
    since getaddrinfo has no timeout of its own)."""
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def go_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets, whether or not they are imported yet."""
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
