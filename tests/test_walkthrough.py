"""examples/walkthrough.py runs end to end: data, split, training, a prediction, evaluation, figure, saved model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import perturbedvae as pv
from perturbedvae.evaluate.baselines import BASELINES

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]


def _walkthrough():
    spec = importlib.util.spec_from_file_location("walkthrough", REPO / "examples" / "walkthrough.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_walkthrough_runs_end_to_end(tmp_path: Path, norman_data, capsys) -> None:
    tidy = _walkthrough().main(["--epochs", "3", "--out", str(tmp_path)])
    assert set(tidy["model"]) == {"PerturbedVAE", *BASELINES}
    assert set(tidy["condition"]) == {"KLF1+TGFBR2", "MAP2K3+MAP2K6"}
    assert np.isfinite(tidy["value"].dropna()).all() and not tidy[tidy.model == "PerturbedVAE"]["value"].isna().all()
    assert (tmp_path / "de_responses.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| combo_seen2 | PerturbedVAE |" in printed and "top-5 DE genes" in printed
    model = pv.PerturbedVAE.load(tmp_path / "model", norman_data)
    assert model.predict(["KLF1+TGFBR2"]).means.shape == (1, len(norman_data.genes))
