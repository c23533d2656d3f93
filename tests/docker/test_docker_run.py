"""docker-run.sh on this machine's Docker engine: the same system with plain docker commands.

One deployment per module (two clients), used in order: `up` twice is harmless, the
brief's steps and `docker-run.sh test`, every kind of change, a `test` that must fail when
a client is cut off, the same container options as compose.yaml, and `down`/`up` keeping
the volumes, then `down --volumes` removing them.
"""

from __future__ import annotations

import secrets
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from tests.docker.helpers import (
    Compose,
    DockerRun,
    all_events,
    assert_gap_free,
    brief_steps,
    create_and_change_everything,
    file_entry,
    inspect,
    run,
    wait_converged,
    write_file,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

SERVICES = ("master", "interface", "client", "nginx", "rabbit", "mongo")


def test_up_twice_changes_nothing(docker_run_system: DockerRun) -> None:
    def ids() -> dict[str, str]:
        names = [n for s in SERVICES for n in docker_run_system.containers(s)]
        return {n: inspect(n)["Id"] for n in names}

    before = ids()
    assert len(before) == 7  # two clients
    result = docker_run_system("up", "--clients", "2")
    assert ids() == before
    # It ends with what to do next.
    assert "./docker-run.sh test " in result.stdout and "./docker-run.sh down " in result.stdout


def test_every_service_logs_its_version_as_it_starts(docker_run_system: DockerRun) -> None:
    version = metadata.version("dlopbox")
    for service, command in (("master", "watch"), ("interface", "interface"), ("client", "client")):
        for name in docker_run_system.containers(service):
            logs = run("docker", "logs", name)
            assert f"dlopbox {version} {command} starting" in logs.stdout + logs.stderr, name
    assert run("docker", "exec", docker_run_system.one("master"), "dlopbox", "--version").stdout == f"dlopbox {version}\n"


def test_brief_steps_and_the_test_command(docker_run_system: DockerRun) -> None:
    brief_steps(f"label=org.dlopbox.project={docker_run_system.project}", expected_clients=2)
    # `docker-run.sh test` removes the existing prova first, so its arrival proves the sync.
    result = docker_run_system("test")
    assert "ok: prova is in every client" in result.stdout


def test_every_change_reaches_every_client(docker_run_system: DockerRun) -> None:
    create_and_change_everything(docker_run_system.one("master"), docker_run_system.containers("client"))


def test_the_test_command_fails_when_a_client_does_not_follow(docker_run_system: DockerRun) -> None:
    cut = docker_run_system.containers("client")[0]
    network = f"{docker_run_system.project}-net"
    run("docker", "network", "disconnect", network, cut)
    try:
        result = docker_run_system("test", check=False, timeout=120, env={"DLOPBOX_TEST_TIMEOUT": "5"})
        assert result.returncode != 0, result.stdout
    finally:
        run("docker", "network", "connect", network, cut)
    wait_converged(docker_run_system.one("master"), docker_run_system.containers("client"))


def _options(container: str) -> dict[str, Any]:
    """What a container was run with, as far as compose.yaml and docker-run.sh both decide it."""
    info = inspect(container)
    config, host = info["Config"], info["HostConfig"]
    image_env = set(inspect_image_env(config["Image"]))
    # Named volumes differ by their project prefix only: compare where they go, and how.
    mounts = sorted((m["Type"], m["Destination"], m["RW"], m["Source"] if m["Type"] == "bind" else "")
                    for m in info["Mounts"])
    networks = info["NetworkSettings"]["Networks"]
    assert len(networks) == 1, networks
    return {
        "image": config["Image"],
        "cmd": config["Cmd"],
        "env": sorted(set(config["Env"]) - image_env),
        "workdir": config["WorkingDir"],
        "healthcheck": config.get("Healthcheck"),
        "init": host.get("Init"),
        "restart": host["RestartPolicy"]["Name"],
        "stop_timeout": config.get("StopTimeout"),
        "ports": {p: [b["HostIp"] for b in bindings] for p, bindings in (host.get("PortBindings") or {}).items()},
        "mounts": mounts,
        "read_only_rootfs": host["ReadonlyRootfs"],
    }


def inspect_image_env(image: str) -> list[str]:
    return inspect(image)["Config"]["Env"] or []


def test_containers_have_the_same_options_as_compose(docker_run_system: DockerRun, tmp_path: Path) -> None:
    compose_env = {k: v for k, v in docker_run_system.env.items() if not k.startswith(("DLOPBOX_PROJECT", "DLOPBOX_ENV_FILE"))}
    compose = Compose(f"dlopboxe2e{secrets.token_hex(4)}", compose_env, tmp_path / "env")
    try:
        # A running twin: `up --no-start` would wait forever on the definitions one-shot.
        compose.up(clients=2)
        for service in SERVICES:
            ours = docker_run_system.containers(service)[0]
            theirs = compose.containers(service)[0]
            mine, want = _options(ours), _options(theirs)
            assert mine == want, f"{service}: docker-run.sh {mine} != compose {want}"
        assert inspect(docker_run_system.one("rabbit"))["Config"]["Hostname"] == "rabbit"
    finally:
        compose("down", "--volumes", check=False)


def test_down_keeps_the_volumes_and_up_resumes(docker_run_system: DockerRun) -> None:
    token = docker_run_system.env["DLOPBOX_READ_TOKEN"]
    before_tree = wait_converged(docker_run_system.one("master"), docker_run_system.containers("client"))
    before = all_events(docker_run_system.one("interface"), token)
    assert_gap_free(before)
    volumes = docker_run_system.volumes()

    docker_run_system("down")
    assert docker_run_system.containers("master", running=False) == []
    assert docker_run_system.volumes() == volumes and len(volumes) == 4

    docker_run_system("up", "--clients", "2")
    master, clients = docker_run_system.one("master"), docker_run_system.containers("client")
    assert wait_converged(master, clients) == before_tree  # fresh client containers bootstrap
    assert all_events(docker_run_system.one("interface"), token)[: len(before)] == before
    write_file(master, "/shared/after-restart.txt", b"new\n")
    assert wait_converged(master, clients) == {**before_tree, "after-restart.txt": file_entry(b"new\n")}
    after = all_events(docker_run_system.one("interface"), token)
    assert_gap_free(after)
    assert after[len(before)]["seq"] == before[-1]["seq"] + 1

    docker_run_system("down", "--volumes")
    assert docker_run_system.volumes() == []
    assert run("docker", "network", "ls", "-q", "--filter", f"name=^{docker_run_system.project}-net$").stdout.strip() == ""
