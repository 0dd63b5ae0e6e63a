"""The over-optimisation lab's pure pieces: Gao-form fits recover known curves, curves from windows,
and the command refuses bad input before writing anything. (The lab end to end runs in
tests/test_notebooks.py, notebook 04, tiny budget.)"""
from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_jax.cli import main
from rlhf_jax.overopt import BUDGETS, fit_gao, windowed


def test_bon_fit_recovers_coefficients_and_peak():
    d = np.linspace(0.0, 3.0, 12)
    r = d * (0.8 - 0.25 * d)
    f = fit_gao(d, r, "bon")
    assert f["alpha"] == pytest.approx(0.8, abs=1e-9) and f["beta"] == pytest.approx(0.25, abs=1e-9)
    assert f["r2"] == pytest.approx(1.0) and f["peak_d"] == pytest.approx(0.8 / 0.5)
    assert f["peak_reward"] == pytest.approx(0.8 ** 2 / 1.0)


def test_rl_fit_recovers_coefficients_and_peak():
    d = np.linspace(0.1, 4.0, 15)
    r = d * (0.5 - 0.3 * np.log(d))
    f = fit_gao(d, r, "rl")
    assert f["alpha"] == pytest.approx(0.5, abs=1e-9) and f["beta"] == pytest.approx(0.3, abs=1e-9)
    # d* solves α − β log d − β = 0
    assert f["peak_d"] == pytest.approx(math.exp(0.5 / 0.3 - 1))
    assert f["r2"] == pytest.approx(1.0)


def test_fit_without_an_interior_peak_and_bad_input():
    d = np.linspace(0, 2, 6)
    f = fit_gao(d, 0.3 * d + 0.05 * d * d, "bon")       # convex: β < 0, no peak
    assert f["beta"] < 0 and f["peak_d"] is None
    with pytest.raises(ValueError, match="form must be"):
        fit_gao(d, d, "linear")
    with pytest.raises(ValueError, match="at least 2 points"):
        fit_gao([0.0, 1.0], [0.0, 1.0], "bon")


def test_windowed_means():
    hist = {"kl": np.array([[0.0, 2.0, 4.0, 4.0]]), "gold": np.array([[0.1, 0.3, 0.5, 0.7]]),
            "score_raw": np.array([[1.0, 1.0, 3.0, 5.0]])}
    rows = windowed(hist, 0, 2)
    assert [r["iteration"] for r in rows] == [2, 4]
    assert rows[0]["kl"] == pytest.approx(1.0) and rows[1]["sqrt_kl"] == pytest.approx(2.0)
    assert rows[1]["gold"] == pytest.approx(0.6) and rows[1]["proxy"] == pytest.approx(4.0)


def test_budgets_fit_their_promises():
    for name, b in BUDGETS.items():
        assert b.bon_n & (b.bon_n - 1) == 0, name       # powers of two up to n
        assert len(b.label_counts) >= 2 and len(b.betas) >= 2 and b.ensemble_size >= 2, name
        assert b.rl_iterations >= 2 * b.window, name


def test_command_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("keep")
    assert main(["overopt", "--out", str(full), "--budget", "tiny"]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in full.iterdir()) == ["x.txt"]
    assert main(["overopt", "--out", str(tmp_path / "new"), "--task", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["overopt", "--out", str(tmp_path / "new"), "--seed", "-1"]) == 2
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):
        main(["overopt", "--out", str(tmp_path / "new"), "--budget", "huge"])
