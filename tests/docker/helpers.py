"""Helpers for the docker end-to-end tests: run commands, read trees inside containers, drive deployments."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dlopbox.events import BLOCK_SIZE, blocks_digest

REPO = Path(__file__).resolve().parents[2]
SECRETS = ("DLOPBOX_TOKEN", "DLOPBOX_READ_TOKEN", "RABBITMQ_ADMIN_PASSWORD", "RABBITMQ_INTERFACE_PASSWORD",
           "RABBITMQ_CLIENT_PASSWORD", "MONGO_INITDB_ROOT_PASSWORD")
# Variables of the developer's shell or .env that must not leak into a test deployment.
_OURS = ("DLOPBOX_", "RABBITMQ_", "MONGO_INITDB_", "COMPOSE_")

# Run inside a container: every path below ROOT with its type, sha256 and permission bits.
# dlopbox's own names (.dlopbox*) are skipped: the client keeps its state there.
TREE_SCRIPT = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
tree = {}

def digest(blocks):
    # The protocol's digest: a file of one block (1 MiB) or less by its SHA-256, a longer one by
    # the SHA-256 of its blocks' SHA-256s (dlopbox.events.blocks_digest).
    if len(blocks) > 1:
        return hashlib.sha256(b"".join(blocks)).hexdigest()
    return (blocks[0] if blocks else hashlib.sha256(b"").digest()).hex()

for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".dlopbox")]
    rel = os.path.relpath(dirpath, root)
    for name in dirnames:
        tree[os.path.normpath(os.path.join(rel, name))] = "dir"
    for name in filenames:
        if name.startswith(".dlopbox"):
            continue
        path = os.path.join(dirpath, name)
        st = os.lstat(path)
        key = os.path.normpath(os.path.join(rel, name))
        if stat.S_ISLNK(st.st_mode):
            tree[key] = "link:" + os.readlink(path)
            continue
        with open(path, "rb") as f:
            blocks = [hashlib.sha256(chunk).digest() for chunk in iter(lambda: f.read(1 << 20), b"")]
        tree[key] = "%s %o" % (digest(blocks), stat.S_IMODE(st.st_mode))
print(json.dumps(tree, ensure_ascii=False))
"""


def run(*args: str | Path, check: bool = True, timeout: float = 600, input: bytes | None = None,
        env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the error shows its output."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, input=input, capture_output=True,
                          timeout=timeout)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                         proc.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}


def file_entry(data: bytes, mode: int = 0o644) -> str:
    """What tree() says of a file holding ``data``: the protocol's digest and the mode."""
    hashes = tuple(hashlib.sha256(data[i:i + BLOCK_SIZE]).hexdigest() for i in range(0, len(data), BLOCK_SIZE))
    digest = blocks_digest(hashes) if len(hashes) > 1 else hashlib.sha256(data).hexdigest()
    return f"{digest} {mode:o}"


def tree(container: str, root: str) -> dict[str, str]:
    return json.loads(run("docker", "exec", container, "python3", "-c", TREE_SCRIPT, root).stdout)


def write_file(container: str, path: str, data: bytes) -> None:
    run("docker", "exec", "-i", container, "sh", "-c", 'cat > "$1"', "_", path, input=data)


def sh_in(container: str, script: str, *args: str) -> str:
    """A shell script in the container; args are $1, $2... (safe for any file name)."""
    return run("docker", "exec", container, "sh", "-c", script, "_", *args).stdout


