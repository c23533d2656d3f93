"""`dlopbox verify` and `dlopbox status` against the interface's read side (a test double here)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
from datetime import datetime, timezone

from dlopbox.settings import ClientSettings
from dlopbox.tools.status import status
from dlopbox.tools.verify import verify
from tests.support.client_harness import REPO
from tests.support.fake_interface import FakeInterface


async def run_cli(*args: str) -> tuple[int, str]:
    """The console script in a child process (asynchronously: the interface double runs on this loop)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "dlopbox", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, stdout.decode()


async def test_verify_passes_on_an_equal_tree_and_names_each_difference(shared_dir, tmp_path):
    (shared_dir / "docs").mkdir()
    (shared_dir / "docs" / "报告.txt").write_bytes(b"report")
    (shared_dir / "a").write_bytes(b"aaaa")
    (shared_dir / "b").write_bytes(b"bbbb")
    (shared_dir / "c").write_bytes(b"cccc")
    slave = tmp_path / "slave"
    shutil.copytree(shared_dir, slave)  # copytree keeps modes and mtimes
    fake = FakeInterface(shared_dir)
    url = await fake.start()
    try:
        settings = ClientSettings(target=slave, interface_url=url, read_token=fake.token)
        out = io.StringIO()
        assert await verify(settings, out) == 0, out.getvalue()
        assert "OK" in out.getvalue() and "4 files, 1 directories" in out.getvalue()

        (slave / "a").write_bytes(b"AAAA")
        os.utime(slave / "a", ns=(os.stat(shared_dir / "a").st_mtime_ns,) * 2)
        (slave / "b").write_bytes(b"longer")
        os.chmod(slave / "c", 0o600)
        os.unlink(slave / "docs" / "报告.txt")
        (slave / "extra").write_bytes(b"x")
        out = io.StringIO()
        assert await verify(settings, out) == 1
        text = out.getvalue()
        assert "differs   a  (content differs" in text
        assert "differs   b  (size 6 here, 4 on the master" in text
        assert "differs   c  (mode 0600 here, 0644 on the master)" in text
        assert "missing   docs/报告.txt  (file, 6 bytes)" in text
        assert "extra     extra  (file, 1 bytes)" in text
        assert "5 difference(s)" in text

        # The same through the command line, exit code included.
        code, stdout = await run_cli("verify", "--target", str(slave), "--interface-url", url, "--read-token", fake.token)
        assert code == 1 and "5 difference(s)" in stdout, stdout
        code, stdout = await run_cli("verify", "--target", str(shared_dir), "--interface-url", url,
                                     "--read-token", fake.token)
        assert code == 0, stdout
    finally:
        await fake.stop()


async def test_verify_and_status_fail_clearly_when_the_interface_refuses(shared_dir, tmp_path):
    fake = FakeInterface(shared_dir)
    url = await fake.start()
    try:
        settings = ClientSettings(target=tmp_path, interface_url=url, read_token="wrong")
        assert await verify(settings, io.StringIO()) == 2
        assert await status(settings, io.StringIO()) == 2
    finally:
        await fake.stop()


async def test_status_shows_each_client_with_its_lag(shared_dir):
    fake = FakeInterface(shared_dir)
    url = await fake.start()
    try:
        fake.head = 120
        fake.progress.update({"laptop": 120, "kiosk-2": 57})
        now = datetime.now(timezone.utc).timestamp()
        fake.last_seen.update({"laptop": now - 2, "kiosk-2": now - 600})
        out = io.StringIO()
        assert await status(ClientSettings(interface_url=url, read_token=fake.token), out) == 0
        lines = out.getvalue().splitlines()
        assert lines[0].split() == ["CLIENT", "SEQ", "LAG", "LAST", "SEEN"]
        assert lines[1].split()[:3] == ["kiosk-2", "57", "63"] and "(10m ago)" in lines[1]
        assert lines[2].split()[:3] == ["laptop", "120", "0"] and "s ago)" in lines[2]
        assert lines[-1] == "head seq: 120, 2 client(s)"
        code, stdout = await run_cli("status", "--interface-url", url, "--read-token", fake.token)
        assert code == 0 and "kiosk-2" in stdout and "head seq: 120" in stdout, stdout
    finally:
        await fake.stop()
