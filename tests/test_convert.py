"""GPT-2 parity, offline: a small random Hugging Face GPT2LMHeadModel (PyTorch, CPU) converted to gptjax must give
the same logits and the same greedy continuation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import sampling
from gptjax.checkpoints import load_for_inference
from gptjax.convert import convert
from gptjax.errors import UserError
from gptjax.model import GPT
from tests.test_train import read_metrics, run_module, small_config

torch = pytest.importorskip("torch", reason="PyTorch is a test-only dependency: pip install -e .[test]")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger than the default init so the comparison is not of near-zero numbers
        for parameter in model.parameters():
            parameter.mul_(3.0)
    directory = str(tmp_path_factory.mktemp("hf-gpt2"))
    model.save_pretrained(directory)
    return model, directory


def test_converted_gpt2_matches_hugging_face(hf_gpt2, tmp_path):
    model, directory = hf_gpt2
    summary = convert(directory, str(tmp_path / "converted"))
    params, model_config, meta = load_for_inference(str(tmp_path / "converted"))
    assert meta["step"] == 0 and summary["model"]["pos_embedding"] == "learned"
    tokens = np.random.default_rng(0).integers(0, 50257, size=(3, 32))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(GPT(model_config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got[..., :50257], expected, atol=2e-5, rtol=1e-4)
    prompt = [464, 2068, 7586]
    with torch.no_grad():
        hf_greedy = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   pad_token_id=50256).numpy()[0, len(prompt):]
    ours = sampling.generate(params, model_config, prompt, jax.random.PRNGKey(0), max_new_tokens=12,
                             temperature=0.0, eos_id=-1)[0]
    np.testing.assert_array_equal(ours, hf_greedy)


def test_sample_and_fine_tune_from_a_converted_checkpoint(hf_gpt2, tmp_path):
    _, directory = hf_gpt2
    converted = str(tmp_path / "converted")
    result = run_module("gptjax.convert", f"--hf={directory}", f"--workdir={converted}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["model"]["n_layer"] == 2
    from gptjax.train import train_and_evaluate

    config = small_config(steps=3, init_from=converted)
    config.model.update(dict(max_len=32, n_layer=2, n_head=4, d_model=64, d_ff=256, pos_embedding="learned",
                             activation="gelu"))
    train_and_evaluate(config, str(tmp_path / "finetuned"), progress=False)
    first_loss = read_metrics(str(tmp_path / "finetuned"))[0]["loss"]
    fresh = small_config(steps=1)
    fresh.model.update(config.model.to_dict())
    train_and_evaluate(fresh, str(tmp_path / "fresh"), progress=False)
    assert first_loss != read_metrics(str(tmp_path / "fresh"))[0]["loss"]  # it really started from GPT-2's weights
    with pytest.raises(UserError, match="already has checkpoints"):
        convert(directory, converted)
    with pytest.raises(UserError, match="has neither model.safetensors nor pytorch_model.bin"):
        os.makedirs(tmp_path / "empty")
        with open(tmp_path / "empty" / "config.json", "w") as f:
            f.write("{}")
        convert(str(tmp_path / "empty"), str(tmp_path / "w"))
