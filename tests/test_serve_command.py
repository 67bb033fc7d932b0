"""`peftkit serve`'s process-wide settings (serve/command.py): they apply unless the environment says otherwise."""

from __future__ import annotations

import gc
import os

from peftkit.serve.command import freeze_startup_objects, tune_blas


def test_tune_blas_sets_mkl_cbwr_unless_the_environment_does(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    tune_blas()
    assert os.environ["MKL_CBWR"] == "AUTO"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # a user's own choice wins
    tune_blas()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"


def test_startup_objects_leave_the_collectors_sight_and_later_ones_stay_in_it():
    """What is alive when the server starts is frozen (a full collection no longer walks it); what comes after is
    still collected, cycles included."""
    class Node:
        pass

    startup = [Node() for _ in range(1000)]
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(startup)
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in tracked for o in startup)
        later = Node()
        later.self = later  # a cycle: only the collector frees it
        assert id(later) in {id(o) for o in gc.get_objects()}
        del later
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
