"""Faults under load (``tests/chaos``): ``pytest -m chaos`` runs only them."""

from __future__ import annotations

from typing import Any


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "chaos: a fault injected under load, checked by the "
                                       "history checker (tests/chaos/history.py)")
