"""Deep models: `python -m benchmarks.layers [--config experiments/m1.py] [--n_layer 24]`.

Compiles the real train step of the config's model made `--n_layer` deep, once per layout: unrolled blocks, and
`model.scan_layers` (one block under nn.scan), each with every `model.remat` policy. For each it reports the compile
seconds and XLA's memory plan of the compiled step (`Compiled.memory_analysis()`): the temporary buffers, which are
the activations kept for the backward pass plus scratch, and the arguments (parameters, optimizer state, batch). With
`--steps N` it also times N steps after compiling (tokens/s and MFU against the device's peak, as `gptjax.train`
prints it), to show what rematerialisation costs in compute.

`--attention` and `--loss_chunk_tokens` take comma-separated lists, and every layout is measured with every pair, so
one call gives the whole table a GPU's MFU is read from, e.g. GPT-2 small in bfloat16:

    python -m benchmarks.layers --config experiments/gpt2_small.py --n_layer 12 --batch_size 16 --steps 10 \
        --layouts unrolled:none,scan:none,scan:dots_saveable --attention xla,cudnn --loss_chunk_tokens 0,1024

Nothing is asserted: the numbers are for reading (see README, Speed).
"""

import itertools
import json
import re
import time

import jax
from absl import flags

from gptjax import cli, hardware, kernels
from gptjax import train_step as steps_lib
from gptjax.configs import build_model_config, load_config_file
from gptjax.errors import exit_on_user_error
from gptjax.scaling import flops_per_token

LAYOUTS = [(False, "none"), (False, "full"), (False, "dots_saveable"), (True, "none"), (True, "full"),
           (True, "dots_saveable")]


def compile_and_measure(config, scan_layers: bool, remat: str, batch_size: int, steps: int,
                        peak_flops: float = 0.0) -> dict:
    """Compile seconds, XLA's memory plan and (with steps > 0) tokens/s, and MFU against `peak_flops` (all devices),
    of the train step in one layout."""
    config.model.update(scan_layers=scan_layers, remat=remat)
    cfg = build_model_config(config.model)
    loss_chunk = kernels.loss_chunk_tokens(config.train.loss_chunk_tokens)
    optimizer = steps_lib.make_optimizer(config.train, 1000)
    mesh = steps_lib.data_mesh()
    abstract_state = jax.eval_shape(lambda: steps_lib.create_train_state(cfg, optimizer, seed=0))
    sharding = steps_lib.replicated_sharding(abstract_state, mesh)
    step = steps_lib.make_train_step(cfg, optimizer, mesh, sharding, seed=0, donate=False,
                                     loss_chunk=loss_chunk)
    T = config.data.seq_len
    batch_shape = jax.ShapeDtypeStruct((1, batch_size, T + 1), jax.numpy.int32)
    start = time.perf_counter()
    compiled = step.lower(abstract_state, batch_shape).compile()
    result = {"layout": ("scan" if scan_layers else "unrolled") + f", remat={remat}",
              "attention": kernels.attention_kernel(config.model.attention), "loss_chunk_tokens": loss_chunk,
              "compile_seconds": time.perf_counter() - start}
    memory = compiled.memory_analysis()
    if memory is not None:  # some backends have no memory plan to show
        result["temp_MiB"] = memory.temp_size_in_bytes / 2 ** 20
        result["arguments_MiB"] = memory.argument_size_in_bytes / 2 ** 20
    if steps:
        state = jax.jit(lambda: steps_lib.create_train_state(cfg, optimizer, seed=0), out_shardings=sharding)()
        batch = jax.random.randint(jax.random.key(0), batch_shape.shape, 0, cfg.vocab_size)
        state, metrics = compiled(state, batch)  # warm
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        result["tokens_per_second"] = steps * batch_size * T / (time.perf_counter() - start)
        result["mfu"] = result["tokens_per_second"] * flops_per_token(cfg, T) / peak_flops
    return result


