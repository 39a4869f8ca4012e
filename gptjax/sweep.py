"""`python -m gptjax.sweep --config experiments/sweep.py --workdir runs/sweep`: the compute-optimal model size,
measured on your data and machine (Hoffmann et al. 2022, figure 3).

For each budget C in sweep.budgets it trains a model of each width in sweep.d_models for exactly C FLOPs (steps =
C / (FLOPs per token x tokens per step), rounded down, so a run spends its budget to within one step; warmup then a
cosine that ends at the run's last step), evaluates each on the same held-out windows, and fits (gptjax/isoflop.py):
a parabola in log N per budget (N_opt(C) and its loss), then N_opt ~ C^a and D_opt ~ C^b across budgets (approach
2, bootstrap intervals), and L(N, D) = E + A/N^alpha + B/D^beta over all runs (approach 3). It writes
<workdir>/summary.md, summary.json and isoflop.png (the paper's three panels, its lines beside yours, the
extrapolation to sweep.target_flops and experiments/m1.py's 19.2M marked).

Every point is an ordinary gptjax run in <workdir>/runs/<name> (config, metrics.jsonl, checkpoints: sample, evaluate
and plot it as any run), all reading one token cache (<workdir>/data). Ctrl-C stops at a safe point (exit 130, the
run in flight saved); the same command again skips the finished runs, resumes the interrupted one from its
checkpoint and gives the same fits.
"""

if __name__ == "__main__":  # Ctrl-C is a stop request from the start, as in gptjax.train
    from gptjax import interrupts as _interrupts

    _interrupts.install()

import dataclasses
import json
import math
import os
import time

import jax
import ml_collections
from absl import flags

from gptjax import cli, input_pipeline, interrupts, isoflop
from gptjax.configs import SWEEP_KEYS, build_model_config, validate
from gptjax.errors import UserError, check_workdir
from gptjax.hardware import read_json
from gptjax.input_pipeline import write_atomically
from gptjax.model import ModelConfig
from gptjax.scaling import describe, fitted_optimum, flops_per_token, param_count, planned_steps

RESULT = "sweep_result.json"  # in a run's directory once it has finished: the sweep skips it next time
WALL = "sweep_wall_seconds.json"  # wall time spent on an unfinished run, for its total when it finishes
WARN_EPOCHS = 4.0
# The paper's approach-2 exponents (table 2), drawn through the compute-optimal Chinchilla it trained: 70B parameters
# on 1.4T tokens, 5.76e23 FLOPs.
CHINCHILLA_APPROACH2 = {"a": 0.49, "b": 0.51, "flops": 5.76e23, "params": 70e9, "tokens": 1.4e12}
M1 = ModelConfig(max_len=256)  # experiments/m1.py's shape: the seed's 19.2M parameters, trained with 1e17 FLOPs


# ----------------------------------------------------------------------------------------------------------------
# The plan: one ordinary run config per (budget, width)


@dataclasses.dataclass
class PlannedRun:
    name: str  # its directory under <workdir>/runs
    flops: float  # the budget C
    config: ml_collections.ConfigDict  # an ordinary gptjax config (model, data, train)
    model: ModelConfig
    steps: int
    tokens: int  # steps x batch_size x seq_len: D
    flops_used: float  # tokens x FLOPs per token: C to within one step

    @property
    def params(self) -> int:
        return param_count(self.model)

    @property
    def non_embedding_params(self) -> int:
        return non_embedding_params(self.model)


def non_embedding_params(cfg: ModelConfig) -> int:
    """N without the token table (and learned positions), as Kaplan et al. 2020 count it; a tied output layer is the
    token table, so it goes too."""
    tables = cfg.padded_vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return param_count(cfg) - tables - (cfg.max_len * cfg.d_model if cfg.pos_embedding == "learned" else 0)


