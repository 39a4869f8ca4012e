import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import kernels
from gptjax.configs import build_model_config, load_config_file
from gptjax.errors import UserError
from gptjax.model import GPT, count_params, sinusoidal_positions
from gptjax.scaling import flops_per_token, param_count
from tests.conftest import REPO_ROOT

VARIATIONS = [
    dict(),  # the seed: sinusoidal, ReLU, biases, tied
    dict(pos_embedding="learned", activation="gelu"),  # GPT-2's layout
    dict(pos_embedding="rope"),
    dict(use_bias=False),
    dict(tie_embeddings=False),
    dict(dropout=0.1),
]


def init(cfg, batch=2, length=None, seed=0):
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length or cfg.max_len), 0, cfg.vocab_size)
    params = GPT(cfg).init(jax.random.key(seed), tokens)["params"]
    return params, tokens


def test_logits_shape_and_dtype(small_model_config):
    params, tokens = init(small_model_config, batch=3, length=10)
    logits = GPT(small_model_config).apply({"params": params}, tokens)
    assert logits.shape == (3, 10, 50304)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("overrides", VARIATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "seed")
def test_variation_runs_is_causal_and_counts_params(small_model_config, overrides):
    cfg = small_model_config.replace(**overrides)
    params, tokens = init(cfg)
    assert count_params(params) == param_count(cfg)
    logits = GPT(cfg).apply({"params": params}, tokens)
    assert np.isfinite(np.asarray(logits[..., : cfg.vocab_size])).all()
    # Changing tokens after position t must leave the logits at positions <= t untouched.
    t = 6
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
    logits_changed = GPT(cfg).apply({"params": params}, changed)
    np.testing.assert_allclose(logits[:, : t + 1], logits_changed[:, : t + 1], atol=1e-5)
    assert not np.allclose(logits[:, t + 1:], logits_changed[:, t + 1:], atol=1e-5)


def test_expected_param_counts_by_hand(small_model_config):
    D, F, V, L, T = 32, 64, 50304, 2, 16
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 2 * 2 * D
    seed = L * block + 2 * D + V * D
    assert param_count(small_model_config) == seed
    assert param_count(small_model_config.replace(pos_embedding="learned")) == seed + T * D
    assert param_count(small_model_config.replace(tie_embeddings=False)) == seed + D * V
    no_bias_block = D * 3 * D + D * D + D * F + F * D + 2 * D
    assert param_count(small_model_config.replace(use_bias=False)) == L * no_bias_block + D + V * D


def test_dropout_is_active_only_when_not_deterministic(small_model_config):
    cfg = small_model_config.replace(dropout=0.5)
    params, tokens = init(cfg)
    model = GPT(cfg)
    a = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
    c = model.apply({"params": params}, tokens)
    d = model.apply({"params": params}, tokens)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(c, d)


def test_sinusoidal_table_equals_formula():
    table = sinusoidal_positions(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i] == pytest.approx(np.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-6)


def test_padded_vocab_entries_have_zero_probability(small_model_config):
    params, tokens = init(small_model_config)
    # Make the padding rows of the (tied) embedding enormous: without the mask they would win every softmax.
    embedding = params["token_embedding"]["embedding"]
    params["token_embedding"]["embedding"] = embedding.at[50257:].set(100.0)
    logits = GPT(small_model_config).apply({"params": params}, tokens)
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(probs[..., 50257:].max()) == 0.0
    assert int(logits.argmax(-1).max()) < 50257


@pytest.mark.slow
def test_kv_cache_matches_full_forward(small_model_config):
    for overrides in ({}, {"pos_embedding": "rope"}, {"pos_embedding": "learned"}):
        cfg = small_model_config.replace(**overrides)
        params, tokens = init(cfg, length=12)
        model = GPT(cfg)
        full = model.apply({"params": params}, tokens)
        cache = model.init(jax.random.key(0), tokens[:, :1], decode=True)["cache"]
        prefill, state = model.apply({"params": params, "cache": cache}, tokens[:, :8], jnp.arange(8), decode=True,
                                     mutable=["cache"])
        np.testing.assert_allclose(prefill, full[:, :8], atol=1e-4)
        for t in range(8, 12):
            step, state = model.apply({"params": params, **state}, tokens[:, t:t + 1], jnp.arange(t, t + 1),
                                      decode=True, mutable=["cache"])
            np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,relative_error", [("float32", 1e-4), ("bfloat16", 0.1)])  # bfloat16 keeps ~3 digits
