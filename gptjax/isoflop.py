"""Compute-optimal model size from measured losses: the fits of Hoffmann et al. 2022 ("Chinchilla"), as NumPy.

`gptjax.sweep` trains models of several sizes for each of several FLOP budgets C and hands the runs here. A run is a
dict with its budget `flops` (C), its parameter count (N, under the key the caller names: all parameters or without
the embedding), `tokens` (D, what it trained on) and `loss` (its final held-out loss). Nothing here trains or reads
files, so the tests check the fits on losses made from a known L(N, D).

- Approach 2 (the paper's figure 3): for each budget, the runs form an IsoFLOP profile, loss against N at fixed C.
  A parabola in log N through it gives its minimum, N_opt(C) and the loss there (and a parabola in log D, over the
  same runs, D_opt(C)). Across budgets, straight lines in log-log give N_opt ~ C^a and D_opt ~ C^b. Intervals come
  from a bootstrap over runs: each budget's runs are resampled with replacement, everything is fitted again, and the
  10th and 90th percentiles are reported (the paper's 80% intervals).
- Approach 3: L(N, D) = E + A / N^alpha + B / D^beta fitted to all runs at once, minimising the Huber loss
  (delta 1e-3) of log L as the paper does, with L-BFGS from a grid of starting points. Its optimum under C = 6 N D is
  `gptjax.scaling.fitted_optimum`.

Why a parabola: near its minimum any smooth profile is one, and the paper's L(N, D) along C = 6 N D is
E + A e^(-alpha x) + B' e^(beta x) in x = log N: with alpha = beta it is a cosh, symmetric in x, so the vertex of a
parabola through points placed symmetrically about the minimum is exactly the minimum (tested); otherwise the vertex
moves slightly towards the flatter side, by less than the spacing of the sizes.
"""

import math

import numpy as np

from gptjax.scaling import fitted_optimum

PERCENTILES = (10, 90)  # the paper's 80% intervals
MAX_REACH = 2.0  # a vertex this many profile widths beyond the sizes tried is not a minimum the runs show


# ----------------------------------------------------------------------------------------------------------------
# One budget: the minimum of an IsoFLOP profile


def parabola_vertex(x: np.ndarray, loss: np.ndarray) -> dict | None:
    """The least-squares parabola loss = c2 x^2 + c1 x + c0 and its vertex; None if it opens downwards, if its vertex
    lies more than MAX_REACH profile widths beyond the x given (a nearly flat fit: no minimum these runs can show), or
    if fewer than three distinct x are given."""
    if len(np.unique(x)) < 3:
        return None
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if c2 <= 0:
        return None
    vertex = -c1 / (2 * c2)
    width = x.max() - x.min()
    if not x.min() - MAX_REACH * width <= vertex <= x.max() + MAX_REACH * width:
        return None
    return {"x": float(vertex), "loss": float(c0 - c1 ** 2 / (4 * c2)), "curvature": float(c2),
            "inside": bool(x.min() <= vertex <= x.max())}


def profile_optimum(runs: list[dict], count: str) -> dict | None:
    """N_opt, D_opt and the loss there for the runs of one budget (`count`: the key holding N); None if either
    parabola has no minimum."""
    log_n = np.log([r[count] for r in runs])
    log_d = np.log([r["tokens"] for r in runs])
    loss = np.array([r["loss"] for r in runs])
    by_n, by_d = parabola_vertex(log_n, loss), parabola_vertex(log_d, loss)
    if by_n is None or by_d is None:
        return None
    return {"flops": runs[0]["flops"], "n_opt": math.exp(by_n["x"]), "d_opt": math.exp(by_d["x"]),
            "loss_opt": by_n["loss"], "n_inside": by_n["inside"], "d_inside": by_d["inside"],
            "parabola_log_n": parabola_coefficients(log_n, loss), "runs": len(runs)}


def parabola_coefficients(x: np.ndarray, loss: np.ndarray) -> list[float]:
    return [float(c) for c in np.polyfit(x, loss, 2)]


def by_budget(runs: list[dict]) -> list[list[dict]]:
    """The runs grouped by budget, smallest budget first."""
    budgets = sorted({r["flops"] for r in runs})
    return [[r for r in runs if r["flops"] == c] for c in budgets]


# ----------------------------------------------------------------------------------------------------------------
# Across budgets: approach 2


