"""`python -m gptjax.scaling --flops 1e17`: compute-optimal model and data size (Hoffmann et al. 2022, Chinchilla).

With `--config experiments/m1.py --device_flops 10.4e12 --mfu 0.3` it instead projects how long that experiment
takes on a device with that peak at that MFU (model FLOPs utilisation); without `--device_flops`, on this machine's
device (its datasheet peak, or the matmul peak training measured and kept).

Given a training budget C in FLOPs (or a device's FLOP/s, an expected MFU and hours), it prints:
- the ~20-tokens-per-parameter rule with C = 6 N D:            N = sqrt(C / 120), D = 20 N;
- the paper's fitted loss L(N, D) = E + A / N^alpha + B / D^beta (approach 3), minimised under C = 6 N D:
      N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta));
- the loss that fit predicts, and gptjax shapes near N_opt with their exact parameter counts.
"""

import json
import math

from absl import flags

from gptjax import cli
from gptjax.configs import build_model_config, load_config_file, validate
from gptjax.errors import exit_on_user_error
from gptjax.model import ModelConfig

# Hoffmann et al. 2022, section 3.3 / appendix D.2: the parametric fit of approach 3.
CHINCHILLA_FIT = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TOKENS_PER_PARAMETER = 20.0


# ----------------------------------------------------------------------------------------------------------------
# Model size and cost from a config alone


def param_count(cfg: ModelConfig) -> int:
    """The same count as `count_params(GPT(cfg).init(...))`, from the config alone (used for sizing runs)."""
    D, F, V, bias = cfg.d_model, cfg.d_ff, cfg.padded_vocab_size, int(cfg.use_bias)
    layer_norm_params = D * (1 + bias)
    attention = (D * 3 * D + bias * 3 * D) + (D * D + bias * D)  # qkv + output projection
    mlp = (D * F + bias * F) + (F * D + bias * D)
    total = cfg.n_layer * (attention + mlp + 2 * layer_norm_params) + layer_norm_params + V * D  # + ln_f, embedding
    total += cfg.max_len * D if cfg.pos_embedding == "learned" else 0
    return total + (0 if cfg.tie_embeddings else D * V)


def matmul_param_count(cfg: ModelConfig) -> int:
    """Parameters every token multiplies with: all but the tables read one row per token (learned positions, an
    untied input embedding). Training computes with each of them; a decoding step reads each of them once."""
    n_matmul = param_count(cfg)
    n_matmul -= cfg.max_len * cfg.d_model if cfg.pos_embedding == "learned" else 0
    n_matmul -= 0 if cfg.tie_embeddings else cfg.padded_vocab_size * cfg.d_model
    return n_matmul


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token, forward + backward: 6 (matmul parameters) + 12 n_layer T D (PaLM appendix B, as
    nanoGPT's MFU), where T is the length of the sequences trained on (data.seq_len; the context max_len if not
    given): attention's cost grows with the tokens a query sees, not with the context it could see. Table lookups
    (learned positions, an untied input embedding) are not matmuls, so not counted."""
    T = cfg.max_len if seq_len is None else seq_len
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layer * T * cfg.d_model


# ----------------------------------------------------------------------------------------------------------------
# Compute-optimal sizes


def twenty_tokens_rule(flops: float) -> tuple[float, float]:
    """(N, D) with D = 20 N and C = 6 N D."""
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAMETER))
    return n, TOKENS_PER_PARAMETER * n


def fitted_optimum(flops: float, fit: dict = CHINCHILLA_FIT) -> tuple[float, float]:
    """(N_opt, D_opt) minimising E + A/N^alpha + B/D^beta subject to 6 N D = C."""
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    n = g * (flops / 6) ** (beta / (alpha + beta))
    return n, flops / (6 * n)


def predicted_loss(n: float, d: float, fit: dict = CHINCHILLA_FIT) -> float:
    """The fit's loss in nats per token (on the paper's MassiveText and tokenizer, so a guide, not a promise)."""
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def suggest_shapes(target_params: float, context: int = 256, count: int = 3) -> list[ModelConfig]:
    """gptjax shapes with 64-wide heads, d_ff = 4 d_model and a sensible depth (d_model / n_layer in 24..80),
    nearest in exact parameter count to `target_params`."""
    candidates = []
    for n_layer in range(2, 49):
        for d_model in range(128, 4097, 64):
            if 24 <= d_model / n_layer <= 80:
                cfg = ModelConfig(max_len=context, n_layer=n_layer, d_model=d_model, n_head=d_model // 64,
                                  d_ff=4 * d_model)
                candidates.append((abs(math.log(param_count(cfg) / target_params)), cfg))
    return [cfg for _, cfg in sorted(candidates, key=lambda c: c[0])[:count]]


def planned_steps(config, model_config: ModelConfig) -> int:
    """train.steps, or when it is 0, as many steps as train.flop_budget buys at 6N + 12LTD FLOPs per token."""
    train = config.train
    if train.steps > 0:
        return train.steps
    tokens_per_step = train.batch_size * config.data.seq_len
    return max(1, int(train.flop_budget // (flops_per_token(model_config, config.data.seq_len) * tokens_per_step)))


def projection(config, device_flops: float, mfu: float) -> dict:
    """An experiment's size and the hours it takes on a device of `device_flops` peak FLOP/s at `mfu` of it."""
    model_config = build_model_config(config.model)
    steps = planned_steps(config, model_config)
    tokens = steps * config.train.batch_size * config.data.seq_len
    per_token = flops_per_token(model_config, config.data.seq_len)
    flops = tokens * per_token
    return {"params": param_count(model_config), "flops_per_token": per_token, "steps": steps,
            "tokens": tokens, "flops": flops, "tokens_per_parameter": tokens / param_count(model_config),
            "device_flops": device_flops, "mfu": mfu, "tokens_per_second": device_flops * mfu / per_token,
            "hours": flops / (device_flops * mfu) / 3600}


