"""GPT-2 parity, offline: a small random Hugging Face GPT2LMHeadModel (PyTorch, CPU) converted to gptjax must give
the same logits and the same greedy continuation."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import kernels, sampling
from gptjax.checkpoints import load_for_inference
from gptjax.configs import load_config_file
from gptjax.convert import convert
from gptjax.errors import UserError
from gptjax.model import GPT
from gptjax.tokenizer import load_tokenizer
from gptjax.train import train_and_evaluate
from tests.conftest import run_command_forked
from tests.test_train import REPO_ROOT, read_metrics, small_config

pytestmark = pytest.mark.slow  # PyTorch models and training runs: `pytest -m "not slow"` skips them

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install -e \".[test,hf]\" (README, Tests)")
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


@pytest.fixture(scope="module")
def converted(hf_gpt2, tmp_path_factory):
    """hf_gpt2 converted once by the command, as README does it: (workdir, the summary it prints). Tests only read
    it; the one that trains in a converted workdir converts its own."""
    _, directory = hf_gpt2
    workdir = str(tmp_path_factory.mktemp("converted"))
    result = run_command_forked("gptjax.convert", f"--hf={directory}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir, json.loads(result.stdout.strip().splitlines()[-1])


def test_converted_gpt2_matches_hugging_face(hf_gpt2, converted):
    model, _ = hf_gpt2
    workdir, summary = converted
    params, model_config, meta = load_for_inference(workdir)
    assert meta["step"] == 0 and summary["model"]["pos_embedding"] == "learned"
    tokens = np.random.default_rng(0).integers(0, 50257, size=(3, 32))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(GPT(model_config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    # 1e-4: logits of magnitude ~1-3 from two float32 implementations (2e-5 failed once on the Apple stack's jax).
    np.testing.assert_allclose(got[..., :50257], expected, atol=1e-4, rtol=1e-4)
    prompt = [464, 2068, 7586]
    with torch.no_grad():
        hf_greedy = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   pad_token_id=50256).numpy()[0, len(prompt):]
    ours = sampling.generate(params, model_config, prompt, jax.random.key(0), max_new_tokens=12,
                             temperature=0.0, eos_id=-1)[0]
    np.testing.assert_array_equal(ours, hf_greedy)


def test_bfloat16_output_layer_keeps_the_greedy_tokens_of_a_converted_model(converted):
    params, model_config, _ = load_for_inference(converted[0])
    # Logits from the bfloat16 output layer, one row and several (two code paths), are float32's rounded.
    hidden_BxD = jax.random.normal(jax.random.key(0), (3, model_config.d_model))
    exact_BxV = kernels.head_logits(hidden_BxD, kernels.output_head(params, model_config))
    textbook_BxV = GPT(model_config).apply({"params": params}, hidden_BxD[:, None], method=GPT.output_logits)[:, 0]
    np.testing.assert_allclose(exact_BxV[:, :50257], textbook_BxV[:, :50257], rtol=1e-5, atol=1e-5)
    for rows in (1, 3):
        rounded_BxV = kernels.head_logits(hidden_BxD[:rows], kernels.output_head(params, model_config, "bfloat16"))
        np.testing.assert_allclose(rounded_BxV[:, :50257], exact_BxV[:rows, :50257], atol=0.05 * float(
            jnp.abs(exact_BxV[:, :50257]).max()))
    # Greedy decoding of 40 tokens (past the 32-token window), 8 random prompts, one sample and two: measured, the
    # first 12 tokens always agree (all 40 for 6 prompts); 8 are asserted.
    for prompt in np.random.default_rng(0).integers(0, 50257, size=(8, 3)).tolist():
        options = dict(max_new_tokens=40, temperature=0.0, eos_id=-1)
        exact = sampling.generate(params, model_config, prompt, jax.random.key(0), **options)[0]
        for samples in (1, 2):
            rounded = sampling.generate(params, model_config, prompt, jax.random.key(0), num_samples=samples,
                                        head_dtype="bfloat16", **options)
            np.testing.assert_array_equal(rounded[:, :8], np.tile(exact[:8], (samples, 1)))


def test_sample_and_fine_tune_from_a_converted_checkpoint(hf_gpt2, converted, tmp_path):
    _, directory = hf_gpt2
    converted, summary = converted
    assert summary["model"]["n_layer"] == 2

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


def test_the_readme_fine_tuning_recipe_runs_end_to_end(converted, tmp_path):
    # README: convert (the fixture runs the command), then gptjax.train --config experiments/gpt2_small.py
    # --config.train.init_from=... . That config computes in bfloat16 and this run adds dropout, while the converted
    # checkpoint is float32 without: neither changes the parameters, so both are allowed and said in one line.
    converted, finetuned = converted[0], str(tmp_path / "finetuned")
    shape = ["--config.model.max_len=32", "--config.model.n_layer=2", "--config.model.n_head=4",
             "--config.model.d_model=64", "--config.model.d_ff=256"]  # the small GPT-2 above
    result = run_command_forked("gptjax.train", "--config", "experiments/gpt2_small.py", f"--workdir={finetuned}",
                                f"--config.train.init_from={converted}", "--config.train.steps=2",
                                "--config.train.learning_rate=6e-5", "--config.model.dropout=0.1", *shape,
                                "--config.data.source=python_docs", "--config.train.batch_size=4",
                                "--config.train.grad_accum_steps=1", "--config.train.eval_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("note     | the checkpoint's parameters are used with model.dropout=0.0 there, 0.1 here; "
            "model.dtype='float32' there, 'bfloat16' here (these may change)") in result.stdout
    sample = run_command_forked("gptjax.sample", f"--workdir={finetuned}", "--prompt=The", "--max_new_tokens=5")
    assert sample.returncode == 0 and sample.stdout.startswith("The"), sample.stderr[-2000:]
    # Another shape is refused (in this process: the command's one-line form of a UserError is tested in
    # test_train.py's test_checkpoint_from_another_shape_is_a_clear_error).
    shape_change = load_config_file(os.path.join(REPO_ROOT, "experiments/gpt2_small.py"))
    shape_change.model.update(max_len=32, n_layer=2, n_head=4, d_model=64, d_ff=128)
    shape_change.data.source, shape_change.train.init_from = "python_docs", converted
    with pytest.raises(UserError, match=r"another model shape \(model.d_ff=256 there, 128 here\)"):
        train_and_evaluate(shape_change, str(tmp_path / "x"), progress=False)


def test_export_to_hugging_face_round_trips_with_equal_logits(hf_gpt2, converted, tmp_path):
    model, _ = hf_gpt2
    converted, exported = converted[0], str(tmp_path / "exported")
    result = run_command_forked("gptjax.convert", f"--workdir={converted}", f"--to_hf={exported}")
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    tokens = torch.tensor(np.random.default_rng(1).integers(0, 50257, size=(2, 32)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=1e-5)
    # The tokenizer travels with the weights: Hugging Face's own loaders take the directory as it is.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = "The tokenizer travels with the weights"
    assert hf_tokenizer(prompt)["input_ids"] == load_tokenizer()(prompt)["input_ids"]
    generator = transformers.pipeline("text-generation", model=exported)
    text = generator(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    prompt_ids = torch.tensor([hf_tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        greedy = reloaded.generate(prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=50256)
    assert text == hf_tokenizer.decode(greedy[0])
    again = run_command_forked("gptjax.convert", f"--workdir={converted}", f"--to_hf={exported}")
    assert again.returncode == 2 and "exists and is not an empty directory" in again.stderr  # nothing overwritten


def test_export_refuses_layouts_gpt2_cannot_express_and_names_the_flags_that_export(tmp_path, capsys):
    needed = "--config.model.pos_embedding=learned --config.model.activation=gelu"
    train_and_evaluate(small_config(steps=1), str(tmp_path / "run"), progress=False)  # sinusoidal positions, ReLU
    assert f"relu | Hugging Face export needs {needed}\n" in capsys.readouterr().out  # said in the plan, up front
    result = run_command_forked("gptjax.convert", f"--workdir={tmp_path / 'run'}", f"--to_hf={tmp_path / 'hf'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: GPT-2 cannot express this model (model.pos_embedding='sinusoidal', model.activation='relu'); a run "
        f"trained with {needed} exports to Hugging Face"]
    assert not (tmp_path / "hf").exists()
    config = small_config(steps=1)  # the advice taken: the flags as the command line would set them
    for flag in needed.split():
        key, value = flag.removeprefix("--config.model.").split("=")
        config.model[key] = value
    train_and_evaluate(config, str(tmp_path / "exportable"), progress=False)
    assert "gelu | exports to Hugging Face (GPT-2 layout)\n" in capsys.readouterr().out
    result = run_command_forked("gptjax.convert", f"--workdir={tmp_path / 'exportable'}", f"--to_hf={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True),
                                        ("reorder_and_upcast_attn", True), ("scale_attn_weights", False),
                                        ("tie_word_embeddings", False)])
def test_conversion_refuses_what_gptjax_would_compute_differently(hf_gpt2, tmp_path, key, value):
    _, directory = hf_gpt2
    edited = str(tmp_path / "edited")
    shutil.copytree(directory, edited)
    with open(os.path.join(edited, "config.json")) as f:
        hf_config = json.load(f)
    hf_config[key] = value
    with open(os.path.join(edited, "config.json"), "w") as f:
        json.dump(hf_config, f)
    if key == "activation_function":
        result = run_command_forked("gptjax.convert", f"--hf={edited}", f"--workdir={tmp_path / 'converted'}")
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
            f"error: {key}={value!r}"), result.stderr[-2000:]
    else:  # the same UserError, raised where the command's would be (a process costs seconds)
        with pytest.raises(UserError) as error:
            convert(edited, str(tmp_path / "converted"))
        assert str(error.value).startswith(f"{key}={value!r}") and "\n" not in str(error.value)
    assert not (tmp_path / "converted").exists()


def test_exact_gelu_converts_to_equal_logits_and_exports_back(tmp_path):
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # large pre-activations, where erf-GELU and tanh-GELU differ by ~1e-3
        for parameter in model.parameters():
            parameter.mul_(5.0)
    model.save_pretrained(str(tmp_path / "hf"))
    summary = convert(str(tmp_path / "hf"), str(tmp_path / "converted"))
    assert summary["model"]["activation"] == "gelu_exact"
    params, model_config, _ = load_for_inference(str(tmp_path / "converted"))
    tokens = np.random.default_rng(0).integers(0, 50257, size=(2, 16))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(GPT(model_config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got[..., :50257], expected, atol=1e-4, rtol=1e-4)
    tanh = np.asarray(GPT(model_config.replace(activation="gelu")).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(tanh[..., :50257] - expected).max() > 1e-3  # the approximation would not have passed
    from gptjax.convert import export_to_hf

    export_to_hf(str(tmp_path / "converted"), str(tmp_path / "exported"))
    with open(tmp_path / "exported" / "config.json") as f:
        assert json.load(f)["activation_function"] == "gelu"


def test_a_converted_checkpoint_holds_parameters_only_and_trains_in_place(hf_gpt2, tmp_path):

    _, directory = hf_gpt2
    converted = str(tmp_path / "converted")
    convert(directory, converted)
    step_dir = os.path.join(converted, "checkpoints", "0")
    assert "params" in os.listdir(step_dir) and "opt_state" not in os.listdir(step_dir), os.listdir(step_dir)
    # Training in the converted workdir itself resumes its step 0 with a fresh optimizer.
    config = small_config(steps=2)
    config.model.update(dict(max_len=32, n_layer=2, n_head=4, d_model=64, d_ff=256, pos_embedding="learned",
                             activation="gelu"))
    result = train_and_evaluate(config, converted, progress=False)
    assert result["step"] == 2 and "opt_state" in os.listdir(os.path.join(converted, "checkpoints", "2"))
    assert os.path.isdir(step_dir) and not os.path.exists(os.path.join(converted, "checkpoints_damaged"))


@pytest.fixture(scope="module")
def hf_small_vocabulary(tmp_path_factory):
    """A GPT-2-layout model with its own 1,000-token byte-level BPE (trained here on the Python docs), saved with
    its tokenizer as save_pretrained writes them: (directory, tokenizer)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    directory = str(tmp_path_factory.mktemp("hf-small-vocabulary"))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, tokenizer


