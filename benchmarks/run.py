"""The benchmark suite: `python -m benchmarks.run [--config experiments/m1.py] [--quick]`.

Measures on this machine, in one run, and prints a table and one JSON object:
- matmul peak FLOP/s (the roofline every ratio is taken against): the best of square matmuls of several sizes, timed
  taking turns with the training step, so that a busy moment of a shared machine cannot make the peak low and the
  MFU above 1 (if it still is, the report says so);
- training tokens/s and MFU of the real jitted `train_step` at the config's shape (on a CPU the batch defaults to 16
  sequences, as nanoGPT's CPU reference point);
- evaluation tokens/s;
- sampling tokens/s with the KV cache at batch 1 and 8 (and without it, for the ratio), and at batch 1 with the
  output layer in bfloat16, beside the memory roofline (bytes read per token over the measured read bandwidth);
- input pipeline tokens/s (tokenizing and reading the cache);
- with PyTorch installed, the same-shape Hugging Face GPT-2 (PyTorch) training step and `generate`, as references,
  timed taking turns with gptjax's so that both see the same load on a shared machine.
Random weights and tokens: speed does not depend on them. Runs unchanged on a GPU (bfloat16 if the config asks).
"""

import json

import jax
import jax.numpy as jnp
from absl import flags

from benchmarks import input_pipeline as input_bench
from benchmarks import sampling as sampling_bench
from gptjax import cli, hardware, kernels
from gptjax import train_step as steps_lib
from gptjax.configs import build_model_config, load_config_file
from gptjax.errors import exit_on_user_error
from gptjax.hardware import alternated
from gptjax.model import ModelConfig
from gptjax.scaling import flops_per_token


def timed(fn, repeats: int) -> float:
    """Seconds per call: one warm-up call (compilation), then the best of `repeats`."""
    return alternated({"fn": fn}, repeats)["fn"]