def explain_projection(name: str, p: dict, peak_source: str = "--device_flops") -> str:
    return (f"{name}: {describe(p['params'])} parameters, {describe(p['flops_per_token'])} FLOPs per token, "
            f"{p['steps']:,} steps = {describe(p['tokens'])} tokens ({p['tokens_per_parameter']:.3g} per parameter) "
            f"= {p['flops']:.3g} FLOPs\n  at {100 * p['mfu']:.0f}% MFU of {p['device_flops'] / 1e12:.3g} TFLOP/s "
            f"({peak_source}): {describe(p['tokens_per_second'])} tokens/s, "
            + (f"{p['hours']:.3g} hours" if p["hours"] >= 1 else f"{60 * p['hours']:.3g} minutes"))


def report(flops: float, context: int = 256) -> dict:
    n20, d20 = twenty_tokens_rule(flops)
    n_opt, d_opt = fitted_optimum(flops)
    shapes = []
    for cfg in suggest_shapes(n_opt, context):
        n = param_count(cfg)
        tokens = flops / flops_per_token(cfg)
        shapes.append({"n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head, "d_ff": cfg.d_ff,
                       "params": n, "tokens_at_budget": tokens, "predicted_loss": predicted_loss(n, tokens)})
    seed = ModelConfig(max_len=context)  # the seed's shape, as experiments/m1.py
    seed_params, seed_tokens = param_count(seed), flops / flops_per_token(seed)
    return {"flops": flops,
            "rule_20_tokens": {"params": n20, "tokens": d20, "predicted_loss": predicted_loss(n20, d20)},
            "fitted_optimum": {"params": n_opt, "tokens": d_opt, "predicted_loss": predicted_loss(n_opt, d_opt)},
            "shapes": shapes,
            "seed_shape": {"params": seed_params, "tokens": seed_tokens,
                           "predicted_loss": predicted_loss(seed_params, seed_tokens)}}


