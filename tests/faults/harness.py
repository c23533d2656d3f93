"""Drive the compose deployment through faults: churn, injected failures, and the checks after them.

Built on tests/docker/helpers.py (Compose, tree, run...). After each fault, :meth:`Deployment.settle`
checks what issue 7 demands: every client's tree equals the master's, the MongoDB log holds
every event exactly once with gap-free seqs (and replays to the master's tree), and no
``.dlopbox-tmp-*`` file is left anywhere.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import traceback
import urllib.error
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.docker.helpers import (
    Compose,
    container_port,
    describe_difference,
    inspect,
    run,
    tree,
)
from tests.faults import report
from tests.support.services import http_request

HERE = Path(__file__).resolve().parent
CHURN = (HERE / "churn.py").read_text(encoding="utf-8")
LOGCHECK = (HERE / "logcheck.py").read_text(encoding="utf-8")
#: How long every client gets to equal the master once the churn has stopped.
CONVERGE_TIMEOUT = 150.0
_STARTED: list[Churn] = []  # churns of the running case, reaped when it ends


class Churn:
    """tests/faults/churn.py running in a container until stop() closes its standard input."""

    def __init__(self, prefix: list[str], root: str, seed: int, max_ops: int = 1_000_000,
                 max_seconds: float = 240, interval: float = 0.02) -> None:
        self.root = root
        self.started = time.monotonic()
        self.proc = subprocess.Popen([*prefix, "python3", "-c", CHURN, root, str(seed), str(max_ops),
                                      str(max_seconds), str(interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Ours to close (that is the stop signal); communicate() must not close it on its own.
        self.stdin, self.proc.stdin = self.proc.stdin, None
        _STARTED.append(self)

    def wait(self, timeout: float = 300) -> dict[str, Any]:
        """Let it finish on its own (max_ops or max_seconds); its summary."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.close_stdin()
        if self.proc.returncode != 0:
            raise AssertionError(f"churn failed ({self.proc.returncode}): {err.decode(errors='replace')[-2000:]}")
        return json.loads(out.decode().strip().splitlines()[-1])

    def stop(self) -> dict[str, Any]:
        """Stop it now (it finishes the operation in progress); its summary."""
        self.close_stdin()
        return self.wait(60)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.stdin.close()
            self.stdin = None

    def kill(self) -> None:
        self.close_stdin()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@dataclass
class Settled:
    """What :meth:`Deployment.settle` measured."""

    converge_s: float
    events: int
    redundant: int
    entries: int


@dataclass
class Case:
    """One row of the results table, filled in while the case runs."""

    key: str
    title: str
    order: int
    group: str = "fault"
    happened: str = ""
    events_lost: int | None = None
    converge_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: Paths already wrong when the case began (left by an earlier failed case): reported, not blamed here.
    inherited: set[str] = field(default_factory=set)
    #: The log's last seq when the case began: only later events are this case's.
    log_start: int = 0


