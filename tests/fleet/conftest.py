"""The fleet and a Prometheus scraping every host, for the whole module."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

import pytest

from tests.metrics._servers import free_port, need, running

from ._fleet import Fleet, running_fleet, running_prometheus
from ._host import METRICS_PORT

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.metrics._servers import Server

HOSTS = 4


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("the fleet needs root: network, mount and PID namespaces")
    for tool, package in (("sshd", "openssh-server"), ("ssh", "openssh-client")):
        if shutil.which(tool, path="/usr/sbin:/usr/bin") is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y {package})")
    try:
        import ansible  # noqa: F401
    except ImportError:
        pytest.skip("ansible-core is not installed (pip install -e '.[fleet]')")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _skip_unless_possible()
    with running_fleet(tmp_path_factory.mktemp("fleet"), HOSTS) as f:
        yield f


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Receives each host's rollout result from the role."""
    binary = need("prometheus-pushgateway")
    root = tmp_path_factory.mktemp("pushgateway")
    port = free_port()
    # Its own persistence file: Debian's default, /var/lib/prometheus/
    # pushgateway.data, would bring back whatever any earlier run pushed.
    argv = [
        binary,
        f"--web.listen-address=127.0.0.1:{port}",
        f"--persistence.file={root / 'data'}",
    ]
    with running(
        "pushgateway", argv, f"http://127.0.0.1:{port}", "/-/ready", root / "log"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(
    fleet: Fleet, pushgateway: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Scrapes every host's metrics endpoint, and the Pushgateway."""
    binary = need("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(
        binary,
        root,
        [f"{h.address}:{METRICS_PORT}" for h in fleet.hosts],
        gateway=pushgateway.url.removeprefix("http://"),
    ) as server:
        yield server


@pytest.fixture
def healthy(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet with every link up and no fault injected, before and after."""
    for host in fleet.hosts:
        host.set_link(True)
        host.kernel.inject_fault("freeze", None)
    yield fleet
    for host in fleet.hosts:
        host.set_link(True)
        host.kernel.inject_fault("freeze", None)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