def describe(n: float, flops: bool = False) -> str:
    """A short count: 820M tokens, 1.2B tokens; FLOPs in SI units: 122M, 5.5G, 1e17 = 100P."""
    units = (("P", 1e15), ("T", 1e12), ("G", 1e9)) if flops else (("T", 1e12), ("B", 1e9))
    for unit, size in units + (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


# A predicted loss this close to the optimum's is within the fit's own noise: the surface is flat there.
FLAT_NATS = 0.05


def explain(result: dict) -> str:
    r20, opt = result["rule_20_tokens"], result["fitted_optimum"]
    lines = [f"Budget C = {result['flops']:.3g} FLOPs (C = 6 N D)",
             f"  20 tokens / parameter:  N = {describe(r20['params'])} parameters, D = {describe(r20['tokens'])} "
             f"tokens, predicted loss {r20['predicted_loss']:.3f}",
             f"  fitted L(N, D) optimum: N = {describe(opt['params'])} parameters, D = {describe(opt['tokens'])} "
             f"tokens, predicted loss {opt['predicted_loss']:.3f}",
             "  gptjax shapes near the optimum (exact parameter counts, tokens at 6N + 12LTD FLOPs per token):"]
    for s in result["shapes"]:
        lines.append(f"    n_layer={s['n_layer']:<3} d_model={s['d_model']:<5} n_head={s['n_head']:<3} "
                     f"d_ff={s['d_ff']:<6} {describe(s['params']):>6} params  {describe(s['tokens_at_budget'])} "
                     f"tokens  loss {s['predicted_loss']:.3f}")
    seed = result["seed_shape"]
    lines.append(f"  the seed shape (experiments/m1.py: 8 x 256, 8 heads, d_ff 1024): {describe(seed['params'])} "
                 f"params, {describe(seed['tokens'])} tokens, predicted loss {seed['predicted_loss']:.3f}")
    lines.append("  " + compare_seed(seed, opt))
    return "\n".join(lines)


def compare_seed(seed: dict, opt: dict) -> str:
    """Where the seed shape sits against the fitted optimum, in sentences made from the numbers."""
    size = seed["params"] / opt["params"]
    gap = seed["predicted_loss"] - opt["predicted_loss"]
    def times(x):
        return f"{x:.0f}x" if x >= 10 else f"{x:.2g}x"

    where = (f"It has {times(size)} the optimum's parameters ({'more' if size > 1 else 'fewer'}) and so "
             f"{'fewer' if size > 1 else 'more'} tokens ({times(seed['tokens'] / opt['tokens'])})")
    if gap <= FLAT_NATS:
        verdict = (f"and its predicted loss is within {gap:.3f} nats of the best: the loss surface is flat near the "
                   f"optimum, so the round, fast 8 x 256 shape costs almost nothing here")
    else:
        verdict = (f"and its predicted loss is {gap:.3f} nats above the best: at this budget the seed shape is far "
                   f"from compute-optimal, so take a shape from the list above")
    embedding = 50304 * 256 / seed["params"]
    return (f"{where}, {verdict}. {embedding:.0%} of its N is the tied 50304 x 256 embedding; gptjax counts 6N + "
            f"12LTD FLOPs per token (attention included), slightly more than the paper's 6N.")


def main(argv=None) -> None:
    args = flags.FlagValues()
    flags.DEFINE_float("flops", None, "training budget in FLOPs, e.g. 1e17", flag_values=args)
    flags.DEFINE_float("device_flops", None, "or: the device's peak FLOP/s ...", flag_values=args)
    flags.DEFINE_float("mfu", 0.35, "... the fraction of it training reaches ...", flag_values=args)
    flags.DEFINE_float("hours", None, "... and the hours you have", flag_values=args)
    flags.DEFINE_integer("context", 256, "context length of the suggested shapes", flag_values=args)
    flags.DEFINE_string("config", None, "or: an experiment file, to project its hours from --mfu and --device_flops "
                        "(default: this machine's peak)", flag_values=args)
    flags.DEFINE_bool("json", False, "print JSON instead of a table", flag_values=args)
    cli.parse_own_flags(args, argv, __doc__.splitlines()[0])
    with exit_on_user_error():
        for name in ("flops", "device_flops", "hours", "context"):
            value = getattr(args, name)
            cli.require(value is None or (math.isfinite(value) and value > 0),
                        f"--{name}={value} must be a positive number")
        cli.require(0 < args.mfu <= 1, f"--mfu={args.mfu} must be in (0, 1]: the fraction of the peak reached")
        if args.config:
            config = load_config_file(args.config)
            validate(config)
            device_flops, peak_source = args.device_flops, "--device_flops"
            if device_flops is None:  # this machine's: the datasheet's, train.peak_flops, or the kept measurement
                from gptjax.hardware import peak_flops_per_device

                device_flops, peak_source = peak_flops_per_device(config.model.dtype, config.train.peak_flops)
            result = projection(config, device_flops, args.mfu)
            print(json.dumps(result, indent=1) if args.json
                  else explain_projection(args.config, result, peak_source))
            return
        if args.flops is None:
            cli.require(args.device_flops is not None and args.hours is not None,
                        "give --flops, or --device_flops and --hours (and optionally --mfu)")
    flops = args.flops or args.device_flops * args.mfu * args.hours * 3600
    result = report(flops, args.context)
    print(json.dumps(result, indent=1) if args.json else explain(result))


if __name__ == "__main__":
    main()
