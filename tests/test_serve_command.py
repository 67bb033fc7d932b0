"""`peftkit serve`'s process-wide settings (serve/command.py): they apply unless the environment says otherwise."""

from __future__ import annotations

import os

from peftkit.serve.command import tune_blas


def test_tune_blas_sets_mkl_cbwr_unless_the_environment_does(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    tune_blas()
    assert os.environ["MKL_CBWR"] == "AUTO"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # a user's own choice wins
    tune_blas()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