def test_attention_choices_give_the_same_model_gradients(small_model_config, dtype, relative_error):
    cfg = small_model_config.replace(dtype=dtype)
    params, tokens = init(cfg, batch=4)

    def loss(params, attention):
        logits = GPT(cfg.replace(attention=attention)).apply({"params": params}, tokens)
        return logits[..., :cfg.vocab_size].std()

    for got, want in zip(jax.tree.leaves(jax.grad(loss)(params, "chunked")),
                         jax.tree.leaves(jax.grad(loss)(params, "xla"))):
        assert np.abs(got - want).max() <= relative_error * np.abs(want).max()  # relative to each tensor's scale


def test_cudnn_attention_falls_back_to_xla_with_one_note_where_cudnn_cannot_run(small_model_config, capsys):
    """Here (no NVIDIA GPU) model.attention='cudnn' must say why it cannot run, once, and give XLA's numbers."""
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU with cuDNN may run the kernel: this checks the fallback")
    kernels._cudnn_fallbacks_reported.clear()  # the note is printed once per process: make this test see it
    cfg = small_model_config.replace(dtype="bfloat16")
    params, tokens = init(cfg, batch=2)
    logits = {attention: GPT(cfg.replace(attention=attention)).apply({"params": params}, tokens)
              for attention in ("cudnn", "xla")}
    np.testing.assert_array_equal(logits["cudnn"], logits["xla"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "model.attention='cudnn'" in line]
    assert len(notes) == 1, notes  # n_layer layers trace the kernel, the note is printed once
    assert "cannot run here" in notes[0] and "using XLA's attention instead" in notes[0]


def test_m1_is_about_20m_parameters_and_flops_follow():
    config = load_config_file(os.path.join(REPO_ROOT, "experiments/m1.py"))
    cfg = build_model_config(config.model)
    n = param_count(cfg)
    assert 18e6 <= n <= 22e6
    assert flops_per_token(cfg) == 6 * n + 12 * 8 * 256 * 256


def test_bad_model_configs_are_clear_errors():
    with pytest.raises(UserError, match="d_model=100 is not divisible by model.n_head=8"):
        build_model_config(dict(d_model=100, n_head=8))
    with pytest.raises(UserError, match="pos_embedding='alibi'"):
        build_model_config(dict(pos_embedding="alibi"))
    with pytest.raises(UserError, match=r"unknown model config key\(s\) \['n_layers'\]"):
        build_model_config(dict(n_layers=3))
    with pytest.raises(UserError, match="model.attention='flash' is not one of"):
        build_model_config(dict(attention="flash"))


@pytest.mark.parametrize("shape", [dict(n_layer=2, n_head=2, d_model=32, d_ff=64),
                                   dict(n_layer=4, n_head=4, d_model=128, d_ff=512),
                                   dict(n_layer=2, n_head=4, d_model=256, d_ff=1024, pos_embedding="learned",
                                        activation="gelu")], ids=["d32", "d128", "d256-gpt2-layout"])
def test_a_fresh_model_starts_near_log_vocab_on_random_tokens(shape):
    """Every initialiser is written out in model.py, so every stack starts from the same distribution (on jax 0.10.2
    and 0.12.1 the same numbers for the same key up to float rounding, compared by hand), and a fresh model's loss on
    uniformly random tokens is within a margin of log(50257) = 10.82, computed here from the logits in NumPy. (The
    tied embedding gives the input token a higher logit, so the start is above log(V) on random tokens and below it
    on text that repeats tokens: the first batch of Python 3.12's manual, 53% repeats, starts at 8.9.)"""
    from gptjax.model import ModelConfig, init_params

    cfg = ModelConfig(max_len=32, **shape)
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 33))
    logits = np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens[:, :-1])), np.float64)
    logits = logits[..., :cfg.vocab_size]  # (the padded rows are masked to -inf)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    loss = -np.take_along_axis(log_probs, tokens[:, 1:, None], -1).mean()
    assert np.log(cfg.vocab_size) - 0.1 < loss < np.log(cfg.vocab_size) + 1.0, loss
