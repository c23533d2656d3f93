"""The broker's definitions on a real RabbitMQ: client queues left unused expire, nothing else does."""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika
import pytest

from dlopbox import broker
from dlopbox.settings import SettingsError
from tests.support.services import RabbitNode

PASSWORDS = {"RABBITMQ_ADMIN_PASSWORD": "a", "RABBITMQ_INTERFACE_PASSWORD": "i", "RABBITMQ_CLIENT_PASSWORD": "c"}


def expiry_ms(env: dict[str, str]) -> int:
    policies = json.loads(broker.definitions_from_env(env))["policies"]
    assert [p["name"] for p in policies] == ["dlopbox-client-queues-expire"]
    return policies[0]["definition"]["expires"]


def test_client_queues_expire_after_a_week_unless_told_otherwise():
    assert expiry_ms(PASSWORDS) == 7 * 24 * 3600 * 1000
    assert expiry_ms({**PASSWORDS, "DLOPBOX_CLIENT_QUEUE_EXPIRES_DAYS": "0.5"}) == 12 * 3600 * 1000
    for bad in ("0", "-1", "nan", "week", "1e9"):
        with pytest.raises(SettingsError, match="DLOPBOX_CLIENT_QUEUE_EXPIRES_DAYS"):
            broker.definitions_from_env({**PASSWORDS, "DLOPBOX_CLIENT_QUEUE_EXPIRES_DAYS": bad})


async def test_an_unused_client_queue_is_deleted_and_the_journal_is_kept(tmp_path):
    node = RabbitNode(tmp_path, client_queue_expires_ms=1000)
    await asyncio.to_thread(node.start)
    try:
        connection = await aio_pika.connect(node.client_url)
        async with connection:
            channel = await connection.channel()
            await broker.declare_bound_queue(channel, "dlopbox.events", broker.queue_name("gone-for-good"))
        admin = await aio_pika.connect(node.admin_url)
        async with admin:
            deadline = time.monotonic() + 30
            while True:
                channel = await admin.channel()
                try:
                    await channel.declare_queue(broker.queue_name("gone-for-good"), passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    break  # deleted by the policy
                await channel.close()
                assert time.monotonic() < deadline, "the unused client queue was never deleted"
                await asyncio.sleep(0.5)
            channel = await admin.channel()
            await channel.declare_queue(broker.JOURNAL_QUEUE, passive=True)  # still there
    finally:
        await asyncio.to_thread(node.stop)


def test_connections_beat_every_ten_seconds_unless_the_url_says_otherwise():
    assert broker.amqp_url("amqp://u:p@rabbit:5672/dlopbox") == "amqp://u:p@rabbit:5672/dlopbox?heartbeat=10"
    assert broker.amqp_url("amqp://u:p@rabbit/dlopbox?heartbeat=30") == "amqp://u:p@rabbit/dlopbox?heartbeat=30"
    # Percent-encoded credentials and vhost survive untouched.
    assert broker.amqp_url("amqp://u:p%2F@r/%2Fv?x=1") == "amqp://u:p%2F@r/%2Fv?x=1&heartbeat=10"


async def test_the_broker_agrees_to_the_heartbeat(rabbit):
    connection = await aio_pika.connect(broker.amqp_url(rabbit.client_url))
    async with connection:
        assert connection.transport.connection.heartbeat_timeout == broker.HEARTBEAT_S
