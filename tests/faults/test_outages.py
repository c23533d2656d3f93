"""Faults under continuous churn, on one compose deployment with three clients (issue 7).

Each case churns the master's tree (creates, edits, appends, deletes, renames, chmods,
directory creations, renames and removals) while one component fails, then checks with
:meth:`Deployment.settle` that every client equals the master, that the MongoDB log holds
every event once with gap-free seqs and replays to the master's tree, and that no temp
file is left. Each case records its row of the README's results table, passed or failed.
The cases run in file order on the same deployment; each one is bounded in time.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.docker.helpers import run
from tests.faults.harness import Case, Churn, Deployment, log_count, recorded

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.timeout(600)]

REJECTED_503 = 'dlopbox_rejected_requests_total{status="503"}'
BIG = 200 * 1024 * 1024
#: Convergence times measured earlier in this module, for the cases that compare with them.
MEASURED: dict[str, float] = {}


def since() -> str:
    """A `docker logs --since` timestamp for now."""
    return str(int(time.time()) - 1)


def churn_around(system: Deployment, case: Case, seed: int, before: float = 2.0) -> Churn:
    churn = system.churn(case.key, seed)
    time.sleep(before)
    return churn


def test_baseline_churn_without_a_fault(system: Deployment) -> None:
    case = system.begin(Case("baseline", "No fault (baseline): 10 s of churn", order=0))
    with recorded(case):
        churn = system.churn(case.key, seed=0)
        time.sleep(10)
        ops = churn.stop()["ops"]
        settled = system.settle(case)
        MEASURED["baseline"] = settled.converge_s
        case.happened = (f"{ops} changes; every client equal to the master, {settled.events} events logged "
                         "once each, gap-free")


def test_rabbitmq_restarted(system: Deployment) -> None:
    case = system.begin(Case("rabbitmq-restart", "RabbitMQ restarted (`docker restart`)", order=1))
    with recorded(case):
        rejected = system.metric(REJECTED_503)
        churn = churn_around(system, case, seed=1)
        started = time.monotonic()
        run("docker", "restart", "-t", "10", system.service("rabbit"))
        outage = time.monotonic() - started + system.wait_healthy()
        time.sleep(1)
        ops = churn.stop()["ops"]
        system.settle(case)
        refused = int(system.metric(REJECTED_503) - rejected)
        case.happened = (f"{ops} changes; RabbitMQ away {outage:.0f} s: the interface answered {refused} POSTs "
                         "with 503 and the watcher retried them; clients reconnected")


def test_rabbitmq_killed(system: Deployment) -> None:
    case = system.begin(Case("rabbitmq-sigkill", "RabbitMQ killed (SIGKILL), then started", order=2))
    with recorded(case):
        rejected = system.metric(REJECTED_503)
        churn = churn_around(system, case, seed=2)
        started = time.monotonic()
        rabbit = system.service("rabbit")
        run("docker", "kill", "-s", "KILL", rabbit)
        time.sleep(2)
        run("docker", "start", rabbit)
        outage = time.monotonic() - started + system.wait_healthy()
        time.sleep(1)
        ops = churn.stop()["ops"]
        system.settle(case)
        refused = int(system.metric(REJECTED_503) - rejected)
        case.happened = (f"{ops} changes; RabbitMQ away {outage:.0f} s: {refused} POSTs answered 503 and retried; "
                         "quorum queues recovered, clients reconnected")


def test_mongodb_stopped_for_30_s(system: Deployment) -> None:
    case = system.begin(Case("mongodb-30s", "MongoDB stopped for 30 s", order=3))
    with recorded(case):
        churn = churn_around(system, case, seed=3)
        mongo = system.service("mongo")
        run("docker", "stop", "-t", "10", mongo)
        stopped = time.monotonic()
        head_before = system.health()["head"]
        degraded = False
        while time.monotonic() - stopped < 30:
            degraded = degraded or bool(system.health().get("log_degraded"))
            time.sleep(1)
        head_during = system.health()["head"]
        run("docker", "start", mongo)
        system.wait_healthy()
        time.sleep(1)
        ops = churn.stop()["ops"]
        system.settle(case)
        assert head_during > head_before, "nothing was acknowledged while MongoDB was down"
        case.happened = (f"{ops} changes; {head_during - head_before} events acknowledged and synced while "
                         f"MongoDB was down (interface log-degraded: {'yes' if degraded else 'no'}); the log "
                         "caught up from the RabbitMQ journal")


def test_interface_killed(system: Deployment) -> None:
    case = system.begin(Case("interface-sigkill", "Interface killed (SIGKILL), then started", order=4))
    with recorded(case):
        churn = churn_around(system, case, seed=4)
        head = system.health()["head"]
        interface = system.interface
        run("docker", "kill", "-s", "KILL", interface)
        time.sleep(2)
        run("docker", "start", interface)
        down = 2 + system.wait_healthy()
        time.sleep(1)
        ops = churn.stop()["ops"]
        system.settle(case)
        case.happened = (f"{ops} changes; interface down {down:.0f} s from seq {head}: the watcher buffered and "
                         "retried, the restarted interface resumed numbering after the last logged seq")


def test_watcher_restarted_with_changes_made_while_it_was_down(system: Deployment) -> None:
    case = system.begin(Case("watcher-restart", "Watcher (master) stopped, changes made, started again", order=5))
    with recorded(case):
        master = system.master
        # From a throwaway container on the shared volume: the churn goes on while the master is down.
        churn = system.churn_on_volume(case.key, seed=5)
        time.sleep(2)
        run("docker", "stop", "-t", "10", master)
        time.sleep(8)
        mark = since()
        run("docker", "start", master)
        system.wait_running(master)
        time.sleep(2)
        ops = churn.stop()["ops"]
        system.settle(case)
        reconciled = [line for line in system.logs_since(master, mark).splitlines() if "reconciled" in line]
        assert reconciled, "the restarted watcher did not reconcile with the interface"
        case.happened = (f"{ops} changes, 8 s of them while the watcher was stopped; on start it "
                         f"reconciled {reconciled[0].split('reconciled ', 1)[1].strip()}")


KILL_MID_DOWNLOAD = r"""
import os, signal, sys, time
directory, threshold = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        names = []
    for name in names:
        if name.startswith(".dlopbox-tmp-"):
            try:
                size = os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
            if size >= threshold:
                for pid in os.listdir("/proc"):
                    try:
                        argv = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
                    except OSError:
                        continue
                    if pid.isdigit() and int(pid) > 1 and argv[-2:] == [b"client", b""]:
                        print(size, flush=True)
                        os.kill(int(pid), signal.SIGKILL)
                        sys.exit(0)
    if "big.bin" in names:
        sys.exit("the download finished before it could be interrupted")
    time.sleep(0.005)
