"""Per-device memory of the train step: `python -m benchmarks.sharding [--config experiments/m1.py]`.

Compiles the real train step over all local devices, replicated and with train.sharding='fsdp', under every
train.parallelism the config accepts with each, and reports, per device, XLA's memory plan of the compiled step
(`Compiled.memory_analysis()`): the arguments (parameters, Adam moments, the batch rows) and the temporaries (what
the step allocates while it runs: gathered parameters, activations, gradients). Nothing runs, so a shape too big
to train here can still be planned. On a CPU, split it into devices first:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m benchmarks.sharding --n_layer 4 --d_model 512 \
        --seq_len 64 --batch_size 4

`--rows_per_device 1,4,16` compares replicated with fsdp at each of those batch sizes instead, as a table.

Nothing is asserted here; tests/test_sharding.py asserts fsdp's ratios from this module's numbers.
"""

import itertools
import json

import jax
from absl import flags

from gptjax import cli, kernels
from gptjax import train_step as steps_lib
from gptjax.configs import CHOICES, build_model_config, load_config_file, validate
from gptjax.errors import UserError, exit_on_user_error

MiB = 2 ** 20


def step_memory(config, sharding: str, parallelism: str) -> dict:
    """Per-device arguments and temporaries (MiB) of the config's train step, compiled for the local devices."""
    train = config.train
    cfg = build_model_config(config.model)
    optimizer = steps_lib.make_optimizer(train, 1000)
    mesh = steps_lib.data_mesh()
    abstract_state = jax.eval_shape(lambda: steps_lib.create_train_state(cfg, optimizer, seed=0))
    step = steps_lib.make_train_step(cfg, optimizer, mesh, steps_lib.state_sharding(abstract_state, mesh, sharding),
                                     seed=0, donate=True,
                                     loss_chunk=kernels.loss_chunk_tokens(train.loss_chunk_tokens),
                                     parallelism=parallelism)
    batch = jax.ShapeDtypeStruct((train.grad_accum_steps, train.batch_size // train.grad_accum_steps,
                                  config.data.seq_len + 1), jax.numpy.int32)
    memory = step.lower(abstract_state, batch).compile().memory_analysis()
    return {"sharding": sharding, "parallelism": parallelism,
            "arguments_MiB": memory.argument_size_in_bytes / MiB, "temp_MiB": memory.temp_size_in_bytes / MiB}


def rows_sweep(config, rows_per_device=(1, 4, 16)) -> list[dict]:
    """Replicated (shard_map) against fsdp (jit), per device, at each number of batch rows per device: does fsdp's
    step stay smaller as the batch grows? One row per batch size, with fsdp's ratios to replicated."""
    table = []
    for rows in rows_per_device:
        config.train.update(batch_size=rows * jax.device_count() * config.train.grad_accum_steps)
        replicated = step_memory(config, "replicated", "shard_map")
        fsdp = step_memory(config, "fsdp", "jit")
        table.append({"rows_per_device": rows, "replicated": replicated, "fsdp": fsdp,
                      "temp_vs_replicated": fsdp["temp_MiB"] / replicated["temp_MiB"],
                      "total_vs_replicated": (fsdp["arguments_MiB"] + fsdp["temp_MiB"])
                      / (replicated["arguments_MiB"] + replicated["temp_MiB"])})
    return table


def print_sweep(table: list[dict]) -> None:
    print("| rows per device | replicated: arguments + temporaries | fsdp: arguments + temporaries "
          "| fsdp temporaries / replicated | fsdp total / replicated |")
    print("|---|---|---|---|---|")
    for row in table:
        r, f = row["replicated"], row["fsdp"]
        print(f"| {row['rows_per_device']} | {r['arguments_MiB']:,.0f} + {r['temp_MiB']:,.0f} MiB "
              f"| {f['arguments_MiB']:,.0f} + {f['temp_MiB']:,.0f} MiB | {row['temp_vs_replicated']:.2f}x "
              f"| {row['total_vs_replicated']:.2f}x |")


def main(argv=None) -> dict:
    args = flags.FlagValues()
    flags.DEFINE_string("config", "experiments/m1.py", "experiment file whose shape is measured", flag_values=args)
    flags.DEFINE_integer("n_layer", None, "override model.n_layer", flag_values=args)
    flags.DEFINE_integer("d_model", None, "override model.d_model (and d_ff = 4 d_model)", flag_values=args)
    flags.DEFINE_integer("seq_len", None, "override model.max_len and data.seq_len", flag_values=args)
    flags.DEFINE_integer("batch_size", 16, "global batch (sequences)", flag_values=args)
    flags.DEFINE_integer("accum", 1, "micro-batches per step (train.grad_accum_steps)", flag_values=args)
    flags.DEFINE_integer("loss_chunk_tokens", 0, "train.loss_chunk_tokens (default 0: the plain loss, as on a GPU)",
                         flag_values=args)
    flags.DEFINE_list("rows_per_device", None, "Instead of --batch_size: replicated against fsdp at each of these "
                      "numbers of rows per device (e.g. 1,4,16), as a table", flag_values=args)
    cli.parse_own_flags(args, argv, __doc__.splitlines()[0])
    with exit_on_user_error():
        config = load_config_file(args.config)
        if args.n_layer:
            config.model.n_layer = args.n_layer
        if args.d_model:
            config.model.update(d_model=args.d_model, d_ff=4 * args.d_model)
        if args.seq_len:
            config.model.max_len = config.data.seq_len = args.seq_len
        config.train.update(batch_size=args.batch_size, grad_accum_steps=args.accum,
                            loss_chunk_tokens=args.loss_chunk_tokens)
        if args.rows_per_device:
            table = rows_sweep(config, [int(rows) for rows in args.rows_per_device])
            print_sweep(table)
            report = {"config": args.config, "devices": jax.device_count(), "rows_sweep": table}
            print(json.dumps(report))
            return report
        cli.require(args.batch_size % (args.accum * jax.device_count()) == 0,
                    f"--batch_size={args.batch_size} must split into --accum={args.accum} micro-batches of a multiple "
                    f"of the {jax.device_count()} devices")
        results = []
        for sharding, parallelism in itertools.product(CHOICES["train.sharding"], CHOICES["train.parallelism"]):
            config.train.update(sharding=sharding, parallelism=parallelism)
            try:  # every layout the config accepts; 'auto' is one of the others (train_step.resolve_parallelism)
                validate(config)
            except UserError:
                continue
            if parallelism != "auto":
                results.append(step_memory(config, sharding, parallelism))
    replicated = results[0]["arguments_MiB"] + results[0]["temp_MiB"]
    for r in results:
        r["total_vs_replicated"] = (r["arguments_MiB"] + r["temp_MiB"]) / replicated
        print(f"{r['sharding']:<10} {r['parallelism']:<9} | per device: arguments {r['arguments_MiB']:8.1f} MiB, "
              f"temporaries {r['temp_MiB']:8.1f} MiB | total {r['total_vs_replicated']:.2f}x replicated")
    report = {"config": args.config, "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
              "steps": results}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
