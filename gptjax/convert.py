"""`python -m gptjax.convert --hf DIR --workdir OUT`: a Hugging Face GPT-2 checkpoint as a gptjax checkpoint, and
`python -m gptjax.convert --workdir RUN --to_hf DIR`: a gptjax run back as a Hugging Face GPT-2 directory.

DIR is what `GPT2LMHeadModel.save_pretrained` writes: config.json plus model.safetensors (or pytorch_model.bin,
which needs PyTorch). The result is an ordinary gptjax workdir at step 0: `gptjax.sample` and `gptjax.evaluate`
read it, and `gptjax.train --config.train.init_from=OUT` fine-tunes from it. Export writes the latest checkpoint
(or --step) of a run with GPT-2's layout (learned positions, GELU, biases, tied output) so that
`GPT2LMHeadModel.from_pretrained(DIR)` loads it; other layouts (sinusoidal or rotary positions, ReLU) are refused.

GPT-2 stores its linear layers as Conv1D with weights [in, out], which is exactly a Flax Dense kernel, so every tensor
maps over unchanged; only the embedding is padded from 50257 to 50304 rows (the padding is never predicted).
"""

import json
import os

import jax
import numpy as np
from absl import flags

from gptjax import checkpoints, cli
from gptjax.configs import base_config, build_model_config
from gptjax.errors import UserError, check_workdir
from gptjax.model import ModelConfig, count_params, init_params, stack_blocks, unstack_blocks
from gptjax.tokenizer import END_OF_TEXT_ID, load_tokenizer


# Hugging Face's activation_function names -> gptjax's model.activation.
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
# GPT2Config switches that change the logits and that gptjax's model does not have, with the value it computes as.
GPT2_FIXED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "scale_attn_weights": True,
              "tie_word_embeddings": True}


def gpt2_model_config(hf_config: dict) -> dict:
    """gptjax `model` keys for a Hugging Face GPT2Config: learned positions, GELU, biases, tied output. Anything
    gptjax cannot compute the same way is refused, naming the key, rather than converted into other logits."""
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise UserError(f"activation_function={activation!r} is not one of the GELUs gptjax computes "
                        f"({sorted(GPT2_ACTIVATIONS)}); gptjax converts GPT-2 models only")
    for key, value in GPT2_FIXED.items():
        if hf_config.get(key, value) != value:
            raise UserError(f"{key}={hf_config[key]!r} in config.json changes GPT-2's computation in a way gptjax's "
                            f"model does not have (it computes as {key}={value!r}), so the converted model would give "
                            f"other logits; convert a model with {key}={value!r}")
    return dict(vocab_size=hf_config["vocab_size"], max_len=hf_config["n_positions"], n_layer=hf_config["n_layer"],
                n_head=hf_config["n_head"], d_model=hf_config["n_embd"],
                d_ff=hf_config.get("n_inner") or 4 * hf_config["n_embd"], pos_embedding="learned",
                activation=GPT2_ACTIVATIONS[activation], use_bias=True, tie_embeddings=True, dropout=0.0,
                layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5))


# What tokenizer.save_pretrained writes (one of them is enough to load it).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "tokenizer.model")
GPT2_VOCAB_SIZE = END_OF_TEXT_ID + 1


def tokenizer_of(hf_dir: str, vocab_size: int):
    """The tokenizer that goes with the model in `hf_dir`: its own files where it has them (None where those are
    GPT-2's, which gptjax ships), else GPT-2's when the model has GPT-2's vocabulary size. Refuses in one line a
    tokenizer with more tokens than the model's vocabulary (its ids would index past it) and a model that comes
    with no tokenizer and another vocabulary size (nothing to encode its prompts or decode its samples with)."""
    if not any(os.path.exists(os.path.join(hf_dir, name)) for name in TOKENIZER_FILES):
        if vocab_size == GPT2_VOCAB_SIZE:
            return None
        raise UserError(f"{hf_dir} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}) and its model's "
                        f"vocab_size={vocab_size} is not GPT-2's {GPT2_VOCAB_SIZE}, so no tokenizer is known to go "
                        f"with it; save the model's tokenizer there (tokenizer.save_pretrained(DIR)) and convert again")
    tokenizer = load_tokenizer(os.path.abspath(hf_dir))
    if len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer in {hf_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{vocab_size}: its ids would index past the model's vocabulary; save the tokenizer the "
                        f"model was trained with beside it")
    return None if tokenizer.get_vocab() == load_tokenizer("gpt2").get_vocab() else tokenizer


def read_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
    """Tensor name -> float32 numpy array, with the 'transformer.' prefix of GPT2LMHeadModel removed."""
    safetensors_path = os.path.join(hf_dir, "model.safetensors")
    bin_path = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        from safetensors.numpy import load_file

        tensors = load_file(safetensors_path)
    elif os.path.exists(bin_path):
        try:
            import torch
        except ImportError:
            raise UserError(f"{bin_path} needs PyTorch to read; pip install torch, or save the model with "
                            f"safe_serialization=True") from None
        tensors = {k: v.float().numpy() for k, v in torch.load(bin_path, map_location="cpu").items()}
    else:
        raise UserError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin; pass the directory that "
                        f"GPT2LMHeadModel.save_pretrained wrote")
    return {k.removeprefix("transformer."): np.asarray(v, np.float32) for k, v in tensors.items()}


