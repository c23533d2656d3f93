"""Each real service fixture works: a message through RabbitMQ, a document through SecantusDB,
a Chinese-named file through nginx, byte for byte."""

from __future__ import annotations

import hashlib
import os

import aio_pika
import aiormq
import aiohttp
import pytest
import yarl
from pymongo import AsyncMongoClient

from dlopbox import broker
from dlopbox.paths import url_path


async def test_rabbitmq_publish_and_consume_with_least_privilege(rabbit, client_queues):
    client = await aio_pika.connect(rabbit.client_url)
    interface = await aio_pika.connect(rabbit.interface_url)
    async with client, interface:
        cch = await client.channel()
        queue = await broker.declare_bound_queue(cch, "dlopbox.events", broker.queue_name(client_queues[0]))
        ich = await interface.channel()
        exchange = await ich.get_exchange("dlopbox.events")
        await exchange.publish(aio_pika.Message(b"hello", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="")
        message = await queue.get(timeout=5)
        assert message.body == b"hello"
        await message.ack()

        # A slave's user must not be able to publish to the exchange.
        evil = await client.channel()
        evil_exchange = await evil.get_exchange("dlopbox.events", ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await evil_exchange.publish(aio_pika.Message(b"evil"), routing_key="")
        assert await queue.get(fail=False, timeout=1) is None


async def test_secantus_insert_and_find_through_pymongo_async(mongo, mongo_db):
    client = AsyncMongoClient(mongo.url)
    try:
        coll = client[mongo_db]["things"]
        await coll.create_index("seq", unique=True)
        await coll.insert_many([{"seq": i, "path": f"目录/文件{i}"} for i in range(1, 4)])
        found = await coll.find({"seq": {"$gte": 2}}).sort("seq", -1).to_list()
        assert [d["path"] for d in found] == ["目录/文件3", "目录/文件2"]
    finally:
        await client.close()


async def test_nginx_serves_a_chinese_named_file_byte_exact(nginx, shared_dir):
    name = "报告 2026 #1 ?;%.bin"
    data = os.urandom(300_000)
    (shared_dir / name).write_bytes(data)
    url = yarl.URL(nginx.url + url_path(f"{shared_dir.name}/{name}"), encoded=True)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            body = await response.read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


async def test_nginx_refuses_symlinks_and_traversal(nginx, shared_dir, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("do not serve")
    os.symlink(secret, shared_dir / "link")
    async with aiohttp.ClientSession() as session:
        async with session.get(nginx.url + f"{shared_dir.name}/link") as response:
            assert response.status in (403, 404)
        for raw in ("/../etc/passwd", "/%2e%2e/etc/passwd", f"/{shared_dir.name}/..%2f..%2fetc/passwd"):
            async with session.get(yarl.URL(nginx.url.rstrip("/") + raw, encoded=True)) as response:
                assert response.status in (400, 403, 404), raw
                assert b"root:" not in await response.read()
