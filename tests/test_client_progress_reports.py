"""ProgressReports: a seq that moves on while a report is in flight is reported too."""

from __future__ import annotations

import asyncio
import types

import pytest

from dlopbox.client import acks as acks_module
from dlopbox.client.acks import ProgressReports

pytestmark = pytest.mark.timeout(30)


class SlowInterface:
    """Records what the client reported; the first report takes long enough for the seq to move on."""

    def __init__(self, acks: types.SimpleNamespace) -> None:
        self.acks = acks
        self.reported: list[int] = []

    async def report_progress(self, client_id: str, seq: int) -> None:
        if not self.reported:
            self.acks.persisted = 7  # persisted while this POST is in flight
            await asyncio.sleep(0.05)
        self.reported.append(seq)


async def test_a_seq_persisted_during_a_report_is_reported_next(monkeypatch) -> None:
    monkeypatch.setattr(acks_module, "REPORT_EVERY", 0.01)
    acks = types.SimpleNamespace(persisted=3)
    interface = SlowInterface(acks)
    task = asyncio.create_task(ProgressReports(interface, "c1", acks).loop())  # type: ignore[arg-type]
    try:
        for _ in range(200):
            if interface.reported[-1:] == [7]:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert interface.reported == [3, 7]