def gpt2_params(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """The gptjax parameter tree from GPT-2's tensors."""
    def take(name):
        if name not in state:
            raise UserError(f"the checkpoint has no tensor {name!r}; is it a GPT-2 model?")
        return state[name]

    embedding = np.zeros((cfg.padded_vocab_size, cfg.d_model), np.float32)
    embedding[: cfg.vocab_size] = take("wte.weight")
    params = {"token_embedding": {"embedding": embedding},
              "position_embedding": {"embedding": take("wpe.weight")},
              "ln_f": {"scale": take("ln_f.weight"), "bias": take("ln_f.bias")}}
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        params[f"blocks_{i}"] = {
            "ln_1": {"scale": take(h + "ln_1.weight"), "bias": take(h + "ln_1.bias")},
            "attn": {"qkv": {"kernel": take(h + "attn.c_attn.weight"), "bias": take(h + "attn.c_attn.bias")},
                     "proj": {"kernel": take(h + "attn.c_proj.weight"), "bias": take(h + "attn.c_proj.bias")}},
            "ln_2": {"scale": take(h + "ln_2.weight"), "bias": take(h + "ln_2.bias")},
            "mlp": {"fc": {"kernel": take(h + "mlp.c_fc.weight"), "bias": take(h + "mlp.c_fc.bias")},
                    "proj": {"kernel": take(h + "mlp.c_proj.weight"), "bias": take(h + "mlp.c_proj.bias")}},
        }
    return stack_blocks(params, cfg.n_layer) if cfg.scan_layers else params


def convert(hf_dir: str, workdir: str, scan_layers: bool = False) -> dict:
    """Writes the converted checkpoint (step 0) to `workdir`; returns a summary."""
    if not os.path.isdir(hf_dir):
        raise UserError(f"--hf {hf_dir!r} is not a directory; pass the directory that save_pretrained wrote")
    check_workdir(workdir)
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{config_path} does not exist; pass --hf the directory that save_pretrained wrote")
    with open(config_path) as f:
        hf_config = json.load(f)
    state = read_state_dict(hf_dir)
    missing = [k for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if k not in hf_config]
    if missing:
        raise UserError(f"{config_path} lacks {missing}; is it a GPT-2 config?")
    tokenizer = tokenizer_of(hf_dir, hf_config["vocab_size"])
    config = base_config()
    config.model.update(gpt2_model_config(hf_config))
    config.model.scan_layers = scan_layers
    config.data.seq_len = config.model.max_len
    model_config = build_model_config(config.model)

    params = gpt2_params(state, model_config)
    expected = jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: init_params(model_config, jax.random.key(0))))
    got = jax.tree.map(lambda x: x.shape, params)
    if expected != got:
        raise UserError(f"tensor shapes in {hf_dir} do not match its config.json")
    params = jax.tree.map(jax.numpy.asarray, params)
    manager = checkpoints.make_manager(workdir, async_save=False)
    if manager.all_steps():
        raise UserError(f"{checkpoints.checkpoint_dir(workdir)} already has checkpoints; pick an empty --workdir")
    if tokenizer is not None:  # a copy in the workdir: the run keeps working wherever hf_dir goes
        config.data.tokenizer = os.path.join(os.path.abspath(workdir), "tokenizer")
        tokenizer.save_pretrained(config.data.tokenizer)
    meta = {"step": 0, "config": config.to_dict(), "tokenizer": config.data.tokenizer,
            "data_position": None, "metrics": {}, "converted_from": os.path.abspath(hf_dir)}
    # Parameters only, from abstract shapes: a fine-tuning run starts its own optimizer (Adam's moments are not in a
    # Hugging Face checkpoint), and no train state is built here (for GPT-2 small: 1.8 GB of host memory, not 3.7).
    checkpoints.save(manager, 0, params, None, meta)
    manager.wait_until_finished()
    return {"workdir": os.path.abspath(workdir), "params": count_params(params), "model": config.model.to_dict(),
            "tokenizer": config.data.tokenizer}


# What a gptjax model must be for GPT-2 (and so Hugging Face's GPT2LMHeadModel) to express it.
# key -> the values GPT-2 has for it (the first: the one to train with).
GPT2_LAYOUT = {"pos_embedding": ("learned",), "activation": ("gelu", "gelu_exact"), "use_bias": (True,),
               "tie_embeddings": (True,)}


def flags_for_gpt2_layout(cfg: ModelConfig) -> list[str]:
    """The config flags a run of this model needs for `--to_hf` to export it (none: it exports), e.g.
    ['--config.model.pos_embedding=learned', '--config.model.activation=gelu'] for the default model."""
    return [f"--config.model.{key}={str(values[0]).lower()}" for key, values in GPT2_LAYOUT.items()
            if getattr(cfg, key) not in values]


