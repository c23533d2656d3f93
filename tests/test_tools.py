"""`dlopbox verify` and `dlopbox status` against the interface's read side (a test double here)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
from datetime import datetime, timezone

import aiohttp
import pytest

from dlopbox.settings import ClientSettings
from dlopbox.tools.status import status
from dlopbox.tools.verify import verify
from tests.support.client_harness import REPO
from tests.support.fake_interface import FakeInterface
from tests.support.interface_harness import (
    READ,
    READ_TOKEN,
    WRITE,
    post_batch,
    running,
    settings_for,
    write_event,
)


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
        assert lines[0].split() == ["CLIENT", "SEQ", "LAG", "LOCAL", "STATE", "LAST", "SEEN"]
        assert lines[1].split()[:5] == ["kiosk-2", "57", "63", "-", "syncing"] and "(10m ago)" in lines[1]
        # At the head, but nothing said of its directory: not claimed "in sync".
        assert lines[2].split()[:6] == ["laptop", "120", "0", "-", "caught", "up"] and "s ago)" in lines[2]
        assert lines[-2:] == ["head seq: 120, 2 client(s)", "master: not reported"]
        code, stdout = await run_cli("status", "--interface-url", url, "--read-token", fake.token)
        assert code == 0 and "kiosk-2" in stdout and "head seq: 120" in stdout, stdout
    finally:
        await fake.stop()


@pytest.mark.usefixtures("clean_journal")
async def test_status_shows_local_differences_and_the_masters_report(rabbit, mongo, mongo_db, unique):
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, aiohttp.ClientSession() as http:
        status_code, _ = await post_batch(http, svc.url, [write_event(f"f{i}") for i in range(5)])
        assert status_code == 200
        reports = {f"{unique}-edited": {"seq": 5, "local_differences": 3}, f"{unique}-mirror": {"seq": 5,
                   "local_differences": 0}, f"{unique}-behind": {"seq": 2, "local_differences": 0},
                   f"{unique}-old": {"seq": 5}}
        for client_id, body in reports.items():
            async with http.post(f"{svc.url}/clients/{client_id}/progress", json=body, headers=READ) as r:
                assert r.status == 204
        settings = ClientSettings(interface_url=svc.url, read_token=READ_TOKEN)
        out = io.StringIO()
        assert await status(settings, out) == 0
        text = out.getvalue()
        rows = {line.split()[0]: line.split() for line in text.splitlines()[1:] if line.startswith(unique)}
        assert rows[f"{unique}-edited"][1:5] == ["5", "0", "3", "local"]  # lag 0 is not a faithful mirror
        assert rows[f"{unique}-mirror"][1:6] == ["5", "0", "0", "in", "sync"]
        assert rows[f"{unique}-behind"][1:5] == ["2", "3", "0", "syncing"]
        assert rows[f"{unique}-old"][1:6] == ["5", "0", "-", "caught", "up"]
        assert text.rstrip().endswith("master: not reported")

        unsendable = [{"path": f"bad\\x{i:02x}.txt", "reason": "path is not valid UTF-8"} for i in range(25)]
        async with http.put(svc.url + "/master", headers=WRITE, json={"watched_dirs": 4, "rescans": 1,
                                                                      "unsendable": unsendable}) as r:
            assert r.status == 204
        code, stdout = await run_cli("status", "--interface-url", svc.url, "--read-token", READ_TOKEN)
        assert code == 0, stdout
        tail = stdout.rstrip().splitlines()[-22:]
        assert tail[0].startswith("master: 4 watched dirs, 1 rescans, 25 unsendable path(s), reported "), tail
        assert tail[1] == "  bad\\x00.txt: path is not valid UTF-8" and tail[20] == "  bad\\x13.txt: path is not valid UTF-8"
        assert tail[21] == "  ... and 5 more"
