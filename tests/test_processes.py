"""`is_main_process`: the launcher's rank before Accelerate is set up, Accelerate's answer after."""

from __future__ import annotations

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from perturbedvae.processes import is_main_process


@pytest.fixture(autouse=True)
def no_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_before_accelerate_the_launchers_rank_decides(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()


def test_after_accelerate_its_state_decides(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    Accelerator(cpu=True)
    monkeypatch.setenv("RANK", "1")  # read no more: the one process Accelerate set up is the main one
    assert is_main_process()