class Deployment(Compose):
    """The compose project the fault suite runs on, with its services by role."""

    def __init__(self, project: str, env: dict[str, str], env_file: Path) -> None:
        super().__init__(project, env, env_file)
        #: Why tree reads were killed during the current case (a container's process exited under them).
        self.restarts: list[str] = []

    @property
    def master(self) -> str:
        return self.one("master")

    @property
    def interface(self) -> str:
        return self.one("interface")

    @property
    def clients(self) -> list[str]:
        return self.containers("client", running=False)

    def service(self, name: str) -> str:
        names = self.containers(name, running=False)
        assert len(names) == 1, f"expected one {name} container, found {names}"
        return names[0]

    @property
    def network(self) -> str:
        return f"{self.project}_dlopbox"

    @property
    def shared_volume(self) -> str:
        return f"{self.project}_shared"

    # -- the interface, from the host ---------------------------------------------------------

    def url(self) -> str:
        return f"http://{container_port(self.interface, 5000)}"

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        return http_request(self.url() + path, token=token)

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/healthz")[1])

    def metric(self, name: str) -> float:
        """One sample of the interface's /metrics (0 when absent), e.g. 'dlopbox_events_total'."""
        text = self.get("/metrics")[1].decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line == name:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_healthy(self, timeout: float = 180) -> float:
        """Until the interface answers 200 on /healthz (both backends up); seconds waited."""
        started = time.monotonic()
        while True:
            try:
                status, _ = self.get("/healthz")
                if status == 200:
                    return time.monotonic() - started
            except (OSError, AssertionError, urllib.error.URLError):
                pass  # restarting: no published port, or the connection is refused
            if time.monotonic() - started > timeout:
                raise AssertionError(f"the interface was not healthy within {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.5)

    # -- containers ---------------------------------------------------------------------------

    def wait_running(self, container: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not inspect(container)["State"]["Running"]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{container} is not running after {timeout:.0f} s")
            time.sleep(0.3)

    def logs_since(self, container: str, since: str) -> str:
        result = run("docker", "logs", "--since", since, container, check=False)
        return result.stdout + result.stderr

    def churn(self, name: str, seed: int, **kwargs: Any) -> Churn:
        """Churn below /shared/churn/<name>, from inside the master container."""
        return Churn(["docker", "exec", "-i", self.master], f"/shared/churn/{name}", seed, **kwargs)

    def churn_on_volume(self, name: str, seed: int, **kwargs: Any) -> Churn:
        """The same churn from a throwaway container on the shared volume (for when the master is down)."""
        image = inspect(self.master if self.containers("master") else self.service("master"))["Config"]["Image"]
        return Churn(["docker", "run", "--rm", "-i", "--network", "none", "-v", f"{self.shared_volume}:/shared",
                      "--entrypoint", "", image], f"/shared/churn/{name}", seed, **kwargs)

    # -- the checks after a fault -------------------------------------------------------------

    def trees(self, clients: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """The master's tree and each client's, read in parallel."""
        pairs = [(self.master, "/shared"), *((c, "/sync") for c in clients)]
        with ThreadPoolExecutor(len(pairs)) as pool:
            found = list(pool.map(lambda pair: self._tree(*pair), pairs))
        return found[0], dict(zip(clients, found[1:]))

    def _tree(self, container: str, root: str) -> dict[str, str]:
        """A tree read; an exec killed because the container's process exited under it is noted
        (with what it logged last) and read again once Docker has restarted it."""
        try:
            return _stable_tree(container, root)
        except AssertionError as exc:
            if "exited 137" not in str(exc):
                raise
            why = _why_killed(container)
        print(f"--- a tree read was killed (137):\n{why}")
        self.restarts.append(why)
        self.wait_running(container)
        return _stable_tree(container, root)

    def wait_equal(self, clients: list[str], timeout: float = CONVERGE_TIMEOUT,
                   ignore: AbstractSet[str] = frozenset()) -> tuple[float, dict[str, str]]:
        """Until each of ``clients`` has the master's tree (but for ``ignore``); (seconds, that tree).
        On timeout the AssertionError carries ``lost``: the most paths any client has wrong."""
        started = time.monotonic()
        while True:
            want, got = self.trees(clients)
            if all(not _differing(want, g) - ignore for g in got.values()):
                return time.monotonic() - started, want
            if time.monotonic() - started > timeout:
                lost = max(len(_differing(want, g) - ignore) for g in got.values())
                error = AssertionError(f"clients still differ from the master at {lost} paths {timeout:.0f} s "
                                       "after the churn stopped\n"
                                       + "; ".join(f"{c}: {describe_difference(want, g)}"
                                                   for c, g in got.items() if g != want))
                error.lost = lost  # type: ignore[attr-defined]
                raise error
            time.sleep(0.5)

    def audit_log(self) -> dict[str, Any]:
        return json.loads(run("docker", "exec", self.interface, "python3", "-c", LOGCHECK, timeout=300).stdout)

    def temp_files(self) -> dict[str, list[str]]:
        found = {}
        for container, root in [(self.master, "/shared"), *((c, "/sync") for c in self.containers("client"))]:
            out = run("docker", "exec", container, "find", root, "-name", ".dlopbox-tmp-*").stdout.split("\n")
            found[container] = [line for line in out if line]
        return found

    def begin(self, case: Case) -> Case:
        """Note what is already wrong before the case starts, so that one failure does not fail every later case."""
        self.restarts.clear()
        want, got = self.trees(self.containers("client"))
        case.inherited = set().union(*(_differing(want, g) for g in got.values()))
        audit = self.audit_log()
        case.inherited |= set(audit["state_diff"])
        case.log_start = audit["last"]
        if case.inherited:
            case.details["inherited"] = sorted(case.inherited)[:20]
        return case

    def settle(self, case: Case, clients: list[str] | None = None, timeout: float = CONVERGE_TIMEOUT,
               redundant_ok: bool = False) -> Settled:
        """Every check of issue 7, once the churn has stopped; fills ``case`` as it measures.

        ``redundant_ok``: events with no effect on the replay (a version sent twice) are counted,
        not refused: after an inotify overflow the kernel's stale events race the rescan.
        """
        clients = self.containers("client") if clients is None else clients
        try:
            converge_s, want = self.wait_equal(clients, timeout, ignore=case.inherited)
        except AssertionError as exc:
            case.events_lost = getattr(exc, "lost", None)
            # Where were they lost: before the log (watcher, interface) or after it (broker, clients)?
            want, _ = self.trees([])
            in_log = _differing(want, self.audit_log()["tree"]) - case.inherited
            watcher = ""
            if in_log:  # never sent: what did the watcher say last?
                watcher = f"\nthe master's last log lines:\n{_last_logs(self.master, 80)}"
            raise AssertionError(f"{exc}\nthe log replayed differs from the master at {len(in_log)} paths: "
                                 f"{sorted(in_log)[:10]}{watcher}") from None
        case.converge_s = converge_s
        case.events_lost = 0
        deadline = time.monotonic() + 120
        while True:  # the log may still be catching up from the journal after a MongoDB outage
            audit = self.audit_log()
            replay_diff = _differing(want, audit["tree"]) - case.inherited
            state_diff = set(audit["state_diff"]) - case.inherited
            clean = not (audit["gap_count"] or audit["repeated"] or audit["batch_problems"] or replay_diff)
            if clean and not state_diff or time.monotonic() > deadline:
                break
            time.sleep(1)
        case.events_lost = len(replay_diff)
        assert audit["gap_count"] == 0 and not audit["repeated"], (
            f"the log's seqs are not 1..{audit['last']} exactly once: missing {audit['gaps']}, "
            f"repeated {audit['repeated']}")
        assert not audit["batch_problems"], f"batches in the log: {audit['batch_problems']}"
        assert not replay_diff, f"the log replayed differs from the master: {describe_difference(want, audit['tree'])}"
        assert not state_diff, f"the state collection differs from the log replayed at {sorted(state_diff)[:10]}"
        # Only this case's own events: one an earlier case logged twice is that case's failure, not this one's.
        redundant = [seq for seq in audit["redundant_seqs"] if seq > case.log_start]
        assert redundant_ok or not redundant, (
            f"events logged twice (no effect on replay), seqs {redundant[:20]}: "
            f"{[e for e in audit['redundant'] if e.get('seq', 0) > case.log_start][:5]}")
        leftovers = {c: files for c, files in self.temp_files().items() if files}
        assert not leftovers, f"temp files left: {leftovers}"
        if self.restarts:  # reported in the results, its logs printed above: not a loss
            case.details["restarted under a tree read"] = [why.partition(":")[0] for why in self.restarts]
        return Settled(converge_s, audit["count"], len(redundant), len(want))


def _stable_tree(container: str, root: str) -> dict[str, str]:
    """tree(), read again when a file vanished under the walk (a client still applying events)."""
    for _ in range(20):
        try:
            return tree(container, root)
        except AssertionError as exc:
            if "FileNotFoundError" not in str(exc):
                raise
            time.sleep(0.2)
    return tree(container, root)


def _why_killed(container: str) -> str:
    """An exec killed (SIGKILL, 137): the container's state and its last log lines say whether its
    main process exited under it (Docker kills every exec then) or the kernel's OOM killer struck."""
    state = inspect(container)
    return (f"{container}: state {state['State']}, restarted {state['RestartCount']} times; its last log lines:\n"
            f"{_last_logs(container, 60)}")


def _last_logs(container: str, lines: int) -> str:
    logs = run("docker", "logs", "--tail", str(lines), container, check=False)
    return (logs.stdout + logs.stderr)[-100 * lines:]


def _differing(want: dict[str, str], got: dict[str, str]) -> set[str]:
    return {p for p in want.keys() | got.keys() if want.get(p) != got.get(p)}


@contextlib.contextmanager
def recorded(case: Case) -> Iterator[Case]:
    """Run a case and record its row, passed or failed, in the results and the README."""
    note = (f" ({len(case.inherited)} paths already wrong when it began, left by an earlier case, are not "
            "counted here)") if case.inherited else ""
    try:
        try:
            yield case
        finally:
            while _STARTED:
                _STARTED.pop().kill()
    except BaseException as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        report.record(case.key, group=case.group, title=case.title, order=case.order,
                      happened=f"{case.happened} — {reason}".strip(" —") + note, events_lost=case.events_lost,
                      converge_s=case.converge_s, passed=False,
                      error=traceback.format_exception_only(exc)[-1].strip()[:2000], **case.details)
        raise
    report.record(case.key, group=case.group, title=case.title, order=case.order, happened=case.happened + note,
                  events_lost=case.events_lost, converge_s=case.converge_s, passed=True, **case.details)


def log_count(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text))
