"""Pytest fixture for :class:`~tests.support.otlp_receiver.OtlpReceiver`.

Import it into ``tests/conftest.py``: ``from tests.support.otlp_fixture import otlp_receiver``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.otlp_receiver import OtlpReceiver


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A started OTLP trace receiver (gRPC + HTTP) on free ports, stopped after the test."""
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