def hf_state_dict(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """GPT-2's tensors from the gptjax parameter tree: `gpt2_params` read backwards (the output layer is tied)."""
    if cfg.scan_layers:
        params = unstack_blocks(params, cfg.n_layer)
    tensors = {"wte.weight": params["token_embedding"]["embedding"][: cfg.vocab_size],
               "wpe.weight": params["position_embedding"]["embedding"],
               "ln_f.weight": params["ln_f"]["scale"], "ln_f.bias": params["ln_f"]["bias"]}
    for i in range(cfg.n_layer):
        block, h = params[f"blocks_{i}"], f"h.{i}."
        for hf_name, (module, layer) in {"attn.c_attn": ("attn", "qkv"), "attn.c_proj": ("attn", "proj"),
                                         "mlp.c_fc": ("mlp", "fc"), "mlp.c_proj": ("mlp", "proj")}.items():
            tensors[h + hf_name + ".weight"] = block[module][layer]["kernel"]
            tensors[h + hf_name + ".bias"] = block[module][layer]["bias"]
        for norm in ("ln_1", "ln_2"):
            tensors[h + norm + ".weight"] = block[norm]["scale"]
            tensors[h + norm + ".bias"] = block[norm]["bias"]
    return {"transformer." + name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}


def export_to_hf(workdir: str, hf_dir: str, step: int | None = None) -> dict:
    """Writes the run's checkpoint as config.json + model.safetensors for GPT2LMHeadModel.from_pretrained, with the
    run's tokenizer files beside them, so AutoTokenizer.from_pretrained(hf_dir) and pipeline("text-generation",
    model=hf_dir) load it offline."""
    from safetensors.numpy import save_file

    if os.path.exists(hf_dir) and (not os.path.isdir(hf_dir) or os.listdir(hf_dir)):
        raise UserError(f"--to_hf {hf_dir!r} exists and is not an empty directory; pass a new directory")
    params, cfg, meta = checkpoints.load_for_inference(workdir, step)
    needed = flags_for_gpt2_layout(cfg)
    if needed:
        other = [f"model.{key}={getattr(cfg, key)!r}" for key, values in GPT2_LAYOUT.items()
                 if getattr(cfg, key) not in values]
        raise UserError(f"GPT-2 cannot express this model ({', '.join(other)}); a run trained with "
                        f"{' '.join(needed)} exports to Hugging Face")
    tokenizer = load_tokenizer(meta["config"]["data"]["tokenizer"])  # the run's own, written beside the model
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(f"the run's tokenizer {meta['config']['data']['tokenizer']!r} has {len(tokenizer)} tokens, "
                        f"more than its model's vocab_size={cfg.vocab_size}; export a run trained with it")
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                 "n_positions": cfg.max_len, "n_ctx": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
                 "n_head": cfg.n_head, "n_inner": cfg.d_ff,
                 "activation_function": "gelu" if cfg.activation == "gelu_exact" else "gelu_new",
                 "layer_norm_epsilon": cfg.layer_norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                 "attn_pdrop": 0.0, "tie_word_embeddings": True, "bos_token_id": END_OF_TEXT_ID,
                 "eos_token_id": END_OF_TEXT_ID}
    os.makedirs(hf_dir, exist_ok=True)
    save_file(hf_state_dict(jax.device_get(params), cfg), os.path.join(hf_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    tokenizer.save_pretrained(hf_dir)
    return {"hf_dir": os.path.abspath(hf_dir), "step": meta["step"], "params": count_params(params)}


def main():
    hf, to_hf, workdir = flags.FLAGS.hf, flags.FLAGS.to_hf, flags.FLAGS.workdir
    cli.require((hf is None) != (to_hf is None), "pass either --hf DIR (Hugging Face -> gptjax) or --to_hf DIR "
                                                 "(gptjax -> Hugging Face), with --workdir")
    cli.require(hf or not flags.FLAGS.scan_layers, "--scan_layers goes with --hf (an export reads the layout from "
                                                   "the checkpoint)")
    print(json.dumps(convert(hf, workdir, flags.FLAGS.scan_layers) if hf
                     else export_to_hf(workdir, to_hf, flags.FLAGS.step)))


if __name__ == "__main__":
    flags.DEFINE_string("hf", None, "Hugging Face GPT-2 directory (config.json + model.safetensors) to import.")
    flags.DEFINE_string("to_hf", None, "Or: a new directory to export --workdir's checkpoint to, for Hugging Face.")
    flags.DEFINE_string("workdir", None, "The gptjax run: where --hf writes, or what --to_hf reads.", required=True)
    flags.DEFINE_integer("step", None, "With --to_hf: the checkpoint step to export (default: the latest).")
    flags.DEFINE_boolean("scan_layers", False, "With --hf: write the blocks stacked, for model.scan_layers=true runs.")
    cli.run(main)
