"""The IsoFLOP fits (gptjax/isoflop.py) against losses made from a known L(N, D): the reference is the formula,
whose optimum under C = 6 N D has a closed form (gptjax.scaling.fitted_optimum, itself checked by hand in
test_scaling.py), not the fitting code."""

import math

import numpy as np
import pytest

from gptjax import isoflop
from gptjax.scaling import CHINCHILLA_FIT, fitted_optimum, predicted_loss

BUDGETS = (1e18, 1e19, 1e20, 1e21)


def synthetic_runs(fit: dict, budgets=BUDGETS, offsets=(-0.6, -0.3, 0.0, 0.3, 0.6), noise: float = 0.0,
                   rng=None) -> list[dict]:
    """Runs at sizes placed at `offsets` (in natural log N) about each budget's true optimum, D = C / (6 N), with
    losses from `fit` (times 1 + noise x a standard normal)."""
    runs = []
    for flops in budgets:
        n_opt, _ = fitted_optimum(flops, fit)
        for offset in offsets:
            n = n_opt * math.exp(offset)
            d = flops / (6 * n)
            loss = predicted_loss(n, d, fit)
            if noise:
                loss *= 1 + noise * rng.standard_normal()
            runs.append({"flops": flops, "params": n, "tokens": d, "loss": loss})
    return runs


def test_parabola_recovers_a_symmetric_profile_exactly():
    # With alpha = beta the profile along C = 6ND is a cosh in log N: symmetric sizes give its minimum exactly,
    # and N_opt ~ C^(beta / (alpha + beta)) = C^0.5.
    fit = {"E": 1.7, "A": 400.0, "B": 400.0, "alpha": 0.3, "beta": 0.3}
    result = isoflop.approach2(synthetic_runs(fit), bootstrap=0)
    for optimum in result["optima"]:
        n_opt, d_opt = fitted_optimum(optimum["flops"], fit)
        assert optimum["n_opt"] == pytest.approx(n_opt, rel=1e-6)
        assert optimum["d_opt"] == pytest.approx(d_opt, rel=1e-6)
        assert optimum["n_inside"] and optimum["d_inside"]
    assert result["a"] == pytest.approx(0.5, abs=1e-6) and result["b"] == pytest.approx(0.5, abs=1e-6)
    assert result["n_opt_at_target"] == pytest.approx(fitted_optimum(1e17, fit)[0], rel=1e-5)


def test_parabola_on_the_papers_fit_recovers_its_exponents():
    # alpha != beta: the profile leans, and the vertex moves by less than the spacing of the sizes; the exponents
    # are those of the closed form, beta / (alpha + beta) = 0.4516 and alpha / (alpha + beta) = 0.5484.
    result = isoflop.approach2(synthetic_runs(CHINCHILLA_FIT), bootstrap=0)
    alpha, beta = CHINCHILLA_FIT["alpha"], CHINCHILLA_FIT["beta"]
    assert result["a"] == pytest.approx(beta / (alpha + beta), abs=2e-3)
    assert result["b"] == pytest.approx(alpha / (alpha + beta), abs=2e-3)
    for optimum in result["optima"]:
        assert optimum["n_opt"] == pytest.approx(fitted_optimum(optimum["flops"], CHINCHILLA_FIT)[0], rel=0.05)


def test_bootstrap_intervals_cover_the_true_exponent_about_as_often_as_they_say():
    # 80% intervals from noisy losses (0.5% noise, like the seed-to-seed spread of small runs): over 40 noise draws
    # the true a lies inside in about 80% of them; at least 60% is required (binomial: P(< 24 of 40) ~ 0.1%).
    truth = CHINCHILLA_FIT["beta"] / (CHINCHILLA_FIT["alpha"] + CHINCHILLA_FIT["beta"])
    rng = np.random.default_rng(0)
    covered = 0
    for draw in range(40):
        runs = synthetic_runs(CHINCHILLA_FIT, offsets=(-1.0, -0.5, 0.0, 0.5, 1.0, 1.5), noise=0.005, rng=rng)
        result = isoflop.approach2(runs, bootstrap=200, seed=draw)
        low, high = result["a_interval"]
        assert low <= result["a"] <= high
        covered += low <= truth <= high
    assert covered >= 24


def test_a_profile_without_a_minimum_inside_is_reported_or_refused():
    above = synthetic_runs(CHINCHILLA_FIT, offsets=(0.5, 1.0, 1.5, 2.0))  # all larger than the optimum
    with pytest.raises(ValueError, match="0 of 4 budgets have a profile with its minimum inside the sizes tried"):
        isoflop.approach2(above, bootstrap=0)
    vertex = isoflop.profile_optimum(above[:4], "params")  # its vertex lies below the smallest size: not inside
    assert not vertex["n_inside"] and vertex["n_opt"] < min(r["params"] for r in above[:4])
    falling = [{**r, "loss": -r["loss"]} for r in synthetic_runs(CHINCHILLA_FIT)]  # profiles that open downwards
    with pytest.raises(ValueError, match="0 of 4 budgets"):
        isoflop.approach2(falling, bootstrap=0)
    # A budget without a minimum inside is left out, named, and the others still give the exponents.
    runs = synthetic_runs(CHINCHILLA_FIT)
    runs = [r for r in runs if r["flops"] != BUDGETS[0]] + above[:4]
    result = isoflop.approach2(runs, bootstrap=0)
    assert result["excluded"] == [BUDGETS[0]] and len(result["optima"]) == 3
    assert result["excluded_optima"][0]["n_opt"] == pytest.approx(vertex["n_opt"])
    assert result["a"] == pytest.approx(CHINCHILLA_FIT["beta"] / (CHINCHILLA_FIT["alpha"] + CHINCHILLA_FIT["beta"]),
                                        abs=2e-3)


def test_approach3_recovers_a_known_fit_from_exact_losses():
    runs = synthetic_runs(CHINCHILLA_FIT, offsets=(-1.0, -0.5, 0.0, 0.5, 1.0, 1.5))
    fit = isoflop.approach3(runs)
    for key, value in CHINCHILLA_FIT.items():
        assert fit[key] == pytest.approx(value, rel=1e-3), key
    n, d = isoflop.approach3_optimum(fit, 1e17)
    assert n == pytest.approx(fitted_optimum(1e17)[0], rel=1e-2)


def test_every_block_of_the_isoflop_page_runs_in_order():
    """docs/isoflop.md's code is what the fitting code does: its blocks run in order in one namespace."""
    from tests.conftest import REPO_ROOT
    from tests.test_tour import python_blocks

    with open(f"{REPO_ROOT}/docs/isoflop.md") as f:
        blocks = python_blocks(f.read())
    assert len(blocks) == 2
    namespace = {"__name__": "isoflop_page"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/isoflop.md block {number}", "exec"), namespace)
