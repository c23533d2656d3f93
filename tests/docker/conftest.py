"""End-to-end tests on this machine's Docker engine: compose.yaml and docker-run.sh, for real.

The images are built (or found up to date) once per session by deploy/build-images.sh:
official ones when a registry answers, the local stand-ins otherwise. Every deployment gets
a unique project name, random secrets, a free interface port, and is removed with its
volumes afterwards.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator

import pytest

from tests.docker.helpers import REPO, Compose, DockerRun, clean_environ, deployment_env, run


@pytest.fixture(scope="session")
def docker_available() -> None:
    if shutil.which("docker") is None or run("docker", "info", check=False, timeout=30).returncode != 0:
        pytest.fail("the docker tests need a working Docker engine (deselect them with -m 'not docker')")


@pytest.fixture(scope="session")
def images(docker_available: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build every image (a second run only checks hashes) and return the image variables."""
    out = tmp_path_factory.mktemp("images") / "images.env"
    run(REPO / "deploy" / "build-images.sh", "--env-out", out, env=clean_environ(), timeout=1800)
    variables = {}
    for line in out.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            variables[key] = value
    return variables


@pytest.fixture(scope="module")
def compose_system(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    """compose.yaml up with two clients; down with its volumes afterwards."""
    project = f"dlopboxe2e{secrets.token_hex(4)}"
    system = Compose(project, deployment_env(images), tmp_path_factory.mktemp("compose") / "env")
    try:
        system.up(clients=2)
        yield system
    finally:
        system("down", "--volumes", "--timeout", "10", check=False)


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, show the last log lines of the deployment it used."""
    yield
    report = request.node.stash.get(_REPORTS, {}).get("call")
    if report is not None and report.failed:
        for value in request.node.funcargs.values():
            if isinstance(value, (Compose, DockerRun)):
                print(f"--- logs of {value.project}\n{value.logs()}")


@pytest.fixture(scope="module")
def docker_run_system(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRun]:
    """docker-run.sh up with two clients; down --volumes afterwards."""
    project = f"dlopboxe2e{secrets.token_hex(4)}"
    system = DockerRun(project, deployment_env(images), tmp_path_factory.mktemp("docker-run") / "env")
    try:
        system("up", "--clients", "2")
        yield system
    finally:
        system("down", "--volumes", check=False)
