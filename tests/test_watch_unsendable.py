"""What the master cannot send is never skipped in silence: logged once, listed, reported, and sent once it can be.

In-process against the test receiver (caplog), then end to end: the `dlopbox watch` process,
without the capabilities that let root read any file, posting to a real `dlopbox interface`,
read back through GET /master, /metrics, GET /events and `dlopbox status`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from asyncinotify import Mask

from dlopbox.events import Op
from dlopbox.paths import MAX_PATH_BYTES
from dlopbox.tree import Ignore
from dlopbox.watch.unsendable import UnsendableEvents, UnsendablePaths, escaped
from tests.support.pipeline_harness import READ_TOKEN, InterfaceProcess, WatcherProcess
from tests.support.polling import eventually
from tests.support.receiver import Receiver
from tests.test_watcher import wait_quiet, wait_synced, watching

BAD = os.fsdecode(b"bad\xff\xfe.txt")
BAD_SHOWN = "bad\\xff\\xfe.txt"


#: A name as long as the kernel allows: in deep_dir(), its path is over MAX_PATH_BYTES.
LONG_NAME = "L" * 255


def deep_dir(root: Path) -> str:
    """A directory still reachable by its path (the kernel takes 4095 bytes), where LONG_NAME is too long to send."""
    room = 4095 - len(os.fsencode(root)) - 1 - 12
    assert room + 1 + len(LONG_NAME) > MAX_PATH_BYTES, "the test's directory is too deep already"
    parts, used = [], 0
    while used + 251 <= room:
        parts.append("d" * 250)
        used += 251
    if room - used > 1:
        parts.append("e" * (room - used - 1))
    rel = "/".join(parts)
    (root / rel).mkdir(parents=True)
    return rel


def create_below(directory: Path, name: str, data: bytes) -> None:
    """Create ``name`` in ``directory`` by a descriptor: its whole path is longer than the kernel takes."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
        os.write(fd, data)
        os.close(fd)
    finally:
        os.close(dfd)


