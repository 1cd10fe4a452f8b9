"""The ``luo.liveupdate.waves`` filter: a schedule as waves of hosts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

FILTER = (
    Path(__file__).resolve().parents[2]
    / "deploy/ansible/ansible_collections/luo/liveupdate/plugins/filter/waves.py"
)


def waves(hosts: list[str], schedule: list[Any]) -> list[list[str]]:
    pytest.importorskip("ansible", reason="ansible-core is not installed")
    spec = importlib.util.spec_from_file_location("luo_waves", FILTER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result: list[list[str]] = module.FilterModule().filters()["waves"](hosts, schedule)
    return result


HOSTS = [f"h{i:02}" for i in range(40)]


@pytest.mark.parametrize(
    ("count", "schedule", "sizes"),
    [
        pytest.param(40, [1, "10%", "50%", "100%"], [1, 4, 20, 15], id="default-40"),
        pytest.param(4, [1, "10%", "50%", "100%"], [1, 1, 2], id="default-4"),
        pytest.param(1, [1, "10%", "50%", "100%"], [1], id="one-host"),
        pytest.param(7, [2], [2, 2, 2, 1], id="last-entry-repeats"),
        pytest.param(5, ["3"], [3, 2], id="count-as-string"),
    ],
)
def test_waves_follow_the_schedule(
    count: int, schedule: list[Any], sizes: list[int]
) -> None:
    got = waves(HOSTS[:count], schedule)
    assert [len(w) for w in got] == sizes
    assert [h for w in got for h in w] == HOSTS[:count]  # each once, in order


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(0, id="zero"),
        pytest.param("0%", id="zero-percent"),
        pytest.param("150%", id="over-100-percent"),
        pytest.param("many", id="word"),
        pytest.param(True, id="bool"),
    ],
)
def test_bad_schedule_entries_are_refused(entry: Any) -> None:
    from ansible.errors import AnsibleFilterError

    with pytest.raises(AnsibleFilterError, match="waves: "):
        waves(HOSTS[:4], [entry])
