"""Sampling and evaluation: the KV-cache decoder against the full forward pass, the sampling filters, the command
lines on a real (tiny, freshly trained) checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import kernels, sampling
from gptjax.model import GPT, ModelConfig
from tests.conftest import run_command_forked
from tests.test_train import REPO_ROOT, read_metrics, run_module, small_config

CFG = ModelConfig(max_len=16, n_layer=2, n_head=2, d_model=32, d_ff=64)


@pytest.fixture(scope="module")
def params():
    # Large random weights make the next-token distribution peaked and varied, so greedy paths are informative.
    # The token embedding first goes from its N(0, 1/D) init to N(0, 0.02): 8 x the init would make it one-hot.
    p = GPT(CFG).init(jax.random.key(0), jnp.zeros((1, CFG.max_len), jnp.int32))["params"]
    p["token_embedding"]["embedding"] = p["token_embedding"]["embedding"] * 0.02 * np.sqrt(CFG.d_model)
    return jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, p)


def test_cached_greedy_equals_full_forward_greedy(params):
    prompt = [464, 2068, 7586, 21831]
    cached = sampling.generate(params, CFG, prompt, jax.random.key(0), max_new_tokens=12, temperature=0.0,
                               num_samples=2, chunk=5)
    reference = sampling.generate_greedy_uncached(params, CFG, prompt, 12, num_samples=2)
    np.testing.assert_array_equal(cached, reference)
    # ... and the uncached reference really is argmax of the model's full forward pass.
    tokens = np.array([prompt + list(reference[0, :3])])
    logits = GPT(CFG).apply({"params": params}, jnp.asarray(tokens))
    assert int(jnp.argmax(logits[0, -1])) == reference[0, 3]


def count_slides(monkeypatch) -> list[bool]:
    """Whether each call of the decoding loop that `generate` makes slides the window, as the calls come."""
    slides, decode_steps = [], sampling.decode_steps

    def counting_decode_steps(*args, slide, **options):
        slides.append(slide)
        return decode_steps(*args, slide=slide, **options)

    monkeypatch.setattr(sampling, "decode_steps", counting_decode_steps)
    return slides


def test_decoding_past_the_context_window_slides(params, monkeypatch):
    prompt = list(range(100, 130))  # longer than the 16-token window
    fitted, dropped = sampling.fit_prompt(prompt, CFG, eos_id=50256)
    assert dropped == 14 and fitted == prompt[14:]
    slides = count_slides(monkeypatch)
    out = sampling.generate(params, CFG, fitted, jax.random.key(1), max_new_tokens=40, temperature=0.0)
    assert out.shape == (1, 40)
    # The window is full from the start, so it slides at the first token, keeping 12, and at every 5th token after
    # (4 fill it again): 8 slides, every token equal to the uncached reference, whose rule is written out on its own.
    assert sum(slides) == 8
    np.testing.assert_array_equal(out, sampling.generate_greedy_uncached(params, CFG, fitted, 40))
    assert sampling.fit_prompt([], CFG, eos_id=50256) == ([50256], 0)


@pytest.mark.parametrize("pos_embedding", ["sinusoidal", "learned", "rope"])
def test_every_token_past_several_slides_equals_the_uncached_reference(pos_embedding, monkeypatch):
    cfg = CFG.replace(pos_embedding=pos_embedding)
    p = GPT(cfg).init(jax.random.key(1), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    embedding = p["token_embedding"]["embedding"]
    p["token_embedding"]["embedding"] = 0.02 * embedding / embedding.std()  # every kind's at GPT-2's N(0, 0.02)
    # Large block weights make predictions peaked and varied (a random model's greedy path soon repeats one token,
    # which any window rule would reproduce).
    p = jax.tree.map(lambda x: x * 12 if x.ndim == 2 and x.shape[0] < cfg.padded_vocab_size else x, p)
    prompt = [464, 2068, 7586]  # fills the 16-token window after 13 tokens, then slides at 14, 19, ..., 39: 6 slides
    slides = count_slides(monkeypatch)
    cached = sampling.generate(p, cfg, prompt, jax.random.key(0), max_new_tokens=40, temperature=0.0, num_samples=2,
                               chunk=5)
    reference = sampling.generate_greedy_uncached(p, cfg, prompt, 40, num_samples=2)
    assert sum(slides) == 6
    np.testing.assert_array_equal(cached, reference)
    assert len(set(reference[0].tolist())) >= 5 and len(set(reference[0, 20:].tolist())) >= 2  # a varied path


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_decoding_head_computes_the_models_own_logits(dtype, tie_embeddings):
    """kernels.head_logits over kernels.output_head (float32 layout, the default) against GPT.output_logits, the
    textbook path, for a float32 and a bfloat16 model, tied and untied, at 1 and 8 rows: the same logits up to float32
    summation order (a bfloat16 model's weights rounded as the model rounds them)."""
    cfg = CFG.replace(dtype=dtype, tie_embeddings=tie_embeddings)
    p = GPT(cfg).init(jax.random.key(2), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    for rows in (1, 8):
        hidden_BxD = jax.random.normal(jax.random.key(rows), (rows, cfg.d_model)).astype(cfg.compute_dtype)
        textbook_BxV = GPT(cfg).apply({"params": p}, hidden_BxD[:, None], method=GPT.output_logits)[:, 0]
        head_BxV = kernels.head_logits(hidden_BxD, kernels.output_head(p, cfg))
        np.testing.assert_allclose(head_BxV[:, :cfg.vocab_size], textbook_BxV[:, :cfg.vocab_size], rtol=1e-5,
                                   atol=1e-5)


def test_a_new_prompt_length_or_token_count_compiles_nothing_new(params, caplog):
    """Prompts are padded to a power of two and the token buffer holds a power-of-two number of windows, and the
    new tokens are sliced on the host: a second call with other lengths reuses every compiled program (a `sample`
    session, or a second command with the compilation cache, then compiles nothing)."""
    first = sampling.generate(params, CFG, [464, 2068, 7586], jax.random.key(0), max_new_tokens=12, chunk=5)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        second = sampling.generate(params, CFG, [464, 2068, 7586, 318], jax.random.key(0), max_new_tokens=9,
                                   chunk=5)
    compiled = [r.getMessage().splitlines()[0] for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == [], compiled
    assert first.shape == (1, 12) and second.shape == (1, 9)
    # The padded prompt changes nothing: the same tokens as the unpadded reference.
    np.testing.assert_array_equal(sampling.generate(params, CFG, [464, 2068, 7586], jax.random.key(0),
                                                    max_new_tokens=12, temperature=0.0),
                                  sampling.generate_greedy_uncached(params, CFG, [464, 2068, 7586], 12))


def test_a_decoding_step_updates_the_kv_cache_in_place_at_batch_1(params):
    # With a [B, N, S, H] cache, XLA's CPU compiler copied every layer's cache four times per step at batch 1 (a
    # size-1 axis that it removed from the attention dots but not from the cache update): decoding 1.2x slower.
    # Compiled here, the step's loop must copy no cache-shaped array (the entry may copy the caller's cache once).
    logits_BxV, cache = sampling.prefill(params, CFG, jnp.asarray([[464, 2068]]))
    state = sampling.DecodeState(tokens_BxL=jnp.zeros((1, CFG.max_len), jnp.int32), length=jnp.asarray(2),
                                 cache_position=jnp.asarray(2), logits_BxV=logits_BxV, cache=cache,
                                 done_B=jnp.zeros((1,), bool), rng=jax.random.key(0))
    hlo = sampling.decode_steps.lower(params, kernels.output_head(params, CFG), state, jnp.asarray(4),
                                      model_config=CFG, slide=False, temperature=0.0, top_k=0, top_p=1.0,
                                      eos_id=-1).compile().as_text()
    cache_shape = "f32[" + ",".join(map(str, cache["blocks_0"]["attn"]["key"].shape)) + "]"
    # Every computation but the entry (the loop body and what it calls), wherever the printer puts the entry.
    not_entry = [c for c in hlo.split("\n\n") if not c.lstrip().startswith("ENTRY")]
    copies = [line for c in not_entry for line in c.splitlines() if f"= {cache_shape}" in line and " copy(" in line]
    assert "while(" in hlo and not copies, copies[:2]


def test_first_argmax_is_jnp_argmax_with_ties_to_the_first():
    logits_BxV = jnp.round(jax.random.normal(jax.random.key(0), (16, 50304)) * 2)  # many ties for the best
    np.testing.assert_array_equal(jax.jit(kernels.first_argmax)(logits_BxV), jnp.argmax(logits_BxV, axis=-1))
    np.testing.assert_array_equal(jax.jit(kernels.argmax)(logits_BxV), jnp.argmax(logits_BxV, axis=-1))
    assert int(kernels.first_argmax(jnp.array([[1.0, 3.0, 3.0, 2.0]]))[0]) == 1


def test_top_k_never_leaves_the_k_best():
    logits = jax.random.normal(jax.random.key(0), (1, 1000))
    best = set(np.argsort(np.asarray(logits[0]))[-5:].tolist())
    draws = jax.vmap(lambda key: sampling.sample_logits(logits, key, 2.0, top_k=5))(
        jax.random.split(jax.random.key(1), 2000))
    assert set(np.asarray(draws).ravel().tolist()) == best  # all five appear, nothing else does


def test_top_p_never_leaves_the_nucleus():
    probs = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    draws = jax.vmap(lambda key: sampling.sample_logits(logits, key, 1.0, top_p=0.85))(
        jax.random.split(jax.random.key(2), 3000))
    assert set(np.asarray(draws).ravel().tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.1
    only_best = jax.vmap(lambda key: sampling.sample_logits(logits, key, 1.0, top_p=0.4))(
        jax.random.split(jax.random.key(3), 200))
    assert set(np.asarray(only_best).ravel().tolist()) == {0}


@pytest.mark.slow
def test_low_temperature_tends_to_greedy_and_seeds_reproduce(params):
    logits = jax.random.normal(jax.random.key(4), (8, 50304))
    greedy = sampling.sample_logits(logits, jax.random.key(5), temperature=0.0)
    cold = sampling.sample_logits(logits, jax.random.key(5), temperature=1e-4)
    hot = jax.vmap(lambda key: sampling.sample_logits(logits, key, temperature=5.0))(
        jax.random.split(jax.random.key(6), 4))
    np.testing.assert_array_equal(greedy, cold)
    assert not (np.asarray(hot) == np.asarray(greedy)[None]).all()
    a = sampling.generate(params, CFG, [1, 2, 3], jax.random.key(7), max_new_tokens=10, num_samples=3)
    b = sampling.generate(params, CFG, [1, 2, 3], jax.random.key(7), max_new_tokens=10, num_samples=3)
    c = sampling.generate(params, CFG, [1, 2, 3], jax.random.key(8), max_new_tokens=10, num_samples=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    from gptjax.train import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(small_config(steps=6, eval_every=6, checkpoint_every=6), workdir, progress=False)
    return workdir


@pytest.mark.slow
def test_sample_command_streams_text(trained_workdir, monkeypatch):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # python -X importtime: every import on stderr
    result = run_module("gptjax.sample", f"--workdir={trained_workdir}", "--prompt=The class statement",
                        "--max_new_tokens=20", "--temperature=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("The class statement") and len(result.stdout) > len("The class statement")
    # (A second call samples the same text: test_compiled_programs_are_kept_on_disk_unless_turned_off.)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time")}
    assert "gptjax.sampling" in imported and "tiktoken" in imported
    assert "transformers" not in imported and "torch" not in imported  # GPT-2's BPE by tiktoken: seconds saved
    monkeypatch.delenv("PYTHONPROFILEIMPORTTIME")
    many = run_command_forked("gptjax.sample", f"--workdir={trained_workdir}", "--prompt=", "--num_samples=3",
                              "--max_new_tokens=8", "--prompt_file=" + os.path.join(REPO_ROOT, "README.md"),
                              "--head_dtype=bfloat16")
    assert many.returncode == 0 and many.stdout.count("--- sample") == 3
    assert "keeping its last 16" in many.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--top_p=1.5"], "--top_p=1.5 must be in (0, 1]"),
    (["--temperature=-1"], "--temperature=-1.0 must be >= 0"),
    (["--top_k=60000"], "--top_k=60000 must be between 0"),
    (["--prompt_file=/no/such/file"], "cannot read --prompt_file"),
])
def test_bad_sample_options_are_one_line_errors(trained_workdir, args, message):
    result = run_command_forked("gptjax.sample", f"--workdir={trained_workdir}", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: " + message)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["gptjax.sample", "gptjax.evaluate"])
def test_a_step_without_a_checkpoint_lists_the_steps_there_are(trained_workdir, module):
    result = run_command_forked(module, f"--workdir={trained_workdir}", "--step=5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: there is no checkpoint for --step 5 in {trained_workdir}/checkpoints; its steps are [6] (leave "
        f"--step out for the latest)"]


@pytest.mark.slow
def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    for module in ("gptjax.sample", "gptjax.evaluate"):
        result = run_command_forked(module, f"--workdir={tmp_path}")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("error: no checkpoints in")


@pytest.mark.slow
def test_a_folder_of_runs_or_a_checkpoints_folder_points_at_the_run(trained_workdir, tmp_path):
    runs = tmp_path / "runs"  # as runs/ after the quickstart: a folder holding a run (and something that is not one)
    (runs / "notes").mkdir(parents=True)
    os.symlink(trained_workdir, runs / "tiny")
    result = run_command_forked("gptjax.sample", f"--workdir={runs}")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {runs} holds runs, not checkpoints; pass one of them as --workdir: {runs / 'tiny'}"]
    checkpoints_folder = os.path.join(trained_workdir, "checkpoints")
    result = run_command_forked("gptjax.evaluate", f"--workdir={checkpoints_folder}")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {checkpoints_folder} is the checkpoints folder of a run; pass the run itself: --workdir "
        f"{trained_workdir}"]


@pytest.mark.slow
def test_evaluate_equals_the_eval_loss_logged_in_training(trained_workdir, tmp_path):
    result = run_command_forked("gptjax.evaluate", f"--workdir={trained_workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    logged = read_metrics(trained_workdir)[-1]
    assert measured["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)
    assert measured["eval_perplexity"] == pytest.approx(np.exp(measured["eval_loss"]))
    assert 0 < measured["eval_bits_per_byte"] < measured["eval_loss"]
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        (tmp_path / "readme.txt").write_text(f.read(), encoding="utf-8")
    whole = json.loads(run_command_forked("gptjax.evaluate", f"--workdir={trained_workdir}", "--max_batches=0",
                                          "--source=text", f"--path={tmp_path / 'readme.txt'}", "--split=train")
                       .stdout.strip().splitlines()[-1])
    assert whole["source"] == "text" and whole["eval_tokens"] > 0


@pytest.mark.slow
def test_plot_draws_the_loss_curves(trained_workdir):
    from gptjax.plot import plot_metrics

    path = plot_metrics(trained_workdir)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_word_level_perplexity_divides_the_total_loss_by_the_words(trained_workdir, tmp_path):
    from pydoc_data.topics import topics

    from gptjax.tokenizer import load_tokenizer

    text = " ".join(topics["class"].split())  # word-tokenized, as WikiText: words separated by single spaces
    # README's WikiText command, on a file named as WikiText publishes its test split.
    (tmp_path / "wiki.test.tokens").write_text(text, encoding="utf-8")
    result = run_command_forked("gptjax.evaluate", f"--workdir={trained_workdir}", "--source=text",
                                f"--path={tmp_path / 'wiki.test.tokens'}", "--split=train", "--max_batches=0",
                                "--words")
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    tokenizer = load_tokenizer()
    predicted = tokenizer(text)["input_ids"][1: 1 + measured["eval_tokens"]]  # what the windows' targets cover
    assert measured["eval_words"] == len(tokenizer.decode(predicted).split())
    assert measured["eval_words"] < measured["eval_tokens"]  # BPE splits words
    assert measured["eval_word_perplexity"] == pytest.approx(
        np.exp(measured["eval_loss"] * measured["eval_tokens"] / measured["eval_words"]), rel=1e-9)


@pytest.mark.slow
def test_lambada_last_word_accuracy_counts_greedy_hits(trained_workdir, tmp_path):
    from gptjax.checkpoints import load_for_inference
    from gptjax.tokenizer import load_tokenizer

    params, model_config, _ = load_for_inference(trained_workdir)
    tokenizer = load_tokenizer()
    # Passages whose last word is the model's own greedy next word (hits), and the same with a word it never predicts.
    hits = []
    for sentence in read_documents_sentences():
        ids = tokenizer.encode(sentence)[-model_config.max_len + 1:]
        logits = GPT(model_config).apply({"params": params}, jnp.asarray([ids], jnp.int32))
        word = tokenizer.decode([int(logits[0, -1].argmax())])
        if word.startswith(" ") and word[1:].isalpha() and tokenizer.encode(word) == [int(logits[0, -1].argmax())]:
            hits.append(tokenizer.decode(ids) + word)
        if len(hits) == 3:
            break
    assert len(hits) == 3
    misses = [hits[0].rpartition(" ")[0] + " Zyzzyvaquux"]
    with open(tmp_path / "lambada.jsonl", "w", encoding="utf-8") as f:
        for text in hits + misses:
            f.write(json.dumps({"text": text}) + "\n")
    result = run_command_forked("gptjax.evaluate", f"--workdir={trained_workdir}",
                                f"--lambada={tmp_path / 'lambada.jsonl'}")
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["lambada_examples"] == 4 and measured["lambada_accuracy"] == 0.75
    (tmp_path / "one_word.jsonl").write_text(json.dumps({"text": "Hello"}) + "\n")
    bad = run_command_forked("gptjax.evaluate", f"--workdir={trained_workdir}",
                             f"--lambada={tmp_path / 'one_word.jsonl'}")
    assert bad.returncode == 2 and "line 1 has fewer than two words" in bad.stderr


def test_greedy_hits_read_only_the_word_positions_of_batches_of_any_length(params):
    """The LAMBADA scorer (padded to each batch's longest row, logits only where a word token is predicted) agrees
    with the full forward pass's greedy predictions, for words of 1 to 3 tokens, rows of many lengths and a last
    batch that is not full."""
    from gptjax.evaluate import greedy_hits

    # The full forward pass over a whole window, right-padded (one compilation): position t predicts token t + 1.
    forward = jax.jit(lambda p, tokens_1xS: GPT(CFG).apply({"params": p}, tokens_1xS))
    rng = np.random.default_rng(0)
    rows, lengths, expected = [], [], []
    for i in range(11):
        context = rng.integers(0, 50257, size=int(rng.integers(1, 12))).tolist()
        n = 1 + i % 3
        word = []
        for _ in range(n):  # the model's own greedy continuation: a hit ...
            window = np.zeros((1, CFG.max_len), np.int32)
            window[0, : len(context + word)] = context + word
            word.append(int(forward(params, window)[0, len(context + word) - 1].argmax()))
        if i % 4 == 3:  # ... or that word with its last token changed: a miss
            word[-1] = (word[-1] + 1) % 50257
        rows.append((context + word)[-CFG.max_len:])
        lengths.append(n)
        expected.append(i % 4 != 3)
    np.testing.assert_array_equal(greedy_hits(params, CFG, rows, lengths, batch_size=4), expected)


def read_documents_sentences():
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for sentence in topics[name].split(". "):
            if len(sentence.split()) > 6:
                yield " ".join(sentence.split())