def test_a_model_with_its_own_vocabulary_converts_samples_and_exports_with_its_own_tokenizer(hf_small_vocabulary,
                                                                                          tmp_path):
    directory, tokenizer = hf_small_vocabulary
    assert len(tokenizer) == 1000 and tokenizer.get_vocab() != load_tokenizer("gpt2").get_vocab()
    workdir = str(tmp_path / "converted")
    result = run_command_forked("gptjax.convert", f"--hf={directory}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    copied = os.path.join(workdir, "tokenizer")  # a copy: the run does not depend on where the download lies
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokenizer"] == copied
    _, model_config, meta = load_for_inference(workdir)
    assert model_config.vocab_size == 1000 and meta["tokenizer"] == meta["config"]["data"]["tokenizer"] == copied
    assert transformers.AutoTokenizer.from_pretrained(copied).get_vocab() == tokenizer.get_vocab()
    # Sampling encodes the prompt and decodes the sample with the model's own tokenizer: ids within its vocabulary.
    sampled = run_command_forked("gptjax.sample", f"--workdir={workdir}", "--prompt=def f(x):", "--max_new_tokens=8",
                                 "--temperature=0")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    ids = tokenizer.encode(sampled.stdout)
    assert sampled.stdout.startswith("def f(x):") and max(ids) < 1000
    exported = str(tmp_path / "exported")
    result = run_command_forked("gptjax.convert", f"--workdir={workdir}", f"--to_hf={exported}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert transformers.AutoTokenizer.from_pretrained(exported).get_vocab() == tokenizer.get_vocab()
    assert transformers.GPT2LMHeadModel.from_pretrained(exported).config.vocab_size == 1000


@pytest.mark.parametrize("mistake", ["no tokenizer", "a tokenizer larger than the model's vocabulary"])
def test_a_model_without_a_tokenizer_that_fits_it_is_refused_in_one_line(hf_small_vocabulary, tmp_path, mistake):
    directory, tokenizer = hf_small_vocabulary
    broken = str(tmp_path / "hf")
    shutil.copytree(directory, broken)
    with open(os.path.join(broken, "config.json")) as f:
        hf_config = json.load(f)
    if mistake == "no tokenizer":
        for name in os.listdir(broken):
            if name not in ("config.json", "model.safetensors", "generation_config.json"):
                os.remove(os.path.join(broken, name))
        expected = (f"error: {broken} holds no tokenizer (none of tokenizer.json, vocab.json, tokenizer_config.json, "
                    f"tokenizer.model) and its model's vocab_size=1000 is not GPT-2's 50257")
    else:
        torch.manual_seed(0)
        hf_config["vocab_size"] = 500
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**{
            k: hf_config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id",
                                      "eos_token_id")})).save_pretrained(broken)
        expected = (f"error: the tokenizer in {broken} has 1000 tokens but the model's vocab_size is 500: its ids "
                    f"would index past the model's vocabulary")
    workdir = tmp_path / "converted"
    result = run_command_forked("gptjax.convert", f"--hf={broken}", f"--workdir={workdir}")
    assert result.returncode == 2 and result.stderr.strip().startswith(expected), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not workdir.exists()