def shape_of(sweep: ml_collections.ConfigDict, d_model: int) -> dict:
    """The model keys of width `d_model` under the sweep's aspect rule (a width below head_dim: one head)."""
    return {"d_model": d_model, "n_layer": max(1, (d_model + sweep.width_per_layer // 2) // sweep.width_per_layer),
            "n_head": max(1, d_model // sweep.head_dim), "d_ff": 4 * d_model}


def check_sweep_keys(config: ml_collections.ConfigDict) -> None:
    """One line for a sweep group that cannot make a sweep: checked before any data is read."""
    if "sweep" not in config:
        raise UserError("the config has no `sweep` group; start the experiment from gptjax.configs.sweep_config() "
                        "(see experiments/sweep.py)")
    sweep = config.sweep
    unknown = sorted(set(sweep.keys()) - {key.split(".")[1] for key in SWEEP_KEYS})
    if unknown:
        raise UserError(f"unknown sweep key(s) {unknown}; valid keys: {sorted(k.split('.')[1] for k in SWEEP_KEYS)}")
    budgets = tuple(sweep.budgets)
    if len(set(budgets)) < 2 or not all(isinstance(c, (int, float)) and c > 0 for c in budgets):
        raise UserError(f"sweep.budgets={budgets} needs at least two different positive budgets in FLOPs (a power "
                        f"law through one point is not a fit), e.g. --config.sweep.budgets='(1e12, 3e12, 1e13)'")
    per_budget = all(isinstance(w, (tuple, list)) for w in sweep.d_models)
    if per_budget and len(sweep.d_models) != len(set(budgets)):
        raise UserError(f"sweep.d_models has {len(sweep.d_models)} tuples of widths for {len(set(budgets))} budgets; "
                        f"give one tuple per budget (smallest budget first), or one tuple of widths for all")
    for widths in (sweep.d_models if per_budget else [sweep.d_models]):
        if len(set(widths)) < 3 or not all(isinstance(d, int) and d > 0 for d in widths):
            raise UserError(f"sweep.d_models={tuple(sweep.d_models)} needs at least three different positive widths "
                            f"per budget (a parabola through fewer is not a fit), e.g. "
                            f"--config.sweep.d_models='(32, 64, 128)'")
    for key in ("width_per_layer", "head_dim", "min_steps", "bootstrap"):
        if not isinstance(sweep[key], int) or sweep[key] < (0 if key == "bootstrap" else 1):
            raise UserError(f"sweep.{key}={sweep[key]!r} must be a positive integer")
    if not 0 < sweep.warmup_fraction < 1:
        raise UserError(f"sweep.warmup_fraction={sweep.warmup_fraction!r} must be in (0, 1)")
    if not 0 < sweep.expected_mfu <= 1:
        raise UserError(f"sweep.expected_mfu={sweep.expected_mfu!r} must be in (0, 1]")
    if sweep.count not in ("total", "non_embedding"):
        raise UserError(f"sweep.count={sweep.count!r} is not one of ('total', 'non_embedding')")
    if not sweep.max_epochs > 0 or not sweep.target_flops > 0:
        raise UserError("sweep.max_epochs and sweep.target_flops must be positive")
    bad = sorted({d for budget in range(len(set(budgets))) for d in widths_of(sweep, budget)
                  if d > sweep.head_dim and d % sweep.head_dim})
    if bad:
        raise UserError(f"sweep.d_models {bad} are not divisible by sweep.head_dim={sweep.head_dim}: every width is "
                        f"n_head heads of head_dim; pick widths that are multiples of it, or another head_dim")


def widths_of(sweep: ml_collections.ConfigDict, budget_index: int) -> list[int]:
    """The widths trained at the budget_index-th smallest budget: sweep.d_models, or its tuple for that budget."""
    if all(isinstance(w, (tuple, list)) for w in sweep.d_models):
        return sorted(set(sweep.d_models[budget_index]))
    return sorted(set(sweep.d_models))


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[PlannedRun]:
    """Every run of the sweep, smallest budget first, narrowest model first; refuses (one line) a budget too small for
    sweep.min_steps steps of a width."""
    check_sweep_keys(config)
    sweep, runs = config.sweep, []
    for budget_index, flops in enumerate(sorted(set(sweep.budgets))):
        for d_model in widths_of(sweep, budget_index):
            run = ml_collections.ConfigDict({group: config[group].to_dict() for group in ("model", "data", "train")})
            run.model.update(shape_of(sweep, d_model))
            run.train.steps, run.train.flop_budget = 0, float(flops)
            model = build_model_config(run.model)
            steps = planned_steps(run, model)  # at least 1, so the budget's whole steps are counted here
            tokens_per_step = run.train.batch_size * run.data.seq_len
            whole_steps = int(flops // (flops_per_token(model, run.data.seq_len) * tokens_per_step))
            if whole_steps < sweep.min_steps:
                raise UserError(
                    f"the budget {flops:.3g} FLOPs buys d_model={d_model} ({model.n_layer} layers) only "
                    f"{whole_steps} steps of {tokens_per_step} tokens, fewer than sweep.min_steps={sweep.min_steps}; "
                    f"raise the smallest budget, lower train.batch_size, or drop the widest widths")
            run.train.warmup_steps = max(1, round(sweep.warmup_fraction * steps))
            run.train.eval_every = steps  # the held-out loss once, at the end: the point of the profile
            run.train.checkpoint_every = min(run.train.checkpoint_every, steps)
            run.data.cache_dir = config.data.cache_dir or os.path.join(workdir, "data")  # one token cache for all
            validate(run)
            run.lock()
            name = f"C{flops:.2g}_d{d_model}_L{model.n_layer}".replace("+", "")
            tokens = steps * tokens_per_step
            runs.append(PlannedRun(name=name, flops=float(flops), config=run, model=model, steps=steps,
                                   tokens=tokens, flops_used=float(tokens * flops_per_token(model, run.data.seq_len))))
    return runs


def check_corpus(runs: list[PlannedRun], train_tokens: int, max_epochs: float) -> list[str]:
    """Warnings for runs that repeat the training text more than WARN_EPOCHS times; refuses (one line) more than
    max_epochs."""
    worst = max(runs, key=lambda r: r.tokens)
    if worst.tokens > max_epochs * train_tokens:
        raise UserError(f"run {worst.name} would train on {describe(worst.tokens)} tokens, "
                        f"{worst.tokens / train_tokens:.1f} passes over the {describe(train_tokens)}-token training "
                        f"text (sweep.max_epochs={max_epochs:g}); use more text, lower the largest budget, or drop the "
                        f"narrowest widths")
    return [f"warning  | {r.name} passes over the training text {r.tokens / train_tokens:.1f} times (repeated data "
            f"lowers the held-out loss less than new data would, and biases the fit towards smaller models)"
            for r in runs if r.tokens > WARN_EPOCHS * train_tokens]


def plan_lines(runs: list[PlannedRun], train_tokens: int, seconds: float, flops_per_second: float) -> list[str]:
    """The table a user reads before any training: every run's shape, N both ways, steps, tokens and passes."""
    lines = [f"sweep    | {len(runs)} runs, {len({r.flops for r in runs})} budgets, "
             f"{sum(r.flops_used for r in runs):.3g} FLOPs in all; training text {describe(train_tokens)} tokens",
             f"         | projected {seconds / 60:.0f} min at {flops_per_second:.3g} FLOP/s (sweep.expected_mfu of the "
             f"measured peak; on a CPU narrow models run slower: the progress line corrects it as runs finish)",
             f"         | {'run':<18} {'layers':>6} {'d_model':>7} {'N':>7} {'N w/o emb':>9} {'steps':>6} "
             f"{'tokens':>7} {'passes':>6}"]
    for r in runs:
        lines.append(f"         | {r.name:<18} {r.model.n_layer:>6} {r.model.d_model:>7} {describe(r.params):>7} "
                     f"{describe(r.non_embedding_params):>9} {r.steps:>6} {describe(r.tokens):>7} "
                     f"{r.tokens / train_tokens:>6.2f}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Running it: one ordinary training run per point, finished ones skipped


def run_sweep(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
    """Trains every planned run not yet finished, then fits and writes the summary and figure; returns the summary.
    A stop request (Ctrl-C) raises KeyboardInterrupt after the run in flight has saved its step."""
    from gptjax import hardware, train

    check_workdir(workdir)
    with interrupts.handled():
        runs = plan(config, workdir)
        hardware.select_platform(config.train.platform)
        hardware.use_compilation_cache(config.train.compilation_cache)
        os.makedirs(workdir, exist_ok=True)
        cache = input_pipeline.prepare(runs[0].config, workdir, progress=progress)  # the one tokenization
        train_tokens = cache.num_tokens("train")
        warnings = check_corpus(runs, train_tokens, config.sweep.max_epochs)
        peak, _ = hardware.peak_flops_per_device(config.model.dtype, config.train.peak_flops)
        expected = peak * config.sweep.expected_mfu * jax.device_count()
        total = sum(r.flops_used for r in runs)
        for line in plan_lines(runs, train_tokens, total / expected, expected) + warnings:
            print(line)
        # hardware.read_json: {} where there is none (or it is unreadable: the run is then trained again)
        finished = {run.name: read_json(os.path.join(workdir, "runs", run.name, RESULT)) or None for run in runs}
        for run in runs:  # before any training: a finished run is reused only by the config that trained it
            if finished[run.name] is not None and finished[run.name].get("config") != run.config.to_dict():
                raise UserError(f"{os.path.join(workdir, 'runs', run.name)} holds a finished run of another config "
                                f"(the sweep's keys changed since it ran); use another --workdir, or delete that run "
                                f"to train it again")
        results, spent = [], {"flops": 0.0, "seconds": 0.0}
        for index, run in enumerate(runs):
            interrupts.check()
            run_dir = os.path.join(workdir, "runs", run.name)
            result = finished[run.name]
            if result is None:
                print(progress_line(index, runs, results, spent, expected))
                result = train_one(run, run_dir, train_tokens, progress, train.train_and_evaluate)
                spent["flops"] += run.flops_used
                spent["seconds"] += result["wall_seconds"]
                result = {**result, "trained_here": True}
            else:
                print(f"sweep    | run {index + 1}/{len(runs)} {run.name}: finished before, held-out loss "
                      f"{result['loss']:.4f}")
            results.append(result)
    summary = summarize([{k: v for k, v in r.items() if k not in ("trained_here", "config")} for r in results],
                        config.sweep)
    write_outputs(summary, workdir)
    return summary


def train_one(run: PlannedRun, run_dir: str, train_tokens: int, progress: bool, train_and_evaluate) -> dict:
    """Trains (or resumes) one point and records its result in run_dir/sweep_result.json."""
    wall_path = os.path.join(run_dir, WALL)
    earlier = read_json(wall_path).get("seconds", 0.0)
    start = time.perf_counter()
    try:
        metrics = train_and_evaluate(run.config, run_dir, progress=progress)
    finally:
        wall_seconds = earlier + time.perf_counter() - start
        if os.path.isdir(run_dir):
            write_atomically(wall_path, json.dumps({"seconds": wall_seconds}).encode())
    result = {"name": run.name, "flops": run.flops, "flops_used": run.flops_used, "n_layer": run.model.n_layer,
              "d_model": run.model.d_model, "n_head": run.model.n_head, "d_ff": run.model.d_ff,
              "params": run.params, "non_embedding_params": run.non_embedding_params, "steps": run.steps,
              "tokens": run.tokens, "epochs": run.tokens / train_tokens, "loss": metrics["eval_loss"],
              "train_loss": metrics["loss"], "wall_seconds": wall_seconds,
              "tokens_per_second": metrics["tokens_per_second"], "mfu": metrics["mfu"],
              "config": run.config.to_dict()}
    write_atomically(os.path.join(run_dir, RESULT), json.dumps(result, indent=1).encode())
    return result


def progress_line(index: int, runs: list[PlannedRun], results: list[dict], spent: dict, expected: float) -> str:
    """The sweep as a whole: runs done, FLOPs done of the total, and the time left. A width already trained in this
    session is projected at the seconds per token it took (compile included); another at the FLOP/s measured so far
    (at first, the plan's). Per width, because narrow models are slower per FLOP on a CPU: the softmax over the
    vocabulary, not in 6N, costs the same per token at every width."""
    run, total = runs[index], sum(r.flops_used for r in runs)
    done = sum(r["flops_used"] for r in results)
    speed = spent["flops"] / spent["seconds"] if spent["seconds"] else expected
    seconds_per_token = {}
    for r in results:
        if r.get("trained_here"):
            seconds_per_token[r["d_model"]] = r["wall_seconds"] / r["tokens"]
    left = sum(r.tokens * seconds_per_token[r.model.d_model] if r.model.d_model in seconds_per_token
               else r.flops_used / speed for r in runs[index:])
    return (f"sweep    | run {index + 1}/{len(runs)} {run.name}: {run.model.n_layer} layers x d_model "
            f"{run.model.d_model}, {run.steps} steps | {100 * done / total:.0f}% of the FLOPs done | ~{left / 60:.0f} "
            f"min left")


# ----------------------------------------------------------------------------------------------------------------
# The fits, the summary and the figure


COUNTS = {"total": "params", "non_embedding": "non_embedding_params"}


def summarize(results: list[dict], sweep: ml_collections.ConfigDict) -> dict:
    """Every run, the fits with both parameter counts, and the extrapolation beside Chinchilla's and m1's."""
    target = sweep.target_flops
    fits = {}
    for count, key in COUNTS.items():
        try:
            fits[count] = isoflop.approach2(results, key, target, sweep.bootstrap)
        except ValueError as e:
            fits[count] = {"error": str(e), "count": key}
        try:
            approach3 = isoflop.approach3(results, key)
            n3, d3 = isoflop.approach3_optimum(approach3, target)
            fits[count]["approach3"] = {**approach3, "n_opt_at_target": n3, "d_opt_at_target": d3}
        except (ValueError, ArithmeticError) as e:
            fits[count]["approach3"] = {"error": str(e)}
    chinchilla_n, chinchilla_d = fitted_optimum(target)
    m1_tokens = target / flops_per_token(M1)
    return {"target_flops": target, "default_count": sweep.count, "runs": results, "fits": fits,
            "chinchilla_at_target": {"params": chinchilla_n, "tokens": chinchilla_d,
                                     "approach2_params": approach2_line(target, "params"),
                                     "approach2_tokens": approach2_line(target, "tokens")},
            "m1": {"params": param_count(M1), "non_embedding_params": non_embedding_params(M1),
                   "tokens": m1_tokens}}


def approach2_line(flops, what: str):
    """The paper's approach-2 N_opt (what='params') or D_opt ('tokens') at `flops`: its exponent through Chinchilla."""
    c = CHINCHILLA_APPROACH2
    return c[what] * (flops / c["flops"]) ** (c["a"] if what == "params" else c["b"])


def write_outputs(summary: dict, workdir: str) -> None:
    write_atomically(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1).encode())
    write_atomically(os.path.join(workdir, "summary.md"), summary_markdown(summary).encode())
    draw_figure(summary, os.path.join(workdir, "isoflop.png"))


def interval(fit: dict, name: str, fmt) -> str:
    low_high = fit.get(f"{name}_interval")
    return f"{fmt(fit[name])} [{fmt(low_high[0])}, {fmt(low_high[1])}]" if low_high else fmt(fit[name])


def summary_markdown(summary: dict) -> str:
    target = summary["target_flops"]
    lines = ["# IsoFLOP sweep", "",
             "| run | C (FLOPs) | layers | d_model | N | N w/o embedding | tokens D | passes | held-out loss | "
             "wall | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['name']} | {r['flops_used']:.3g} | {r['n_layer']} | {r['d_model']} | "
                     f"{describe(r['params'])} | {describe(r['non_embedding_params'])} | {describe(r['tokens'])} | "
                     f"{r['epochs']:.2f} | {r['loss']:.4f} | {r['wall_seconds']:.0f} s | {100 * r['mfu']:.0f}% |")
    for count, fit in summary["fits"].items():
        marker = " (the default)" if count == summary["default_count"] else ""
        lines += ["", f"## N counted as {count}{marker}", ""]
        if "error" in fit:
            lines.append(f"Approach 2 could not be fitted: {fit['error']}")
        else:
            lines += ["| C | N_opt | D_opt | loss there | minimum inside the sizes tried |", "|---|---|---|---|---|"]
            rows = [(o["flops"], f"| {o['flops']:.3g} | {describe(o['n_opt'])} | {describe(o['d_opt'])} | "
                                 f"{o['loss_opt']:.4f} | yes |") for o in fit["optima"]]
            rows += [(o["flops"], f"| {o['flops']:.3g} | ({describe(o['n_opt'])}) | ({describe(o['d_opt'])}) | "
                                  f"({o['loss_opt']:.4f}) | NO: the vertex is outside them, left out of the fit |")
                     for o in fit["excluded_optima"]]
            rows += [(flops, f"| {flops:.3g} | - | - | - | NO minimum: left out of the fit |")
                     for flops in set(fit["excluded"]) - {o["flops"] for o in fit["excluded_optima"]}]
            lines += [line for _, line in sorted(rows)]
            lines += ["", f"Approach 2 (80% bootstrap intervals, {fit['bootstrap_used']} of {fit['bootstrap']} "
                          f"resamples usable): N_opt ~ C^{interval(fit, 'a', lambda x: f'{x:.3f}')}, "
                          f"D_opt ~ C^{interval(fit, 'b', lambda x: f'{x:.3f}')}.",
                      f"At C = {target:.3g}: N_opt = {interval(fit, 'n_opt_at_target', describe)}, "
                      f"D_opt = {interval(fit, 'd_opt_at_target', describe)}."]
        a3 = fit["approach3"]
        if "error" not in a3:
            lines.append(f"Approach 3: L(N, D) = {a3['E']:.3f} + {a3['A']:.4g} / N^{a3['alpha']:.3f} + "
                         f"{a3['B']:.4g} / D^{a3['beta']:.3f}; at C = {target:.3g}: N_opt = "
                         f"{describe(a3['n_opt_at_target'])}, D_opt = {describe(a3['d_opt_at_target'])}.")
    ch, m1 = summary["chinchilla_at_target"], summary["m1"]
    lines += ["", f"## Beside Chinchilla and m1 at C = {target:.3g}", "",
              f"- Chinchilla's fitted L(N, D) (approach 3, `python -m gptjax.scaling`): N_opt = "
              f"{describe(ch['params'])}, D_opt = {describe(ch['tokens'])}; its approach 2 (a = 0.49, b = 0.51 "
              f"through Chinchilla-70B): N_opt = {describe(ch['approach2_params'])}, D_opt = "
              f"{describe(ch['approach2_tokens'])}.",
              f"- experiments/m1.py: N = {describe(m1['params'])} ({describe(m1['non_embedding_params'])} without "
              f"the embedding), D = {describe(m1['tokens'])}."]
    return "\n".join(lines) + "\n"


def draw_figure(summary: dict, path: str) -> None:
    """The paper's figure 3 from these runs: IsoFLOP profiles (left), N_opt against C (centre), D_opt against C
    (right), with the paper's lines, the extrapolation to the target budget and m1 beside them."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    count = summary["default_count"]
    key, fit = COUNTS[count], summary["fits"][count]
    runs, target = summary["runs"], summary["target_flops"]
    figure, (left, centre, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    budgets = sorted({r["flops"] for r in runs})
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, len(budgets)))
    optima = {o["flops"]: o for o in fit.get("optima", []) + fit.get("excluded_optima", [])}
    kept = {o["flops"] for o in fit.get("optima", [])}
    for flops, colour in zip(budgets, colours):
        profile = sorted((r for r in runs if r["flops"] == flops), key=lambda r: r[key])
        n = np.array([r[key] for r in profile])
        left.plot(n, [r["loss"] for r in profile], "o", color=colour, label=f"{flops:.2g} FLOPs")
        if flops in optima:
            o = optima[flops]
            grid = np.geomspace(n.min(), n.max(), 100)
            left.plot(grid, np.polyval(o["parabola_log_n"], np.log(grid)), "-" if flops in kept else ":",
                      color=colour, linewidth=1)
            if flops in kept:  # a vertex outside the sizes tried is not drawn as a measured optimum
                left.plot([o["n_opt"]], [o["loss_opt"]], "*", color=colour, markersize=12, markeredgecolor="black")
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
    left.set_xlabel(f"parameters N ({count})")
    left.set_ylabel("final held-out loss (nats per token)")
    left.set_title("IsoFLOP profiles")
    left.legend(fontsize=8)
    span = np.geomspace(min(budgets) / 3, target * 3, 100)
    chinchilla = np.array([fitted_optimum(c) for c in span])
    m1 = summary["m1"]
    for axis, what, name in ((centre, "n", "params"), (right, "d", "tokens")):
        if "optima" in fit:
            xs = [o["flops"] for o in fit["optima"]]
            axis.plot(xs, [o[f"{what}_opt"] for o in fit["optima"]], "o", color="black", label="this sweep's optima")
            exponent = fit["a" if what == "n" else "b"]
            axis.plot(span, fit[f"{what}_coefficient"] * span ** exponent, "-", color="black",
                      label=f"fit: C^{exponent:.2f}")
            low_high = fit.get(f"{what}_opt_at_target_interval")
            if low_high:
                value = fit[f"{what}_opt_at_target"]
                axis.errorbar([target], [value], yerr=[[value - low_high[0]], [low_high[1] - value]], fmt="s",
                              color="black", capsize=4, label=f"at {target:.2g} (80% interval)")
        axis.plot(span, chinchilla[:, 0 if what == "n" else 1], "--", color="tab:red",
                  label="Chinchilla approach 3 (gptjax.scaling)")
        axis.plot(span, [approach2_line(c, name) for c in span], ":", color="tab:orange",
                  label="Chinchilla approach 2 (C^0.49 / C^0.51)")
        m1_value = (m1["params"] if count == "total" else m1["non_embedding_params"]) if what == "n" else m1["tokens"]
        axis.plot([target], [m1_value], "P", color="tab:blue", markersize=11, label="experiments/m1.py")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("training FLOPs C")
        axis.set_ylabel(f"optimal {'parameters N' if what == 'n' else 'tokens D'}")
        axis.set_title(f"{'N' if what == 'n' else 'D'}_opt against compute")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def explain(summary: dict, workdir: str) -> str:
    """The lines printed at the end: the fitted exponents and the extrapolation, and where the files are."""
    count = summary["default_count"]
    fit, target = summary["fits"][count], summary["target_flops"]
    if "error" in fit:
        head = f"fit      | approach 2 could not be fitted ({count} N): {fit['error']}"
    else:
        outside = fit["excluded"]
        head = (f"fit      | N_opt ~ C^{interval(fit, 'a', lambda x: f'{x:.2f}')}, D_opt ~ "
                f"C^{interval(fit, 'b', lambda x: f'{x:.2f}')} ({count} N; Chinchilla: 0.49, 0.51)\n"
                f"         | at {target:.3g} FLOPs: N_opt = {interval(fit, 'n_opt_at_target', describe)}, D_opt = "
                f"{interval(fit, 'd_opt_at_target', describe)} (Chinchilla's fit: "
                f"{describe(summary['chinchilla_at_target']['params'])}; m1: {describe(summary['m1']['params'])})")
        if outside:
            budgets = ", ".join(f"{flops:.2g}" for flops in sorted(outside))
            head += (f"\nwarning  | the profile at {budgets} FLOPs has no minimum inside the sizes tried, so it is "
                     f"left out of the fit: add widths on its falling side (sweep.d_models) and rerun")
    return (f"{head}\ndone     | {os.path.join(workdir, 'summary.md')}, summary.json, isoflop.png; each run in "
            f"{os.path.join(workdir, 'runs')}/")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main():
    workdir = flags.FLAGS.workdir
    try:
        summary = run_sweep(_CONFIG.value, workdir)
    except KeyboardInterrupt:  # the run in flight said what it saved
        done = sum(os.path.exists(os.path.join(workdir, "runs", name, RESULT))
                   for name in (os.listdir(os.path.join(workdir, "runs")) if os.path.isdir(
                       os.path.join(workdir, "runs")) else []))
        interrupts.exit_interrupted(f"Sweep stopped: {done} run(s) finished; rerun the same command to go on (finished "
                                    f"runs are skipped, the interrupted one resumes from its checkpoint)")
    print(explain(summary, workdir))


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag("experiments/sweep.py")
    flags.DEFINE_string("workdir", "runs/sweep", "Sweep directory: one run directory per point, the token cache, "
                                                  "summary.md, summary.json and isoflop.png.")
    cli.run(main)
