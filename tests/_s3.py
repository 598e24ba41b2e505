"""A local S3 server for the cloud tests: moto's ``ThreadedMotoServer`` on 127.0.0.1.

``s3_server()`` starts one on a free port with test credentials in the environment (the
previous values restored afterwards, config files pointed away from the user's), and stops
it; the ``s3`` fixture holds one for the whole session.  ``S3Server.bucket()`` makes a fresh
bucket.  Worker processes inherit the environment, so they find the same credentials.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["S3Server", "s3_server", "s3", "free_port", "CREDENTIALS"]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
_ENV = {**CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_STOP_SECONDS = 10.0


def free_port() -> int:
    """A TCP port nothing listens on now (for an unreachable endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """A running moto server: ``endpoint`` and helpers."""

    def __init__(self, server: Any, endpoint: str) -> None:
        self._server, self.endpoint = server, endpoint
        self._names = itertools.count()
        self.running = True

    def options(self, **extra: Any) -> dict[str, Any]:
        """Storage options reaching this server."""
        return {"endpoint_url": self.endpoint, **extra}

    def bucket(self, prefix: str = "bkt") -> str:
        """Create a new, empty bucket; its name."""
        import s3fs

        name = f"{prefix}-{os.getpid()}-{next(self._names)}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True).mkdir(name)
        return name

    def stop(self) -> None:
        """Stop serving (bounded: gives up waiting after a few seconds)."""
        if not self.running:
            return
        self.running = False
        done = threading.Thread(target=self._server.stop, daemon=True)
        done.start()
        done.join(_STOP_SECONDS)


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start a moto S3 server on 127.0.0.1 (free port) with test credentials; stop it after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    saved = {k: os.environ.get(k) for k in (*_ENV, *_CLEARED)}
    os.environ.update(_ENV)
    for k in _CLEARED:
        os.environ.pop(k, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    running = S3Server(server, f"http://{host}:{port}")
    try:
        yield running
    finally:
        running.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One local S3 server for the session."""
    with s3_server() as server:
        yield server