def rename_in(directory: Path, name: str, new_name: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(name, new_name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def listed(report: Any) -> dict[str, str]:
    return {row["path"]: row["reason"] for row in report["unsendable"]} if report else {}


def warnings_about(caplog: pytest.LogCaptureFixture, shown: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and r.name == "dlopbox.watch.unsendable"
               and r.getMessage().startswith(f"cannot send {shown}:"))


def test_the_bookkeeping_logs_once_per_path_and_escapes_names(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    paths = UnsendablePaths()
    paths.add(BAD, "path is not valid UTF-8")
    paths.add(BAD, "path is not valid UTF-8")
    paths.replace_below("", {BAD: "path is not valid UTF-8", "d/x": "cannot read it: Permission denied"})
    assert warnings_about(caplog, BAD_SHOWN) == 1 and warnings_about(caplog, "d/x") == 1
    assert paths.report() == ([{"path": BAD_SHOWN, "reason": "path is not valid UTF-8"},
                               {"path": "d/x", "reason": "cannot read it: Permission denied"}], 2)
    paths.discard_below("d")
    assert "d/x" not in paths and len(paths) == 1
    paths.replace_below("", {})
    assert not paths and escaped(os.fsdecode(b"caf\xc3\xa9")) == "café"


def test_the_readers_rule_lists_unsafe_and_reserved_names_and_reads_a_listed_path_again_on_chmod():
    paths = UnsendablePaths()
    reread: list[tuple[str, ...]] = []
    rule = UnsendableEvents(paths, Ignore(["*.swp"]), lambda rel, is_dir, ts: reread.append(("dir", rel)),
                            lambda rel, ts: reread.append(("file", rel)))
    rule.ignored(BAD, BAD, int(Mask.CREATE), False)
    rule.ignored("x.swp", "x.swp", int(Mask.CLOSE_WRITE), False)  # DLOPBOX_IGNORE: on purpose, not listed
    rule.ignored("d/.dlopbox-x", ".dlopbox-x", int(Mask.MOVED_TO), False)
    paths.add("secret", "cannot read it: Permission denied")
    paths.add("locked", "cannot list it: Permission denied")
    assert set(paths.paths) == {BAD, "d/.dlopbox-x", "secret", "locked"}
    rule.sendable("secret", int(Mask.ATTRIB), False, 0.0)
    rule.sendable("locked", int(Mask.ATTRIB | Mask.ISDIR), True, 0.0)
    rule.sendable("other", int(Mask.ATTRIB), False, 0.0)
    assert reread == [("file", "secret"), ("dir", "locked")]
    rule.ignored(BAD, BAD, int(Mask.MOVED_FROM), False)
    rule.sendable("d", int(Mask.DELETE | Mask.ISDIR), True, 0.0)
    assert set(paths.paths) == {"secret", "locked"}


async def test_unsafe_names_are_logged_once_listed_and_sent_when_renamed(root: Path, receiver: Receiver,
                                                                          caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    deep = deep_dir(root)
    long_name = LONG_NAME
    long_rel = f"{deep}/{long_name}"
    (root / BAD).write_bytes(b"at start")
    async with watching(root, receiver) as watcher:
        await eventually(lambda: BAD_SHOWN in listed(receiver.master), 20, "the name found at start listed")
        (root / BAD).write_bytes(b"written again")  # more events of the same name: no second warning
        create_below(root / deep, long_name, b"long")
        (root / "sub").mkdir()
        (root / "sub" / ".dlopbox-mine").write_bytes(b"reserved")
        (root / os.fsdecode(b"dir\xe9")).mkdir()
        (root / os.fsdecode(b"dir\xe9") / "inside").write_bytes(b"not listed: its directory is")
        expected = {BAD_SHOWN: "path is not valid UTF-8",
                    long_rel: f"path is {len(long_rel)} bytes, over the {MAX_PATH_BYTES}-byte limit",
                    "sub/.dlopbox-mine": "names starting with .dlopbox are reserved for dlopbox",
                    "dir\\xe9": "path is not valid UTF-8"}
        await eventually(lambda: listed(receiver.master) == expected, 20, "every unsendable path listed")
        report = receiver.master
        assert report is not None and report["unsendable_total"] == 4 and report["watched_dirs"] == len(watcher.watches)
        await wait_synced(receiver, root)
        assert not any(e.path == "sub/.dlopbox-mine" or "inside" in e.path for e in receiver.events())
        for shown in expected:
            assert warnings_about(caplog, shown) == 1, shown

        mark = receiver.seq
        os.rename(root / BAD, root / "good.txt")
        rename_in(root / deep, long_name, "short")
        os.rename(root / os.fsdecode(b"dir\xe9"), root / "dir-e")
        await eventually(lambda: set(listed(receiver.master)) == {"sub/.dlopbox-mine"}, 20, "renamed ones unlisted")
        await wait_synced(receiver, root)
        await wait_quiet(receiver)
        sent = {(e.op, e.path) for e in receiver.events(mark)}
        assert {(Op.WRITE, "good.txt"), (Op.WRITE, f"{deep}/short"), (Op.MKDIR, "dir-e"),
                (Op.WRITE, "dir-e/inside")} <= sent
        assert receiver.tree.get("good.txt").size == len(b"written again")

        os.unlink(root / "sub" / ".dlopbox-mine")
        await eventually(lambda: listed(receiver.master) == {}, 20, "a removed one unlisted")
        assert receiver.master["unsendable_total"] == 0
        for shown in expected:
            assert warnings_about(caplog, shown) == 1, shown


async def test_the_report_never_holds_back_events_is_retried_and_sent_again_after_an_outage(
        root: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    receiver.master_status = 500
    async with watching(root, receiver) as watcher:
        (root / BAD).write_bytes(b"bad")
        (root / "fine.txt").write_bytes(b"fine")
        await wait_synced(receiver, root)  # events go out while every PUT /master fails
        await eventually(lambda: BAD in watcher.unsendable, 10, "the name listed")
        assert receiver.master is None
        failures = [r for r in caplog.records if r.getMessage().startswith("PUT /master failed")]
        assert len(failures) == 1 and failures[0].levelno == logging.WARNING  # logged, not once per retry

        receiver.master_status = None
        await eventually(lambda: BAD_SHOWN in listed(receiver.master), 20, "the report once PUT /master works")
        sent = len(receiver.master_reports)

        await receiver.stop()  # an outage: the next batch fails, then the interface is back
        (root / "during.txt").write_bytes(b"during")
        await eventually(lambda: watcher.delivery.failing, 10, "the delivery failing")
        await receiver.start()
        await wait_synced(receiver, root)
        await eventually(lambda: len(receiver.master_reports) > sent, 20, "the report sent again")
        assert receiver.master_reports[-1] == receiver.master_reports[sent - 1]  # the same report, again


def without_read_override() -> list[str]:
    """A command prefix dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: root then obeys file modes."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to run the watcher without root's read override")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


class UnprivilegedWatcher(WatcherProcess):
    def command(self) -> list[str]:
        return [*without_read_override(), *super().command()]


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        found = re.search(rf"^{name} (\S+)$", await r.text(), re.MULTILINE)
    return float(found.group(1)) if found else -1.0


async def run_status(url: str) -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "dlopbox", "status", "--interface-url", url,
                                                "--read-token", READ_TOKEN, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stdout
    return stdout.decode()


@pytest.mark.usefixtures("clean_journal")
async def test_the_master_reports_what_it_cannot_send_end_to_end(rabbit, mongo, mongo_db, tmp_path: Path):
    master = tmp_path / "master"
    master.mkdir()
    deep = deep_dir(master)
    long_name = LONG_NAME
    interface = InterfaceProcess(tmp_path / "interface", rabbit, mongo, mongo_db)
    watcher = UnprivilegedWatcher(tmp_path / "watcher", master, interface.url)
    interface.start()
    watcher.start()
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            async def report() -> dict[str, Any] | None:
                async with http.get(interface.url + "/master", headers=read) as r:
                    return await r.json() if r.status == 200 else None

            async def written(path: str) -> bool:
                async with http.get(interface.url + "/events", params={"prefix": path}, headers=read) as r:
                    return any(e["op"] == "write" and e["path"] == path for e in (await r.json())["events"])

            (master / "ok.txt").write_bytes(b"fine")
            (master / BAD).write_bytes(b"bad name")
            create_below(master / deep, long_name, b"long")
            fd = os.open(master / "secret.txt", os.O_WRONLY | os.O_CREAT, 0o000)
            os.write(fd, b"private")
            os.close(fd)
            os.mkdir(master / "locked", 0o000)
            (master / "locked" / "inner.txt").write_bytes(b"inside a directory it may not list")
            expected = {BAD_SHOWN: "path is not valid UTF-8",
                        "locked": "cannot list it: Permission denied",
                        f"{deep}/{long_name}": f"path is {len(deep) + 1 + len(long_name)} bytes, over the {MAX_PATH_BYTES}-byte limit",
                        "secret.txt": "cannot read it: Permission denied"}
            await eventually(lambda: written("ok.txt"), 30, "a sendable file sent")
            got = await eventually(lambda: _listed_as(report, expected), 30, "GET /master listing all four")
            assert got["unsendable_total"] == 4 and got["watched_dirs"] == deep.count("/") + 2  # not "locked"
            assert await metric(http, interface.url, "dlopbox_unsendable_paths") == 4
            text = await run_status(interface.url)
            for shown, reason in expected.items():
                assert f"  {shown}: {reason}" in text, text
            assert "4 unsendable path(s)" in text, text
            assert not await written("secret.txt") and not await written("locked/inner.txt")

            (master / BAD).rename(master / "good.txt")
            os.chmod(master / "secret.txt", 0o644)
            os.chmod(master / "locked", 0o755)
            rename_in(master / deep, long_name, "short")
            for path in ("good.txt", "secret.txt", f"{deep}/short", "locked/inner.txt"):
                await eventually(lambda path=path: written(path), 30, f"{path} sent")
            await eventually(lambda: _listed_as(report, {}), 30, "GET /master listing nothing")
            assert await metric(http, interface.url, "dlopbox_unsendable_paths") == 0
            assert "0 unsendable path(s)" in await run_status(interface.url)

        log = watcher.log_path.read_text(errors="replace")
        for shown in expected:
            assert log.count(f"WARNING dlopbox.watch.unsendable: cannot send {shown}:") == 1, log[-3000:]
    finally:
        watcher.stop()
        interface.stop()


async def _listed_as(report: Any, expected: dict[str, str]) -> dict[str, Any] | None:
    got = await report()
    return got if got is not None and listed(got) == expected else None
