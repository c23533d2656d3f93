"""Local changes on slaves with the whole system on the host: watcher, interface and three clients as processes.

The master churns while two slaves are tampered with; every slave must end equal to the master.
A slave that keeps its local changes reports their count to the real interface, which takes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import threading
from pathlib import Path

import aiohttp
import pytest

from dlopbox.client.state import load_state
from tests.support.client_harness import wait_equal
from tests.support.pipeline_harness import READ_TOKEN, Pipeline
from tests.support.polling import eventually

pytestmark = pytest.mark.timeout(240)


async def synced(p: Pipeline) -> None:
    for i in range(len(p.clients)):
        await eventually(lambda i=i: load_state(p.slaves[i]) is not None, 60, f"client {i}'s first sync")


def churn_master(master: Path, stop: threading.Event, seed: int) -> int:
    rng = random.Random(seed)
    files: list[Path] = []
    ops = 0
    for d in range(5):
        (master / f"m{d}").mkdir()
    while not stop.is_set():
        op = rng.choice(("create", "create", "edit", "delete", "rename"))
        if op == "create" or not files:
            path = master / f"m{rng.randrange(5)}" / f"f{ops}.bin"
            path.write_bytes(os.urandom(rng.randrange(1, 20_000)))
            files.append(path)
        elif op == "edit":
            rng.choice(files).write_bytes(os.urandom(rng.randrange(1, 20_000)))
        elif op == "delete":
            files.pop(rng.randrange(len(files))).unlink()
        else:
            i = rng.randrange(len(files))
            new = files[i].with_name(f"r{ops}.bin")
            files[i].rename(new)
            files[i] = new
        ops += 1
        stop.wait(0.01)
    return ops


def tamper(slave: Path, stop: threading.Event, seed: int) -> int:
    rng = random.Random(seed)
    ops = 0
    while not stop.is_set():
        files = [Path(d) / n for d, dirs, names in os.walk(slave) if ".dlopbox" not in d for n in names
                 if not n.startswith(".dlopbox")]
        try:
            op = rng.choice(("delete", "modify", "add", "add dir", "chmod"))
            if op == "add":
                (slave / f"stray-{ops}").write_bytes(b"local")
            elif op == "add dir":
                (slave / f"stray-dir-{ops}/x").mkdir(parents=True)
            elif files and op == "delete":
                rng.choice(files).unlink()
            elif files and op == "modify":
                with open(rng.choice(files), "ab") as f:
                    f.write(b"tampered")
            elif files:
                os.chmod(rng.choice(files), 0o600)
            ops += 1
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # the client moved it meanwhile
        stop.wait(0.03)
    return ops


async def test_tampering_during_a_burst_ends_with_every_slave_equal(pipeline: Pipeline):
    p = pipeline
    p.start()
    await synced(p)
    stop = threading.Event()
    master_ops: list[int] = []
    tampers: list[int] = []
    threads = [threading.Thread(target=lambda: master_ops.append(churn_master(p.master, stop, 1))),
               *(threading.Thread(target=lambda s=s, i=i: tampers.append(tamper(s, stop, 10 + i)))
                 for i, s in enumerate(p.slaves[:2]))]
    for t in threads:
        t.start()
    await asyncio.sleep(6)
    stop.set()
    for t in threads:
        await asyncio.to_thread(t.join)
    assert master_ops[0] > 100 and all(n > 50 for n in tampers), (master_ops, tampers)
    await wait_equal(p.master, *p.slaves, timeout=60)
    for client in p.clients[:2]:
        assert "local change" in client.log()
    assert "local change" not in p.clients[2].log()


async def test_the_interface_takes_the_count_of_local_differences(pipeline: Pipeline):
    p = pipeline
    p.clients[0].settings = dataclasses.replace(p.client_settings(0), local_changes="keep")
    p.start()
    await synced(p)
    (p.master / "shared.txt").write_bytes(b"from the master")
    await wait_equal(p.master, *p.slaves)
    (p.slaves[0] / "mine.txt").write_bytes(b"kept on this slave")
    shutil.copy(p.master / "shared.txt", p.slaves[0] / "copy.txt")
    await eventually(lambda: p.clients[0].log().count("local change kept") == 2, 15, "two local changes kept")
    (p.master / "later.txt").write_bytes(b"the master moves on")
    await eventually(lambda: (p.slaves[0] / "later.txt").exists(), 15, "the keep slave still following")
    assert (p.slaves[0] / "mine.txt").read_bytes() == b"kept on this slave"
    await asyncio.sleep(1)  # a few reports, each with local_differences, have been sent
    assert "cannot report progress" not in p.clients[0].log()

    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:

        async def seq_taken() -> bool:
            async with http.get(p.interface.url + "/clients") as r:
                body = await r.json()
            seqs = {c["id"]: c["seq"] for c in body["clients"]}
            return seqs.get(p.client_ids[0]) == body["head"] == load_state(p.slaves[0]).seq

        await eventually(seq_taken, 15, "the keep slave's progress taken by the interface")
        for body, status in (({"seq": 1, "local_differences": 3}, 204), ({"seq": 1, "local_differences": -1}, 400),
                             ({"seq": 1, "local_differences": True}, 400), ({"seq": 1, "other": 1}, 400)):
            async with http.post(p.interface.url + "/clients/probe/progress", json=body) as r:
                assert r.status == status, (body, r.status, await r.text())
