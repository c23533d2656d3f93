"""`dlopbox --version` and the line every service logs as it starts."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from importlib import metadata

import pytest

from dlopbox.lifecycle import serve


def test_version_comes_from_the_package_metadata() -> None:
    proc = subprocess.run([sys.executable, "-m", "dlopbox.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"dlopbox {metadata.version('dlopbox')}\n")


def test_a_service_logs_its_version_as_it_starts(caplog: pytest.LogCaptureFixture) -> None:
    async def service(stop: asyncio.Event) -> str:
        return "ran"

    with caplog.at_level(logging.INFO, logger="dlopbox.lifecycle"):
        assert serve(service, command="watch") == "ran"
    assert f"dlopbox {metadata.version('dlopbox')} watch starting" in caplog.messages


def test_a_tool_logs_no_start_line(caplog: pytest.LogCaptureFixture) -> None:
    async def tool(stop: asyncio.Event) -> int:
        return 0

    with caplog.at_level(logging.INFO, logger="dlopbox.lifecycle"):
        assert serve(tool) == 0
    assert not [m for m in caplog.messages if m.endswith(" starting")]
