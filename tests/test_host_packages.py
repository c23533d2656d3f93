"""deploy/host-packages.sh against this machine's real dpkg database, changing nothing on it.

Each run gets a PATH of its own: the real dpkg-query, and fakes for `id` (root or not),
`sudo` and `apt-get` (which only record that they were called), so that no test can
install anything even when the script is wrong.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "host-packages.sh"
POLICY = Path("/usr/sbin/policy-rc.d")
INSTALLED = ("dpkg", "bash")  # every Debian system has them
ABSENT = "cowsay"  # a real Debian package, checked absent below
LOCK = "-o DPkg::Lock::Timeout=600"


def _dpkg_status(package: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else "unknown"


@pytest.fixture(scope="module", autouse=True)
def real_dpkg() -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg on this machine")
    assert [_dpkg_status(p) for p in INSTALLED] == ["installed", "installed"]
    assert _dpkg_status(ABSENT) != "installed", f"{ABSENT} is installed here: the tests need a package that is not"


class Host:
    """A PATH with the real dpkg-query and fake id, sudo and apt-get."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.calls = bin_dir / "calls"
        bin_dir.mkdir()
        (bin_dir / "dpkg-query").symlink_to(shutil.which("dpkg-query"))

    def fake(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def user(self, uid: int) -> None:
        self.fake("id", f"echo {uid}")

    def recording(self, *names: str) -> None:
        for name in names:
            self.fake(name, f'echo "{name} $*" >> {self.calls}')

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shutil.which("bash"), str(SCRIPT), *args], env={"PATH": str(self.bin)},
                              capture_output=True, text=True, timeout=30)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "bin")


def _ask(*packages: str) -> list[str]:
    return [arg for p in packages for arg in ("--package", p)]


def test_plan_as_root_installs_exactly_the_absent_package(host: Host) -> None:
    host.user(0)
    host.recording("apt-get", "sudo")
    proc = host.run("--dry-run", *_ask(*INSTALLED, ABSENT))
    assert proc.returncode == 0, proc.stderr
    install = f"env DEBIAN_FRONTEND=noninteractive apt-get {LOCK} install -y -qq --no-install-recommends {ABSENT}"
    if POLICY.exists():  # someone else's policy: left as it is
        want = [f"apt-get {LOCK} update -qq", install]
    else:
        want = [f"apt-get {LOCK} update -qq",
                f"sh -c 'printf \"#!/bin/sh\\nexit 101\\n\" > {POLICY} && chmod 755 {POLICY}'",
                install,
                f"rm -f {POLICY}"]
    assert proc.stdout.splitlines() == want
    assert not host.calls.exists(), "a dry run ran something"


def test_plan_without_root_goes_through_sudo(host: Host) -> None:
    host.user(1000)
    host.recording("apt-get", "sudo")
    proc = host.run("--dry-run", *_ask(ABSENT, *INSTALLED))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("sudo ") for line in lines)
    assert f"sudo env DEBIAN_FRONTEND=noninteractive apt-get {LOCK} install -y -qq --no-install-recommends {ABSENT}" in lines
    assert not host.calls.exists()


def test_without_root_or_sudo_it_says_what_to_run_and_runs_nothing(host: Host) -> None:
    host.user(1000)
    host.recording("apt-get")
    proc = host.run(*_ask(*INSTALLED, ABSENT))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (f"host-packages.sh: needs {ABSENT}: run as root: "
                           f"apt-get update && apt-get install -y --no-install-recommends {ABSENT}\n")
    assert not host.calls.exists()


def test_without_apt_it_names_the_packages_and_runs_nothing(host: Host) -> None:
    host.user(0)
    host.recording("sudo")
    proc = host.run(*_ask(ABSENT))
    assert proc.returncode == 1
    assert proc.stderr == (f"host-packages.sh: needs {ABSENT} and this machine has no apt-get: "
                           "install them with its package manager\n")
    assert not host.calls.exists()


def test_nothing_missing_needs_neither_root_nor_apt(host: Host) -> None:
    host.user(1000)
    proc = host.run(*_ask(*INSTALLED))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_the_tests_profile_is_installed_once_tests_run_has_run(host: Host) -> None:
    # tests/run installs it before pytest starts: its plan is empty from then on.
    host.user(1000)
    proc = host.run("--dry-run", "tests")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_a_package_is_asked_for_once_however_many_profiles_name_it(host: Host) -> None:
    host.user(0)
    host.recording("apt-get")
    proc = host.run("--dry-run", *_ask(ABSENT, ABSENT, *INSTALLED), "tests")
    assert proc.returncode == 0, proc.stderr
    install = [line for line in proc.stdout.splitlines() if " install " in line]
    assert install == [f"env DEBIAN_FRONTEND=noninteractive apt-get {LOCK} install -y -qq --no-install-recommends {ABSENT}"]


@pytest.mark.parametrize("args", [["nonsense"], [], ["--package", "Not a name"], ["--frobnicate", "tests"]])
def test_a_wrong_call_exits_2_and_runs_nothing(host: Host, args: list[str]) -> None:
    host.user(0)
    host.recording("apt-get", "sudo")
    proc = host.run(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("host-packages.sh: ") and proc.stderr.count("\n") == 1
    assert not host.calls.exists()


def test_each_entry_point_installs_through_it() -> None:
    repo = SCRIPT.parents[1]
    calls = {
        "tests/run": "deploy/host-packages.sh tests",
        "tests/bench/run": "deploy/host-packages.sh bench",
        "deploy/build-images.sh": '"$here/host-packages.sh" local-images',
    }
    for entry, call in calls.items():
        assert call in (repo / entry).read_text(), f"{entry} does not call {call}"
    assert os.access(SCRIPT, os.X_OK)
