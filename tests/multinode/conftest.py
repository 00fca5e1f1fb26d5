"""Tests that run a Ray of their own in another process, since a process holds one Ray and
the session's ``conveyor`` fixture may hold this one's: the simulated multi-node cluster
(``ray.cluster_utils.Cluster``, ``tests/multinode/scenario.py``; marked ``multinode``) and
the notebooks (each kernel starts a local Ray; marked ``notebook``). They run after every
other test of the session, so the e2e tests are not slowed by them;
``pytest -m "not multinode and not notebook"`` leaves them out, ``pytest tests/multinode``
runs only them."""

from __future__ import annotations

from typing import Any

import pytest


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "multinode: runs a simulated multi-node Ray cluster "
                                       "in a subprocess (runs last)")
    config.addinivalue_line("markers", "notebook: executes a notebook whose kernel starts its "
                                       "own Ray (runs last)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None
               or item.get_closest_marker("notebook") is not None)