def ls(container: str) -> list[str]:
    """The brief's check: `ls` in the container's working directory."""
    return run("docker", "exec", container, "ls").stdout.splitlines()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def describe_difference(want: dict[str, str], got: dict[str, str]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    return f"missing {missing[:10]}, extra {extra[:10]}, different {changed[:10]}"


def wait_converged(master: str, clients: list[str], timeout: float = 180) -> dict[str, str]:
    """Wait until every client's /sync equals the master's /shared (type, sha256, mode of each file)."""
    deadline = time.monotonic() + timeout
    while True:
        want = tree(master, "/shared")
        got = {c: tree(c, "/sync") for c in clients}
        if all(g == want for g in got.values()):
            return want
        if time.monotonic() > deadline:
            report = "; ".join(f"{c}: {describe_difference(want, g)}" for c, g in got.items() if g != want)
            raise AssertionError(f"clients did not converge within {timeout:.0f} s: {report}")
        time.sleep(1)


def container_port(container: str, port: int) -> str:
    """host:port a container's port is published on."""
    out = run("docker", "port", container, f"{port}/tcp").stdout.split()
    assert out, f"{container} publishes no {port}/tcp"
    return out[0]


def fetch_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def all_events(interface: str, token: str) -> list[dict[str, Any]]:
    """The whole event log, through the interface's published GET /events."""
    base = f"http://{container_port(interface, 5000)}"
    events: list[dict[str, Any]] = []
    since = 0
    while True:
        page = fetch_json(f"{base}/events?{urllib.parse.urlencode({'since': since})}", token)
        if not page["events"]:
            return events
        events += page["events"]
        since = page["next"]


def inspect(container: str) -> dict[str, Any]:
    return json.loads(run("docker", "inspect", container).stdout)[0]


def deployment_env(images: dict[str, str]) -> dict[str, str]:
    """Random secrets, the built images, a free interface port: one isolated deployment."""
    env = {name: secrets.token_hex(16) for name in SECRETS}
    env["MONGO_INITDB_ROOT_USERNAME"] = "root"
    env["DLOPBOX_INTERFACE_PORT"] = ""
    env.update(images)
    return env


def compose_command() -> list[str]:
    """`docker compose` (v2) when installed, else docker-compose (1.29 here)."""
    if run("docker", "compose", "version", check=False, timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor docker-compose is installed")


class Compose:
    """One compose project from the repo's compose.yaml, with its own env file."""

    def __init__(self, project: str, env: dict[str, str], env_file: Path) -> None:
        self.project = project
        self.env = env
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.base = [*compose_command(), "-p", project, "-f", str(REPO / "compose.yaml"),
                     "--env-file", str(env_file)]

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run(*self.base, *args, check=check, timeout=timeout, env={**clean_environ(), **self.env})

    def up(self, clients: int = 2) -> None:
        self("up", "-d", "--scale", f"client={clients}", timeout=900)

    def containers(self, service: str, running: bool = True) -> list[str]:
        """Container names of a service, in replica order."""
        args = ["docker", "ps", "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}"]
        if not running:
            args.insert(2, "-a")
        names = run(*args).stdout.split()
        return sorted(names, key=lambda n: int(inspect(n)["Config"]["Labels"]["com.docker.compose.container-number"]))

    def one(self, service: str) -> str:
        names = self.containers(service)
        assert len(names) == 1, f"expected one running {service} container, found {names}"
        return names[0]

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "60", check=False).stdout


class DockerRun:
    """One deployment by docker-run.sh, under its own name prefix and env file."""

    def __init__(self, project: str, env: dict[str, str], env_file: Path) -> None:
        self.project = project
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.env = {**env, "DLOPBOX_PROJECT": project, "DLOPBOX_ENV_FILE": str(env_file)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 900,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run(REPO / "docker-run.sh", *args, check=check, timeout=timeout,
                   env={**clean_environ(), **self.env, **(env or {})})

    def containers(self, service: str, running: bool = True) -> list[str]:
        args = ["docker", "ps", "--filter", f"label=org.dlopbox.project={self.project}",
                "--filter", f"label=org.dlopbox.service={service}", "--format", "{{.Names}}"]
        if not running:
            args.insert(2, "-a")
        return sorted(run(*args).stdout.split())

    def one(self, service: str) -> str:
        names = self.containers(service)
        assert len(names) == 1, f"expected one running {service} container, found {names}"
        return names[0]

    def volumes(self) -> list[str]:
        return sorted(run("docker", "volume", "ls", "-q", "--filter", f"label=org.dlopbox.project={self.project}").stdout.split())

    def logs(self) -> str:
        return self("logs", check=False).stdout


# ---------------------------------------------------------------- the scenario both deployments run
BIG_FILE_BYTES = 50 * 1024 * 1024
CHINESE_NAME = "报告 2026.txt"


def brief_containers(label_filter: str) -> tuple[list[str], list[str]]:
    """The brief's `docker ps | grep mydropbox` and `docker ps | grep myclient`, for one deployment."""
    lines = run("docker", "ps", "--filter", label_filter).stdout.splitlines()[1:]
    masters = [line.split()[0] for line in lines if "mydropbox" in line]
    clients = [line.split()[0] for line in lines if "myclient" in line]
    return masters, clients


def brief_steps(label_filter: str, expected_clients: int) -> None:
    """The brief, step by step: touch /shared/prova in master; `ls` in every client shows it."""
    masters, clients = brief_containers(label_filter)
    assert len(masters) == 1, f"docker ps | grep mydropbox found {masters}"
    assert len(clients) == expected_clients, f"docker ps | grep myclient found {clients}"
    for client in clients:
        assert "prova" not in ls(client), f"{client} has prova before it was created"
    run("docker", "exec", masters[0], "bash", "-c", "cd /shared && touch prova")
    for client in clients:
        wait_for(lambda: "prova" in ls(client), 30, f"prova in `ls` of client {client}")


def create_files(master: str, model: dict[str, str]) -> None:
    """Directories, a Chinese name, a 50 MiB file; `model` gets what the tree must now hold."""
    sh_in(master, 'mkdir -p "$1/docs/deep/er" "$1/空 目录"', "/shared")
    files = {
        "docs/a.txt": b"first version\n",
        "docs/deep/er/b.txt": b"deep\n",
        CHINESE_NAME: "季度报告：一切正常。\n".encode(),
        "big.bin": os.urandom(BIG_FILE_BYTES),
    }
    for path, data in files.items():
        write_file(master, f"/shared/{path}", data)
        model[path] = file_entry(data)
    model.update({"docs": "dir", "docs/deep": "dir", "docs/deep/er": "dir", "空 目录": "dir"})


def change_files(master: str, model: dict[str, str]) -> None:
    """Edit, append, chmod, delete, rename a directory and files; `model` follows."""
    write_file(master, "/shared/docs/a.txt", b"second version, longer than the first\n")
    model["docs/a.txt"] = file_entry(b"second version, longer than the first\n")
    sh_in(master, 'printf "more\\n" >> "$1" && chmod 755 "$1"', "/shared/docs/deep/er/b.txt")
    model["docs/deep/er/b.txt"] = file_entry(b"deep\nmore\n", 0o755)
    if "prova" in model:
        sh_in(master, 'rm "$1"', "/shared/prova")
        del model["prova"]
    sh_in(master, 'mv "$1/docs" "$1/archive"', "/shared")
    for path in [p for p in model if p == "docs" or p.startswith("docs/")]:
        model["archive" + path[len("docs"):]] = model.pop(path)
    renamed = "archive/报告 2026 终稿.txt"
    sh_in(master, 'mv "$1" "$2"', f"/shared/{CHINESE_NAME}", f"/shared/{renamed}")
    model[renamed] = model.pop(CHINESE_NAME)
    sh_in(master, 'mv "$1" "$2"', "/shared/big.bin", "/shared/archive/big.bin")
    model["archive/big.bin"] = model.pop("big.bin")
    sh_in(master, 'rmdir "$1"', "/shared/空 目录")
    del model["空 目录"]


def create_and_change_everything(master: str, clients: list[str]) -> None:
    """The brief's operations after `touch prova`, each phase checked against a model of the tree."""
    model = wait_converged(master, clients)
    create_files(master, model)
    assert wait_converged(master, clients) == model
    change_files(master, model)
    assert wait_converged(master, clients) == model


def many_changes(master: str, directory: str) -> dict[str, bytes]:
    """A burst of 30 new files, one rewritten, one deleted, one renamed, in a new directory."""
    files = {f"{directory}/f{i:02d}.txt": f"file {i}\n".encode() * (i + 1) for i in range(30)}
    sh_in(master, 'mkdir -p "$1"', f"/shared/{directory}")
    for path, data in files.items():
        write_file(master, f"/shared/{path}", data)
    write_file(master, f"/shared/{directory}/f00.txt", b"rewritten\n")
    sh_in(master, 'rm "$1/f01.txt" && mv "$1/f02.txt" "$1/renamed.txt"', f"/shared/{directory}")
    return files


def assert_gap_free(events: list[dict[str, Any]]) -> list[int]:
    seqs = [e["seq"] for e in events]
    assert seqs, "the event log is empty"
    assert seqs == list(range(1, len(seqs) + 1)), f"seqs are not 1..N without gaps: {seqs[:20]}..."
    return seqs


PUBLISH_AS_CLIENT = r"""
import asyncio, os, sys
import aio_pika
from aiormq.exceptions import ChannelAccessRefused

async def main():
    connection = await aio_pika.connect(os.environ["DLOPBOX_AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("dlopbox.events", ensure=False)
        try:
            await exchange.publish(aio_pika.Message(b'{"forged": true}'), routing_key="")
        except ChannelAccessRefused as exc:
            print("refused:", exc)
            return
        sys.exit("the client's user could publish to the exchange")

asyncio.run(main())
"""

MONGO_NEEDS_AUTH = r"""
import os, sys, urllib.parse
import pymongo
from pymongo.errors import OperationFailure

url = os.environ["DLOPBOX_MONGO_URL"]
pymongo.MongoClient(url, serverSelectionTimeoutMS=5000).dlopbox.list_collection_names()
parts = urllib.parse.urlsplit(url)
anonymous = urllib.parse.urlunsplit((parts.scheme, parts.hostname + ":" + str(parts.port), "/", "", ""))
try:
    pymongo.MongoClient(anonymous, serverSelectionTimeoutMS=5000).dlopbox.list_collection_names()
except OperationFailure as exc:
    print("refused:", exc.code)
else:
    sys.exit("MongoDB answered without credentials")
"""

FETCH_FROM_NGINX = r"""
import hashlib, sys, urllib.parse, urllib.request
url = "http://nginx/" + urllib.parse.quote(sys.argv[1])
with urllib.request.urlopen(url, timeout=10) as response:
    print(hashlib.sha256(response.read()).hexdigest())
"""
