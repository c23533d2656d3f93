"""Session fixtures: real RabbitMQ, SecantusDB and nginx, started once, cleaned per test."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest

from dlopbox import broker
from tests.support.fake_interface import FakeInterface, FakeMaster
from tests.support.pipeline_harness import InterfaceProcess, Pipeline
from tests.support.receiver import Receiver
from tests.support.services import NginxServer, RabbitNode, SecantusNode


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecantusNode]:
    node = SecantusNode(tmp_path_factory.mktemp("secantus"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    base = tmp_path_factory.mktemp("nginx")
    server = NginxServer(base / "conf", base / "shared")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A short name unique to this test, usable as a DB name, queue suffix or client id."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", request.node.name)[:40].strip("_")
    return f"{stem}_{secrets.token_hex(3)}"


@pytest.fixture
def mongo_db(mongo: SecantusNode, unique: str) -> str:
    """A fresh database name for this test.

    Not dropped afterwards: names never repeat, the whole server lives in a temp dir, and
    SecantusDB drops a database key by key under a global lock (minutes for a big log).
    """
    return unique


@pytest.fixture
async def amqp_admin(rabbit: RabbitNode) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(rabbit.admin_url)
    yield conn
    await conn.close()


@pytest.fixture
async def client_queues(rabbit: RabbitNode, unique: str) -> AsyncIterator[list[str]]:
    """Client ids for this test; their queues are deleted afterwards so tests stay independent."""
    ids: list[str] = [f"{unique}-{i}" for i in range(3)]
    yield ids
    if rabbit.running:
        conn = await aio_pika.connect(rabbit.admin_url)
        async with conn:
            for client_id in ids:
                channel = await conn.channel()
                await channel.queue_delete(broker.queue_name(client_id))


@pytest.fixture
async def clean_journal(rabbit: RabbitNode) -> AsyncIterator[None]:
    """The interface's journal queue, emptied before a test that reads it."""
    conn = await aio_pika.connect(rabbit.admin_url)
    async with conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(broker.JOURNAL_QUEUE, durable=True, arguments=broker.QUORUM)
        await queue.purge()
    yield


@pytest.fixture
def shared_dir(nginx: NginxServer, unique: str) -> Path:
    """A fresh directory below nginx's root: files put here are served at nginx.url + unique + '/'."""
    path = nginx.root / unique
    path.mkdir()
    return path


@pytest.fixture
async def upstream(shared_dir: Path, rabbit: RabbitNode) -> AsyncIterator[FakeMaster]:
    """The watcher and interface as a client sees them: a master dir served by nginx, the real
    exchange to publish to (with the interface's user), and tests/fake_interface.py's read API."""
    fake = FakeInterface(shared_dir)
    await fake.start()
    conn = await aio_pika.connect(rabbit.interface_url)
    channel = await conn.channel(publisher_confirms=True)
    exchange = await channel.get_exchange("dlopbox.events", ensure=False)
    yield FakeMaster(shared_dir, fake, exchange)
    await conn.close()
    await fake.stop()


@pytest.fixture(scope="module")
def interface_process(rabbit: RabbitNode, mongo: SecantusNode, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[InterfaceProcess]:
    """`dlopbox interface` as a process of its own (one per test module), on a database of its own."""
    process = InterfaceProcess(tmp_path_factory.mktemp("interface"), rabbit, mongo, f"iface_{secrets.token_hex(4)}")
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """The fake interface a watcher posts to (records every batch and answers the manifest)."""
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The master's directory for a watcher under test."""
    path = tmp_path / "master"
    path.mkdir()
    return path


@pytest.fixture
def pipeline(rabbit: RabbitNode, mongo: SecantusNode, unique: str, nginx: NginxServer, shared_dir: Path,
             client_queues: list[str], clean_journal: None, tmp_path: Path) -> Iterator[Pipeline]:
    """The whole system on this host (tests/support/pipeline_harness.py), its logs printed at the end.

    Its database is a fresh one, left in place afterwards: SecantusDB drops a database of thousands
    of rows key by key under its global lock, which stalls the next test's interface for tens of seconds.
    """
    p = Pipeline(tmp_path / "system", rabbit, mongo, unique, nginx, shared_dir, client_queues)
    yield p
    try:
        p.stop()
    finally:
        print(p.logs()[-20000:])