def main(argv=None) -> dict:
    args = flags.FlagValues()
    flags.DEFINE_string("config", "experiments/m1.py", "experiment file whose shape is measured", flag_values=args)
    flags.DEFINE_integer("n_layer", 24, "override model.n_layer", flag_values=args)
    flags.DEFINE_integer("batch_size", 16, "sequences per step", flag_values=args)
    flags.DEFINE_integer("steps", 0, "also time this many steps per layout", flag_values=args)
    flags.DEFINE_string("layouts", "all", "'all', or e.g. 'unrolled:none,scan:full'", flag_values=args)
    flags.DEFINE_string("attention", None, "model.attention values, e.g. 'xla,cudnn' (default: the config's)",
                        flag_values=args)
    flags.DEFINE_string("loss_chunk_tokens", None, "train.loss_chunk_tokens values, e.g. '0,1024' (default: the "
                        "config's)", flag_values=args)
    flags.DEFINE_string("dtype", None, "override model.dtype (float32 / bfloat16)", flag_values=args)
    cli.parse_own_flags(args, argv, __doc__.splitlines()[0])
    with exit_on_user_error():
        cli.require(args.n_layer > 0 and args.batch_size > 0 and args.steps >= 0,
                    "--n_layer and --batch_size must be positive and --steps at least 0")
        config = load_config_file(args.config)
        config.model.n_layer = args.n_layer
        if args.dtype:
            config.model.dtype = args.dtype  # checked with the rest of the model by build_model_config
        parts = [part.split(":") for part in args.layouts.split(",")]
        cli.require(args.layouts == "all" or all(len(p) == 2 and p[0] in ("unrolled", "scan") for p in parts),
                    f"--layouts={args.layouts!r} is not 'all' or a list like 'unrolled:none,scan:full'")
        layouts = LAYOUTS if args.layouts == "all" else [(p[0] == "scan", p[1]) for p in parts]
        loss_chunks = (args.loss_chunk_tokens or str(config.train.loss_chunk_tokens)).split(",")
        cli.require(all(re.fullmatch(r"-?\d+", n) and int(n) >= -1 for n in loss_chunks),
                    f"--loss_chunk_tokens={args.loss_chunk_tokens} must be whole numbers >= -1 (-1 auto, 0 plain loss)")
        loss_chunks = [int(n) for n in loss_chunks]
        attentions = args.attention.split(",") if args.attention else [config.model.attention]
        # A bad kernel name or remat policy is one line before anything compiles, not after part of a long sweep.
        for attention in attentions:
            config.model.attention = attention
            build_model_config(config.model)
        for scan, remat in layouts:
            config.model.update(scan_layers=scan, remat=remat)
            build_model_config(config.model)
        # Once for every layout, so that all MFUs share one denominator (on a CPU the peak is measured).
        peak_flops = jax.device_count() * hardware.peak_flops_per_device(
            config.model.dtype, config.train.peak_flops)[0] if args.steps else 0.0
        results = []
        for attention, loss_chunk in itertools.product(attentions, loss_chunks):
            config.model.attention, config.train.loss_chunk_tokens = attention, loss_chunk
            results += [compile_and_measure(config, scan, remat, args.batch_size, args.steps, peak_flops)
                        for scan, remat in layouts]
    report = {"config": args.config, "n_layer": args.n_layer, "batch_size": args.batch_size,
              "device": jax.devices()[0].device_kind, "layouts": results}
    for r in results:
        print(f"{r['layout']:<28} {r['attention']:>7} loss chunk {r['loss_chunk_tokens']:>4} | compile "
              f"{r['compile_seconds']:6.1f} s | temp {r.get('temp_MiB', float('nan')):8.1f} MiB | arguments "
              f"{r.get('arguments_MiB', float('nan')):7.1f} MiB"
              + (f" | {r['tokens_per_second']:,.0f} tokens/s, MFU {hardware.format_mfu(r['mfu'])}"
                 if "tokens_per_second" in r else ""))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