def power_law(flops: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of the least-squares line log value = exponent log C + log coefficient."""
    exponent, log_coefficient = np.polyfit(np.log(flops), np.log(values), 1)
    return float(exponent), float(math.exp(log_coefficient))


def fit_optima(profiles: list[list[dict]], count: str) -> dict | None:
    """Per-budget optima and the power laws through them; None if a profile has no minimum or under two budgets."""
    optima = [profile_optimum(runs, count) for runs in profiles]
    if len(optima) < 2 or any(o is None for o in optima):
        return None
    return power_laws(optima)


def power_laws(optima: list[dict]) -> dict:
    """N_opt ~ C^a and D_opt ~ C^b through the optima of two or more budgets."""
    flops = np.array([o["flops"] for o in optima])
    a, n_coefficient = power_law(flops, np.array([o["n_opt"] for o in optima]))
    b, d_coefficient = power_law(flops, np.array([o["d_opt"] for o in optima]))
    return {"optima": optima, "a": a, "n_coefficient": n_coefficient, "b": b, "d_coefficient": d_coefficient}


def approach2(runs: list[dict], count: str = "params", target_flops: float = 1e17, bootstrap: int = 1000,
              seed: int = 0) -> dict:
    """Approach 2 of the paper on `runs`: each budget's optimum, N_opt ~ C^a and D_opt ~ C^b, and both at
    `target_flops`, each with a bootstrap interval (10th, 90th percentiles over `bootstrap` resamples of the runs).
    A budget whose profile has no minimum inside the sizes tried (its parabola's vertex lies beyond them: an
    extrapolation, not a measurement) is left out of the power laws and named in `excluded`, its vertex (if any) in
    `excluded_optima`; fewer than two budgets with a minimum inside raise ValueError (the sizes do not bracket the
    best: widen them). The bootstrap resamples the runs of the budgets kept."""
    profiles = by_budget(runs)
    optima = [profile_optimum(runs_c, count) for runs_c in profiles]
    inside = [o is not None and o["n_inside"] and o["d_inside"] for o in optima]
    excluded = [runs_c[0]["flops"] for runs_c, ok in zip(profiles, inside) if not ok]
    profiles = [runs_c for runs_c, ok in zip(profiles, inside) if ok]
    if len(profiles) < 2:
        raise ValueError(f"{len(profiles)} of {len(optima)} budgets have a profile with its minimum inside the sizes "
                         f"tried (N counted as {count!r}); a power law needs two: train sizes on both sides of each "
                         f"budget's best")
    fit = power_laws([o for o, ok in zip(optima, inside) if ok])
    fit["excluded"] = excluded
    fit["excluded_optima"] = [o for o, ok in zip(optima, inside) if o is not None and not ok]
    fit["n_opt_at_target"] = fit["n_coefficient"] * target_flops ** fit["a"]
    fit["d_opt_at_target"] = fit["d_coefficient"] * target_flops ** fit["b"]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        resampled = [[runs_c[i] for i in rng.integers(0, len(runs_c), len(runs_c))] for runs_c in profiles]
        refit = fit_optima(resampled, count)
        if refit is not None:  # a resample with under three distinct sizes, or no minimum, says nothing
            samples.append((refit["a"], refit["b"], refit["n_coefficient"] * target_flops ** refit["a"],
                            refit["d_coefficient"] * target_flops ** refit["b"]))
    fit.update({"count": count, "target_flops": target_flops, "bootstrap_used": len(samples),
                "bootstrap": bootstrap})
    if samples:
        low, high = np.percentile(np.array(samples), PERCENTILES, axis=0)
        for i, name in enumerate(("a", "b", "n_opt_at_target", "d_opt_at_target")):
            fit[f"{name}_interval"] = [float(low[i]), float(high[i])]
    return fit


# ----------------------------------------------------------------------------------------------------------------
# All runs at once: approach 3


HUBER_DELTA = 1e-3  # the paper's


def approach3(runs: list[dict], count: str = "params") -> dict:
    """L(N, D) = E + A / N^alpha + B / D^beta fitted to every run: the Huber loss (delta 1e-3) of
    log L - log(e^(a - alpha log N) + e^(b - beta log D) + e^e), minimised by L-BFGS from a grid of starting points,
    the best kept (A = e^a, B = e^b, E = e^e). The grid is coarser than the paper's (432 starts, not 4,500): it
    recovers a known fit exactly (tested) in about a second."""
    from scipy.optimize import minimize

    log_n = np.log([r[count] for r in runs])
    log_d = np.log([r["tokens"] for r in runs])
    log_loss = np.log([r["loss"] for r in runs])

    def objective(theta):
        a, b, e, alpha, beta = theta
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        top = terms.max(axis=0)
        weights = np.exp(terms - top)
        log_predicted = top + np.log(weights.sum(axis=0))
        residual = log_predicted - log_loss
        small = np.abs(residual) <= HUBER_DELTA
        huber = np.where(small, 0.5 * residual ** 2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))
        d_huber = np.where(small, residual, HUBER_DELTA * np.sign(residual))
        share = weights / weights.sum(axis=0)  # d log_predicted / d terms
        gradient = np.array([(d_huber * share[0]).sum(), (d_huber * share[1]).sum(), (d_huber * share[2]).sum(),
                             -(d_huber * share[0] * log_n).sum(), -(d_huber * share[1] * log_d).sum()])
        return huber.sum(), gradient

    best = None
    for alpha in (0.2, 0.5, 1.0):
        for beta in (0.2, 0.5, 1.0):
            for e in (-1.0, 0.0, 1.0):
                for a in (0.0, 5.0, 10.0, 15.0):
                    for b in (0.0, 5.0, 10.0, 15.0):
                        result = minimize(objective, np.array([a, b, e, alpha, beta]), jac=True, method="L-BFGS-B")
                        if best is None or result.fun < best.fun:
                            best = result
    a, b, e, alpha, beta = best.x
    return {"E": float(math.exp(e)), "A": float(math.exp(a)), "B": float(math.exp(b)), "alpha": float(alpha),
            "beta": float(beta), "huber_loss": float(best.fun), "count": count}


def approach3_optimum(fit: dict, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) of an approach-3 fit at `flops`, under C = 6 N D (as the paper; gptjax.scaling)."""
    return fitted_optimum(flops, fit)
