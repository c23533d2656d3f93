"""compose.yaml on this machine's Docker engine: the brief's acceptance steps and more.

One deployment per module (two clients), used by the tests in order: the brief's steps,
every kind of change, the locked-down backends, a stopped client catching up, down and
up again with the volumes kept, and a quick, clean `stop` last.
"""

from __future__ import annotations

import time

import pytest

from tests.docker.helpers import (
    CHINESE_NAME,
    FETCH_FROM_NGINX,
    MONGO_NEEDS_AUTH,
    PUBLISH_AS_CLIENT,
    Compose,
    all_events,
    assert_gap_free,
    brief_steps,
    create_and_change_everything,
    file_entry,
    inspect,
    many_changes,
    run,
    wait_converged,
    write_file,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


def test_brief_steps_with_two_clients(compose_system: Compose) -> None:
    brief_steps(f"label=com.docker.compose.project={compose_system.project}", expected_clients=2)


def test_each_client_has_its_own_queue(compose_system: Compose) -> None:
    rabbit = compose_system.one("rabbit")
    queues = run("docker", "exec", rabbit, "rabbitmqctl", "-q", "list_queues", "-p", "dlopbox", "name").stdout.split()
    for client in compose_system.containers("client"):
        client_id = inspect(client)["Config"]["Hostname"]
        assert f"dlopbox.client.{client_id}" in queues, (client, queues)


def test_every_change_reaches_every_client(compose_system: Compose) -> None:
    master = compose_system.one("master")
    clients = compose_system.containers("client")
    create_and_change_everything(master, clients)


def test_nginx_serves_a_chinese_named_file_from_the_shared_volume(compose_system: Compose) -> None:
    master = compose_system.one("master")
    data = "你好，世界\n".encode()
    write_file(master, f"/shared/{CHINESE_NAME}", data)
    client = compose_system.containers("client")[0]
    served = run("docker", "exec", client, "python3", "-c", FETCH_FROM_NGINX, CHINESE_NAME).stdout.strip()
    assert f"{served} 644" == file_entry(data)


def test_broker_and_database_are_locked_down(compose_system: Compose) -> None:
    rabbit = compose_system.one("rabbit")
    users = {line.split()[0] for line in run("docker", "exec", rabbit, "rabbitmqctl", "-q", "list_users").stdout.splitlines()[1:]}
    assert users == {"dlopbox-admin", "dlopbox-interface", "dlopbox-client"}
    client = compose_system.containers("client")[0]
    assert "ACCESS_REFUSED" in run("docker", "exec", client, "python3", "-c", PUBLISH_AS_CLIENT).stdout
    interface = compose_system.one("interface")
    assert "refused: 13" in run("docker", "exec", interface, "python3", "-c", MONGO_NEEDS_AUTH).stdout


def test_a_stopped_client_catches_up_when_started(compose_system: Compose) -> None:
    master = compose_system.one("master")
    stopped, running = compose_system.containers("client")
    run("docker", "stop", stopped)
    many_changes(master, "while-stopped")
    wait_converged(master, [running])
    run("docker", "start", stopped)
    wait_converged(master, [stopped, running])


def test_down_then_up_keeps_the_log_and_the_tree(compose_system: Compose) -> None:
    token = compose_system.env["DLOPBOX_READ_TOKEN"]
    master = compose_system.one("master")
    before_tree = wait_converged(master, compose_system.containers("client"))
    before = all_events(compose_system.one("interface"), token)
    assert_gap_free(before)

    compose_system("down", timeout=120)
    volumes = run("docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={compose_system.project}").stdout.split()
    assert {f"{compose_system.project}_{v}" for v in ("shared", "rabbit-data", "mongo-data")} <= set(volumes)
    compose_system.up(clients=2)

    master = compose_system.one("master")
    clients = compose_system.containers("client")
    assert wait_converged(master, clients) == before_tree  # new client containers bootstrap
    after_restart = all_events(compose_system.one("interface"), token)
    assert after_restart[: len(before)] == before

    write_file(master, "/shared/after-restart.txt", b"new\n")
    wait_converged(master, clients)
    after = all_events(compose_system.one("interface"), token)
    seqs = assert_gap_free(after)
    assert len(seqs) > len(before) and after[len(before)]["seq"] == before[-1]["seq"] + 1

    compose_system.up(clients=3)  # a third, new slave joins late
    clients = compose_system.containers("client")
    assert len(clients) == 3
    assert wait_converged(master, clients) == {**before_tree, "after-restart.txt": file_entry(b"new\n")}


def test_compose_stop_is_quick_and_clean(compose_system: Compose) -> None:
    names = compose_system.containers("client") + [
        compose_system.one(s) for s in ("master", "interface", "nginx", "rabbit", "mongo")]
    started = time.monotonic()
    compose_system("stop", timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"stop took {elapsed:.1f} s"
    states = {name: inspect(name)["State"] for name in names}
    assert all(not s["Running"] for s in states.values())
    assert {n: s["ExitCode"] for n, s in states.items() if s["ExitCode"] != 0} == {}, "killed, not stopped on SIGTERM"