sys.exit("no download in progress")
"""


def test_client_killed_mid_way_through_a_200_mib_download(system: Deployment) -> None:
    case = system.begin(Case("client-kill-200mib", "A client killed (SIGKILL) mid-way through a 200 MiB download",
                             order=6))
    with recorded(case):
        victim = system.clients[-1]
        churn = churn_around(system, case, seed=6, before=2)
        run("docker", "exec", system.master, "mkdir", "-p", "/shared/big")
        killer = subprocess.Popen(
            ["docker", "exec", victim, "python3", "-c", KILL_MID_DOWNLOAD, "/sync/big", str(BIG // 4)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1)
        run("docker", "exec", system.master, "sh", "-c",
            f"head -c {BIG} /dev/urandom > /shared/big/.write && mv /shared/big/.write /shared/big/big.bin")
        out, err = killer.communicate(timeout=240)
        assert out.strip(), f"the client was not killed mid-download: {err.decode(errors='replace')[-500:]}"
        killed_at = int(out.split()[0])
        system.wait_running(victim)  # restart: unless-stopped brings it back
        time.sleep(2)
        ops = churn.stop()["ops"]
        settled = system.settle(case)
        case.happened = (f"{ops} changes; killed with {killed_at / 2**20:.0f} of 200 MiB written; restarted by "
                         "Docker, it removed the partial temp file and fetched the file again")
        case.details["entries"] = settled.entries
        run("docker", "exec", system.master, "rm", "-r", "/shared/big")
        system.wait_equal(system.clients, ignore=case.inherited)


def test_client_offline_while_1000_changes_happen(system: Deployment) -> None:
    case = system.begin(Case("client-offline-1000", "A client stopped while 1,000 changes happen", order=7))
    with recorded(case):
        *others, victim = system.clients
        run("docker", "stop", "-t", "10", victim)
        stats = system.churn(case.key, seed=7, max_ops=1000, interval=0).wait()
        assert stats["ops"] == 1000
        others_s, _ = system.wait_equal(others, ignore=case.inherited)
        run("docker", "start", victim)
        settled = system.settle(case)
        case.happened = (f"1,000 changes while it was stopped (the others were equal {others_s:.1f} s after the "
                         f"last); started again, it caught up from its queue in {settled.converge_s:.1f} s")


def test_client_cut_from_the_network_for_20_s(system: Deployment) -> None:
    case = system.begin(Case("client-network-20s",
                             "A client cut from the network for 20 s (`docker network disconnect`)", order=8))
    with recorded(case):
        victim = system.clients[-1]
        churn = churn_around(system, case, seed=8)
        run("docker", "network", "disconnect", system.network, victim)
        try:
            time.sleep(20)
        finally:
            run("docker", "network", "connect", system.network, victim)
        time.sleep(2)
        ops = churn.stop()["ops"]
        # It replays its whole backlog after reconnecting (measured 68-124 s here on 2 busy cores):
        # more room than the other cases, still a bound on never catching up.
        settled = system.settle(case, timeout=240)
        case.happened = (f"{ops} changes, 20 s of them while it was disconnected; reconnected, it was equal to the "
                         f"master {settled.converge_s:.1f} s after the churn stopped")


def test_the_slowest_client_does_not_slow_the_others(system: Deployment) -> None:
    case = system.begin(Case("slow-client", "The slowest client (frozen with `docker pause`) vs the others", order=9))
    with recorded(case):
        *others, victim = system.clients
        run("docker", "pause", victim)
        try:
            churn = system.churn(case.key, seed=9)
            time.sleep(8)
            ops = churn.stop()["ops"]
            others_s, _ = system.wait_equal(others, ignore=case.inherited)
        finally:
            run("docker", "unpause", victim)
        settled = system.settle(case)
        baseline = MEASURED.get("baseline")
        case.happened = (f"{ops} changes while one client was frozen: the other {len(others)} were equal to the "
                         f"master {others_s:.1f} s after the churn stopped (no fault: "
                         f"{'n/a' if baseline is None else f'{baseline:.1f} s'}); unfrozen, the slow one caught "
                         f"up in {settled.converge_s:.1f} s")
        case.converge_s = others_s
        # The bound catches the others waiting for the frozen one (they would wait until it is unfrozen);
        # the table shows the measured times against the no-fault baseline.
        limit = (baseline or 0.0) + 10.0
        assert others_s <= limit, f"the others took {others_s:.1f} s (baseline {baseline} s): held back by the frozen one"


MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
SMALL_QUEUE = 128
BURST = r"""
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
for d in range(count // 500):
    os.makedirs(os.path.join(root, "d%02d" % d), exist_ok=True)
for i in range(count):
    with open(os.path.join(root, "d%02d" % (i // 500), "f%05d" % i), "wb") as f:
        f.write(b"%d\n" % i)
os.rename(os.path.join(root, "d00"), os.path.join(root, "renamed"))
for i in range(0, count, 7):
    if i >= 500:
        os.unlink(os.path.join(root, "d%02d" % (i // 500), "f%05d" % i))
"""


def test_inotify_queue_overflow_on_the_master(system: Deployment) -> None:
    case = system.begin(Case("inotify-overflow", "inotify queue overflow on the master (a 3,000-file burst)", order=10))
    with recorded(case):
        master = system.master
        original = MAX_QUEUED_EVENTS.read_text().strip()
        mark = since()
        small = False
        try:
            # A host-wide sysctl, read by inotify_init: lower it only while the watcher restarts.
            MAX_QUEUED_EVENTS.write_text(str(SMALL_QUEUE))
            small = True
        except OSError:
            pass  # not writable here: the burst alone must overflow the default queue
        try:
            if small:
                run("docker", "restart", "-t", "10", master)
                deadline = time.monotonic() + 60
                while "watching" not in system.logs_since(master, mark):
                    assert time.monotonic() < deadline, "the restarted watcher did not start watching"
                    time.sleep(0.3)
        finally:
            MAX_QUEUED_EVENTS.write_text(original)
        count = 3000 if small else 40000
        churn = system.churn(case.key, seed=10)
        run("docker", "exec", master, "python3", "-c", BURST, f"/shared/churn/{case.key}-burst", str(count))
        time.sleep(2)
        ops = churn.stop()["ops"]
        settled = system.settle(case, redundant_ok=True)
        logs = system.logs_since(master, mark)
        overflows = log_count(logs, "queue overflow")
        assert overflows, "the kernel's inotify queue never overflowed: the case tested nothing"
        queue = f"a {SMALL_QUEUE}-event queue" if small else "the default queue"
        resent = (f"; {settled.redundant} event(s) re-sent a version already sent (no effect: stale kernel "
                  "events raced the rescan)") if settled.redundant else ""
        case.happened = (f"{count} files created, renamed and deleted in a burst plus {ops} changes, with "
                         f"{queue}: the watcher saw the overflow, rescanned and sent the differences"
                         f"{resent}")


def test_a_file_the_master_keeps_private_reaches_every_client(system: Deployment) -> None:
    case = Case("private-file", "A file the master keeps private (mode 0600)", order=11)
    with recorded(case):
        run("docker", "exec", system.master, "sh", "-c",
            "umask 077 && mkdir -p /shared/private && echo secret > /shared/private/mode-0600.txt")
        started = time.monotonic()
        path = "private/mode-0600.txt"
        while True:
            master, clients = system.trees(system.clients)
            if all(t.get(path) == master[path] for t in clients.values()):
                break  # same bytes and mode on every client
            case.events_lost = 1
            assert time.monotonic() - started < 30, "a 0600 file on the master never reached the clients"
            time.sleep(1)
        case.events_lost, case.converge_s = 0, time.monotonic() - started
        case.happened = "nginx served it (its workers run as root on the read-only volume): every client has its bytes and its mode"


TAMPER = r"""
import json, os, random, shutil, sys, threading, time
root, seed, max_seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(seed)
stop = threading.Event()

def wait_for_eof():
    while os.read(0, 4096):
        pass
    stop.set()

threading.Thread(target=wait_for_eof, daemon=True).start()
counts = {"delete": 0, "modify": 0, "add file": 0, "add dir": 0, "chmod": 0}
deadline = time.monotonic() + max_seconds
serial = 0
while time.monotonic() < deadline and not stop.is_set():
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".dlopbox")]
        files += [os.path.join(dirpath, n) for n in names if not n.startswith(".dlopbox")]
    op = rng.choice(list(counts))
    serial += 1
    try:
        if op in ("delete", "modify", "chmod") and files:
            path = rng.choice(files)
            if op == "delete":
                os.unlink(path)
            elif op == "modify":
                with open(path, "ab") as f:
                    f.write(b"tampered on the slave")
            else:
                os.chmod(path, 0o600)
        elif op == "add file":
            with open(os.path.join(root, "tamper-%d.txt" % serial), "wb") as f:
                f.write(os.urandom(100))
        elif op == "add dir":
            os.makedirs(os.path.join(root, "tamper-dir-%d" % serial, "inside"))
        else:
            continue
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        continue  # the client or the churn moved it meanwhile
    counts[op] += 1
    time.sleep(0.05)
print(json.dumps({"ops": sum(counts.values()), "counts": counts}))
"""


def test_slave_tampered_under_churn(system: Deployment) -> None:
    case = system.begin(Case("slave-tampered", "A slave's directory tampered with under churn (local changes undone)",
                             order=12))
    with recorded(case):
        victim = system.clients[-1]
        mark = since()
        churn = churn_around(system, case, seed=12)
        tamper = subprocess.Popen(["docker", "exec", "-i", victim, "python3", "-c", TAMPER,
                                   f"/sync/churn/{case.key}", "12", "60"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdin, tamper.stdin = tamper.stdin, None  # closing it is the stop signal; communicate() must not
        assert stdin is not None
        try:
            time.sleep(10)
        finally:
            stdin.close()
            try:
                out, err = tamper.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                tamper.kill()
                raise
        assert tamper.returncode == 0, f"the tampering failed: {err.decode(errors='replace')[-1000:]}"
        tampered = json.loads(out.decode().strip().splitlines()[-1])
        ops = churn.stop()["ops"]
        settled = system.settle(case)
        logs = system.logs_since(victim, mark)
        found, undone = log_count(logs, "local change: "), log_count(logs, "local change undone")
        assert tampered["ops"] == 0 or found, "the client never saw a local change"
        counts = ", ".join(f"{n} {op}" for op, n in tampered["counts"].items() if n)
        case.happened = (f"{ops} changes on the master while {tampered['ops']} local changes were made in one "
                         f"client's directory ({counts}): it logged {found} local changes and undid {undone} "
                         f"(the rest were overtaken by the master's own events); every client equal to the master, "
                         f"{settled.events} events logged once each")
