"""Settings: environment, flags and the README's table agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dlopbox.cli import build_parser, main
from dlopbox.settings import ClientSettings, SettingsError, WatcherSettings, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_table_is_the_generated_one():
    text = README.read_text()
    table = re.search(r"<!-- settings-table -->\n(.*)\n<!-- /settings-table -->", text, re.S)
    assert table, "README lost its settings table markers"
    assert table.group(1) == markdown_table(), "README settings table is stale: paste `dlopbox settings`"


def test_environment_then_flags_override_defaults(tmp_path):
    env = {"DLOPBOX_ROOT": str(tmp_path), "DLOPBOX_BATCH_MS": "2.5", "DLOPBOX_IGNORE": "*.tmp, *.bak", "DLOPBOX_TOKEN": "s3cr3t-token"}
    s = WatcherSettings.from_env(env)
    assert (s.root, s.batch_ms, s.ignore, s.token) == (tmp_path, 2.5, ("*.tmp", "*.bak"), "s3cr3t-token")
    assert WatcherSettings.from_env(env, batch_ms=9.0).batch_ms == 9.0
    assert "s3cr3t" not in repr(s) and "token=***" in repr(s)


def test_bad_values_and_missing_secrets_are_clear_errors():
    with pytest.raises(SettingsError, match="DLOPBOX_BATCH_MAX"):
        WatcherSettings.from_env({"DLOPBOX_BATCH_MAX": "many"})
    with pytest.raises(SettingsError, match="DLOPBOX_READ_TOKEN is required"):
        ClientSettings.from_env({}).require("read_token")


@pytest.mark.parametrize("command", ["watch", "interface", "client", "status", "verify", "loadtest", "broker-definitions", "settings"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "usage: dlopbox " + command in capsys.readouterr().out


def test_a_service_without_its_token_exits_2_with_the_variable_named(monkeypatch, capsys):
    monkeypatch.delenv("DLOPBOX_TOKEN", raising=False)
    assert main(["watch", "--root", "/tmp"]) == 2
    assert "DLOPBOX_TOKEN is required" in capsys.readouterr().err
