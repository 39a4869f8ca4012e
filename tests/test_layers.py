"""model.scan_layers (nn.scan over stacked blocks) and model.remat (nn.remat): the unrolled model's numbers."""

import jax
import numpy as np
import pytest

from gptjax import checkpoints, sampling
from gptjax import train_step as steps_lib
from gptjax.configs import build_model_config, scan_layers_supported
from gptjax.convert import hf_state_dict
from gptjax.errors import UserError
from gptjax.model import GPT, ModelConfig, count_params, init_params, stack_blocks, unstack_blocks
from tests.test_train import read_metrics, small_config

CFG = ModelConfig(max_len=16, n_layer=3, n_head=2, d_model=32, d_ff=64)
needs_scan = pytest.mark.skipif(not scan_layers_supported(), reason="flax's nn.scan does not run on this jax (0.5.0)")
VARIANTS = [(False, "full"), (False, "dots_saveable"), *[pytest.param(True, remat, marks=needs_scan)
                                                         for remat in ("none", "full", "dots_saveable")]]


def unrolled_params():
    return GPT(CFG).init(jax.random.key(0), jax.numpy.zeros((1, 16), jax.numpy.int32))["params"]


def params_for(cfg: ModelConfig, params):
    return stack_blocks(params, cfg.n_layer) if cfg.scan_layers else params


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@needs_scan
def test_the_stacked_layout_is_the_unrolled_one_with_a_layer_axis():
    params = unrolled_params()
    scanned = GPT(CFG.replace(scan_layers=True)).init(jax.random.key(0), jax.numpy.zeros((1, 16), jax.numpy.int32))
    stacked = stack_blocks(params, CFG.n_layer)
    assert jax.tree.map(np.shape, scanned["params"]) == jax.tree.map(np.shape, stacked)
    assert scanned["params"]["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
    assert count_params(scanned["params"]) == count_params(params)
    assert_trees_close(unstack_blocks(stacked, CFG.n_layer), params, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers, remat", VARIANTS)
@pytest.mark.parametrize("loss_chunk", [0, 1024])  # the full logits, and the fused kernel CPUs use
def test_same_loss_and_gradients_as_the_unrolled_model(scan_layers, remat, loss_chunk):
    params = unrolled_params()
    batch = jax.random.randint(jax.random.key(1), (4, 17), 0, 50257)
    want_loss, want_grads = jax.value_and_grad(steps_lib.next_token_loss)(params, batch, GPT(CFG), None, loss_chunk)
    cfg = CFG.replace(scan_layers=scan_layers, remat=remat)
    loss, grads = jax.jit(jax.value_and_grad(steps_lib.next_token_loss), static_argnums=(2, 3, 4))(
        params_for(cfg, params), batch, GPT(cfg), None, loss_chunk)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_trees_close(unstack_blocks(grads, cfg.n_layer) if scan_layers else grads, want_grads)


@pytest.mark.slow
@needs_scan
def test_a_scanned_rematerialised_run_trains_like_the_unrolled_one():
    config = small_config()
    optimizer = steps_lib.make_optimizer(config.train, 10)
    mesh = steps_lib.data_mesh()
    batches = jax.random.randint(jax.random.key(2), (3, 1, 4, 17), 0, 50257)
    results = []
    for cfg in (CFG, CFG.replace(scan_layers=True, remat="full")):
        params = params_for(cfg, unrolled_params())
        state = steps_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                     opt_state=optimizer.init(params))
        sharding = steps_lib.replicated_sharding(state, mesh)
        step = steps_lib.make_train_step(cfg, optimizer, mesh, sharding, seed=0, donate=False)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, state.params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    assert_trees_close(results[0][1], unstack_blocks(results[1][1], CFG.n_layer), atol=1e-5)


@needs_scan
def test_the_scanned_kv_cache_decodes_the_same_tokens():
    params = unrolled_params()
    prompt = [464, 3797, 3332]
    want = sampling.generate(params, CFG, prompt, jax.random.key(0), max_new_tokens=20, top_k=1)
    cfg = CFG.replace(scan_layers=True)
    cache = sampling.empty_cache(cfg, 1)
    assert cache["blocks"]["attn"]["key"].shape == (3, 2, 16, 16)  # [n_layer, BN, max_len, H]: B 1 x N 2
    got = sampling.generate(stack_blocks(params, 3), cfg, prompt, jax.random.key(0), max_new_tokens=20, top_k=1)
    np.testing.assert_array_equal(got, want)  # 20 tokens: past the 16-token window, so the slide is covered too


def test_stacked_biases_and_norms_are_not_decayed():
    mask = steps_lib.weight_decay_mask(stack_blocks(unrolled_params(), 3))
    assert mask["blocks"]["attn"]["qkv"]["kernel"] and mask["blocks"]["mlp"]["fc"]["kernel"]
    assert not mask["blocks"]["attn"]["qkv"]["bias"] and not mask["blocks"]["ln_1"]["scale"]


def test_the_gpt2_export_reads_either_layout():
    cfg = CFG.replace(pos_embedding="learned", activation="gelu")
    params = GPT(cfg).init(jax.random.key(0), jax.numpy.zeros((1, 16), jax.numpy.int32))["params"]
    want = hf_state_dict(params, cfg)
    got = hf_state_dict(stack_blocks(params, 3), cfg.replace(scan_layers=True))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_checkpoint_of_the_other_layout_is_refused_and_remat_may_change():
    meta = {"config": {"model": {**small_config().model.to_dict(), "remat": "full"}}}
    here = small_config().model.to_dict()
    checkpoints.check_compatible(meta, here, "run")
    assert checkpoints.allowed_differences(meta, here) == ["model.remat='full' there, 'none' here"]
    with pytest.raises(UserError, match=r"another model shape \(model.scan_layers=False there, True here\)"):
        checkpoints.check_compatible(meta, {**here, "scan_layers": True}, "run")
    older = {"config": {"model": {k: v for k, v in here.items() if k not in ("scan_layers", "remat")}}}
    assert checkpoints.model_differences(older, here) == {}  # saved before the keys existed: the defaults


@pytest.mark.skipif(scan_layers_supported(), reason="checks the error shown where nn.scan cannot run (jax 0.5.0); "
                    "here it runs, so there is no error to check")
def test_scan_layers_is_one_line_where_flax_cannot_scan():
    with pytest.raises(UserError, match=r"model.scan_layers=true needs flax's nn.scan, which cannot run on jax 0.5.0 "
                                        r".*use model.scan_layers=false \(model.remat works without it\)"):
        build_model_config(small_config().model.to_dict() | {"scan_layers": True})


@pytest.mark.slow
@needs_scan
def test_the_layout_is_a_pure_layout_switch_and_a_scanned_run_samples(tmp_path):
    from gptjax.train import train_and_evaluate

    # Fresh runs from one seed: the same initial numbers (stacked), so the same losses, in either layout (remat
    # changes what is stored for the backward pass, not the numbers).
    runs = {}
    for scan_layers in (False, True):
        config = small_config(steps=3, checkpoint_every=3)
        config.model.update(scan_layers=scan_layers, remat="dots_saveable" if scan_layers else "none")
        train_and_evaluate(config, str(tmp_path / str(scan_layers)), progress=False)
        runs[scan_layers] = [m["loss"] for m in read_metrics(str(tmp_path / str(scan_layers)))]
    assert len(runs[True]) == 3
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)
    # The scanned run's checkpoint loads in its layout and samples.
    params, cfg, _ = checkpoints.load_for_inference(str(tmp_path / "True"))
    assert cfg.scan_layers and cfg.remat == "dots_saveable"
    assert params["blocks"]["mlp"]["fc"]["kernel"].shape == (2, 32, 64)
    tokens = sampling.generate(params, cfg, [50256], jax.random.key(0), max_new_tokens=5)
    assert tokens.shape == (1, 5)
    cfg = build_model_config(small_config().model)
    fresh = init_params(cfg.replace(scan_layers=True), jax.random.key(0))
    assert_trees_close(unstack_blocks(fresh, cfg.n_layer), init_params(cfg, jax.random.key(0)), 0, 0)
