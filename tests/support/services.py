"""Real RabbitMQ, SecantusDB (MongoDB wire protocol) and nginx servers for the tests.

Each runs as a child process on a free loopback port with its data in a temp dir, and
can be stopped, killed and started again on the same port and data, for fault tests.
No mocks: these are the servers dlopbox talks to in production, or their wire twins.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pymongo

from dlopbox import broker
from tests.support.polling import eventually_blocking

REPO = Path(__file__).resolve().parents[2]
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


#: Ports handed out by free_port in this process: never the same one twice.
_ISSUED_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, below the kernel's ephemeral range.

    bind(0) would hand out an ephemeral port, which any outgoing connection (a client retrying
    a server that is still starting) may take as its source port before the server binds it:
    nginx then failed with EADDRINUSE in a benchmark run. Below that range only listeners bind.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = secrets.randbelow(low - 10_000) + 10_000
        if port in _ISSUED_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ISSUED_PORTS.add(port)
        return port
    raise RuntimeError(f"no free loopback port between 10000 and {low}")


def http_request(url: str, *, data: bytes | None = None, token: str | None = None,
                 timeout: float = 10) -> tuple[int, bytes]:
    """A blocking GET (or POST of JSON ``data``): (status, body), error statuses included."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


class _Process:
    """A server process in its own process group, with its output in a log file."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    startup_timeout = 60.0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir)
        log.close()

        def probe() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            return self.ready()

        eventually_blocking(probe, self.startup_timeout, self.name, interval=0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RabbitNode(_Process):
    """Debian's rabbitmq-server with its own node name, data dir, ports and dlopbox's definitions."""

    name = "rabbitmq"
    startup_timeout = 90.0

    def __init__(self, workdir: Path, client_queue_expires_ms: int | None = None) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"dlopbox-test-{secrets.token_hex(4)}@localhost"
        alphabet = string.ascii_letters + string.digits
        self.passwords = {user: "".join(secrets.choice(alphabet) for _ in range(20))
                          for user in (broker.ADMIN_USER, broker.INTERFACE_USER, broker.CLIENT_USER)}
        (workdir / "home").mkdir(exist_ok=True)
        extra = {} if client_queue_expires_ms is None else {"client_queue_expires_ms": client_queue_expires_ms}
        (workdir / "definitions.json").write_text(json.dumps(broker.definitions(self.passwords, **extra)))
        (workdir / "enabled_plugins").write_text("[].\n")
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"load_definitions = {workdir / 'definitions.json'}\n"
            "log.console = false\nlog.file.level = warning\n"
        )

    def url(self, user: str) -> str:
        return f"amqp://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/{broker.VHOST}"

    @property
    def admin_url(self) -> str:
        return self.url(broker.ADMIN_USER)

    @property
    def interface_url(self) -> str:
        return self.url(broker.INTERFACE_USER)

    @property
    def client_url(self) -> str:
        return self.url(broker.CLIENT_USER)

    def command(self) -> list[str]:
        return [RABBITMQ_SERVER]

    def env(self) -> dict[str, str]:
        w = self.workdir
        return {
            **os.environ,
            "HOME": str(w / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_PID_FILE": str(w / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def ready(self) -> bool:
        # Ready means a full AMQP handshake with a provisioned user, not just an open port.
        return amqp_handshake("127.0.0.1", self.port, broker.ADMIN_USER, self.passwords[broker.ADMIN_USER], broker.VHOST)


def amqp_handshake(host: str, port: int, user: str, password: str, vhost: str) -> bool:
    """A blocking AMQP handshake (connection.open-ok) with the given user, for readiness probes."""
    import asyncio

    import aio_pika

    async def probe() -> bool:
        conn = await aio_pika.connect(host=host, port=port, login=user, password=password, virtualhost=vhost, timeout=2)
        await conn.close()
        return True

    return asyncio.run(probe())


class SecantusNode(_Process):
    """SecantusDB, a MongoDB wire-protocol server from PyPI, on disk so restarts keep data."""

    name = "secantus"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def command(self) -> list[str]:
        exe = shutil.which("secantusd-py", path=str(Path(sys.executable).parent)) or shutil.which("secantusd-py")
        assert exe, "secantusd-py not installed (pip install secantusdb)"
        return [exe, "--host", "127.0.0.1", "--port", str(self.port), "--storage-path", str(self.workdir / "data"),
                "--log-level", "WARNING"]

    def ready(self) -> bool:
        with pymongo.MongoClient(self.url, serverSelectionTimeoutMS=500) as c:
            return c.admin.command("ping")["ok"] == 1


class NginxServer(_Process):
    """Debian's nginx serving ``root`` with the project's own deploy/nginx.conf."""

    name = "nginx"

    def __init__(self, workdir: Path, root: Path, access_log: Path | None = None) -> None:
        super().__init__(workdir)
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        # Like envsubst in the official image: only the two named variables are replaced.
        server = (REPO / "deploy" / "nginx.conf").read_text().replace(
            "${NGINX_PORT}", str(self.port)).replace("${NGINX_ROOT}", str(root))
        # The test instance listens on loopback only; the template's IPv6 line is dropped.
        server = "\n".join(line for line in server.splitlines() if "[::]" not in line).replace(
            f"listen {self.port};", f"listen 127.0.0.1:{self.port};")
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / d).mkdir(exist_ok=True)
        # Workers run as this user: pytest's temp dirs are private (0700) to it.
        user = "user root root;" if os.geteuid() == 0 else ""
        # The benchmark counts the bytes each slave received: clients name themselves in User-Agent.
        logging = (f"log_format received '$http_user_agent $bytes_sent $status';\n    access_log {access_log} received;"
                   if access_log is not None else "access_log off;")
        (workdir / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    {logging}
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
{server}
}}
""")

    def command(self) -> list[str]:
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(self.workdir / "nginx.conf"),
                "-p", str(self.workdir), "-g", "daemon off;"]

    def ready(self) -> bool:
        with urllib.request.urlopen(self.url + ".dlopbox-health", timeout=1) as r:
            return r.status == 200
