"""One compose deployment (three clients) shared by every container test of the fault suite.

The image fixtures, the failure-report hook and the logs-on-failure fixture are the docker
e2e suite's own (tests/docker/conftest.py), imported rather than copied.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.docker.conftest import (  # noqa: F401  (fixtures and a hook, registered by import)
    docker_available,
    images,
    logs_on_failure,
    pytest_runtest_makereport,
)
from tests.docker.helpers import deployment_env
from tests.faults.harness import Deployment

CLIENTS = 3


@pytest.fixture(scope="package")
def system(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """compose.yaml up with three clients for the whole package; down with its volumes afterwards
    (unless DLOPBOX_FAULTS_KEEP=1: then it stays up, to look at after a failure)."""
    project = f"dlopboxfaults{secrets.token_hex(4)}"
    deployment = Deployment(project, deployment_env(images), tmp_path_factory.mktemp("faults") / "env")
    try:
        deployment.up(clients=CLIENTS)
        deployment.wait_healthy()
        yield deployment
    finally:
        if os.environ.get("DLOPBOX_FAULTS_KEEP") != "1":
            deployment("down", "--volumes", "--timeout", "10", check=False)