def make_train_step(config, batch_size: int, accum: int):
    """(cfg, state, jitted train step, a random batch [accum, batch / accum, T + 1]) at the config's shape."""
    cfg = build_model_config(config.model)
    config.train.batch_size, config.train.grad_accum_steps = batch_size, accum
    optimizer = steps_lib.make_optimizer(config.train, 1000)
    mesh = steps_lib.data_mesh()
    state = steps_lib.create_train_state(cfg, optimizer, seed=0)
    sharding = steps_lib.replicated_sharding(state, mesh)
    state = jax.device_put(state, sharding)
    step = steps_lib.make_train_step(cfg, optimizer, mesh, sharding, seed=0, donate=False,
                                     loss_chunk=kernels.loss_chunk_tokens(config.train.loss_chunk_tokens))
    T = config.data.seq_len
    batch = jax.random.randint(jax.random.key(0), (accum, batch_size // accum, T + 1), 0, cfg.vocab_size)
    return cfg, state, step, batch


def train_speed(train_setup, repeats: int, matmul_sizes=(1024, 2048, 3072), loss_chunk: int = 0) -> dict:
    """Training and evaluation speed of `make_train_step`'s (cfg, state, step, batch), and the matmul peak, timed
    taking turns with the training step; MFU is the ratio of the two. Evaluation uses `loss_chunk` as training does."""
    cfg, state, step, batch = train_setup
    accum, micro_batch, T = batch.shape[0], batch.shape[1], batch.shape[2] - 1
    matmuls = hardware.matmul_timers(cfg.compute_dtype, matmul_sizes)
    best = alternated({"step": lambda: step(state, batch), **matmuls}, repeats)
    seconds = best.pop("step")
    peak = hardware.peak_from_seconds(best) * jax.device_count()
    tokens = accum * micro_batch * T
    mesh = steps_lib.data_mesh()
    eval_step = steps_lib.make_eval_step(cfg, mesh, steps_lib.replicated_sharding(state.params, mesh),
                                         loss_chunk=loss_chunk)
    eval_batch = batch[0]
    eval_seconds = timed(lambda: eval_step(state.params, eval_batch, jnp.ones((eval_batch.shape[0],))), repeats)
    model_flops_per_second = tokens * flops_per_token(cfg, T) / seconds
    mfu = model_flops_per_second / peak
    return {"matmul_peak_flops_per_second": peak, "train_tokens_per_second": tokens / seconds,
            "train_step_seconds": seconds, "train_model_flops_per_second": model_flops_per_second,
            "mfu_vs_measured_matmul": mfu, "mfu": hardware.format_mfu(mfu),
            "eval_tokens_per_second": eval_batch.shape[0] * T / eval_seconds,
            "batch_size": accum * micro_batch, "grad_accum_steps": accum, "seq_len": T, "dtype": cfg.dtype}


def torch_reference(cfg: ModelConfig, batch_size: int, seq_len: int):
    """The same shape in Hugging Face's PyTorch GPT-2 (learned positions, GELU): its AdamW training step and its
    `generate(batch)`, as functions to time; None without PyTorch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
                                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))

    def train_step():
        model.train()
        loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def generate(batch: int, new_tokens: int):
        model.eval()
        with torch.no_grad():
            return model.generate(torch.full((batch, 1), 50256), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)

    return train_step, generate


def head_to_head(train_setup, rounds: int, new_tokens: int = 255) -> dict:
    """gptjax (`make_train_step`'s setup, already compiled for `train_speed`) against the PyTorch reference, taking
    turns: training steps on the same number of sequences, then generate at batch 1 and 8."""
    cfg, state, step, batch = train_setup
    batch_size, T = batch.shape[0] * batch.shape[1], batch.shape[2] - 1
    reference = torch_reference(cfg, batch_size, T)
    if reference is None:
        return {}
    torch_train_step, torch_generate = reference
    tokens = batch_size * T
    new_tokens = min(new_tokens, cfg.max_len - 1)  # HF's GPT-2 cannot go past its context; gptjax's window slides
    seconds = alternated({"gptjax": lambda: step(state, batch), "torch": torch_train_step}, rounds)
    results = {"head_to_head_train_tokens_per_second": tokens / seconds["gptjax"],
               "torch_train_tokens_per_second": tokens / seconds["torch"],
               "train_speed_vs_torch": seconds["torch"] / seconds["gptjax"]}
    for b in (1, 8):
        # At batch 1 also the opt-in bfloat16 output layer, in the same turns (so against the same torch runs).
        gptjax = {"float32": sampling_bench.greedy_generate(state.params, cfg, b, new_tokens)}
        if b == 1:
            gptjax["bfloat16"] = sampling_bench.greedy_generate(state.params, cfg, b, new_tokens, "bfloat16")
        # As many turns as training gets: with two, the batch-8 ratio of one unchanged decoding program moved
        # between 2.6x and 3.1x from run to run on a shared 2-core machine.
        seconds = alternated({**gptjax, "torch": lambda: torch_generate(b, new_tokens)}, rounds)
        results[f"torch_generate_tokens_per_second_batch{b}"] = b * new_tokens / seconds["torch"]
        results[f"sample_speed_vs_torch_batch{b}"] = seconds["torch"] / seconds["float32"]
        if b == 1:
            results["sample_speed_vs_torch_batch1_head_bfloat16"] = seconds["torch"] / seconds["bfloat16"]
    return results


def main() -> None:
    args = flags.FlagValues()
    flags.DEFINE_string("config", "experiments/m1.py", "experiment file whose shape is measured", flag_values=args)
    flags.DEFINE_integer("batch_size", None, "sequences per step (default: the config's on an accelerator, 16 on a "
                         "CPU)", flag_values=args)
    flags.DEFINE_integer("grad_accum_steps", None, "micro-batches per step (default: the config's on an "
                         "accelerator, 1 on a CPU)", flag_values=args)
    flags.DEFINE_string("dtype", None, "override model.dtype (float32 / bfloat16)", flag_values=args)
    flags.DEFINE_string("attention", None, "override model.attention (auto / xla / chunked / cudnn)", flag_values=args)
    flags.DEFINE_integer("loss_chunk_tokens", None, "override train.loss_chunk_tokens (0 = plain loss)",
                         flag_values=args)
    flags.DEFINE_integer("repeats", 3, "timed calls per measurement (the best counts)", flag_values=args)
    flags.DEFINE_integer("new_tokens", 255, "tokens each sampling measurement decodes", flag_values=args)
    flags.DEFINE_bool("quick", False, "skip the PyTorch reference and the input pipeline", flag_values=args)
    cli.parse_own_flags(args, None, __doc__.splitlines()[0])
    with exit_on_user_error():
        config = load_config_file(args.config)
        for name in ("batch_size", "grad_accum_steps", "repeats", "new_tokens"):
            value = getattr(args, name)
            cli.require(value is None or value >= 1, f"--{name}={value} must be >= 1")
        cli.require(args.loss_chunk_tokens is None or args.loss_chunk_tokens >= -1,
                    f"--loss_chunk_tokens={args.loss_chunk_tokens} must be >= -1 (-1 auto, 0 plain loss)")
        cli.require(args.dtype in (None, "float32", "bfloat16"), f"--dtype={args.dtype!r} is not float32 or bfloat16")
    run(config, args)


def run(config, args) -> None:
    if args.dtype:
        config.model.dtype = args.dtype
    if args.attention:
        config.model.attention = args.attention  # checked with the rest of the model by build_model_config below
    if args.loss_chunk_tokens is not None:
        config.train.loss_chunk_tokens = args.loss_chunk_tokens
    on_cpu = jax.default_backend() == "cpu"
    batch_size = args.batch_size or (16 if on_cpu else config.train.batch_size)
    accum = args.grad_accum_steps or (1 if on_cpu else config.train.grad_accum_steps)
    with exit_on_user_error():
        cli.require(batch_size % accum == 0,
                    f"--batch_size={batch_size} is not divisible by --grad_accum_steps={accum}")
        build_model_config(config.model)  # a bad shape or choice is one line, before anything compiles
    results = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "backend": jax.default_backend(),
               "config": args.config, "attention": kernels.attention_kernel(config.model.attention),
               "loss_chunk_tokens": kernels.loss_chunk_tokens(config.train.loss_chunk_tokens)}
    train_setup = make_train_step(config, batch_size, accum)  # compiled once, timed by both measurements
    results.update(train_speed(train_setup, args.repeats, (1024, 2048, 3072) if on_cpu else (4096, 8192),
                               kernels.eval_loss_chunk_tokens(config.train.loss_chunk_tokens)))
    if not args.quick and on_cpu:  # the reference is PyTorch's CPU build; it runs before TF's pipelines are used
        results.update(head_to_head(train_setup, rounds=max(4, args.repeats), new_tokens=args.new_tokens))
    results.update(sampling_bench.run(args.config, args.new_tokens, uncached_tokens=min(32, args.new_tokens)))
    if not args.quick:
        pipeline = input_bench.run()
        results.update({k: v for k, v in pipeline.items() if k.endswith(("per_second", "first_batch_seconds"))})
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:,.3f}" if isinstance(value, float) and abs(value) < 100 else (
            f"{value:,.0f}" if isinstance(value, float) else str(value))
        print(f"{key:<{width}}  {shown}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
