"""The input pipeline on real text (the Python reference manual that ships with Python), through the real
tf.data, TFDS and Hugging Face `datasets` code paths, fed local files."""

import importlib
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from pydoc_data.topics import topics

from gptjax import input_pipeline as ip
from gptjax import interrupts
from gptjax.configs import base_config
from gptjax.errors import UserError
from gptjax.tokenizer import END_OF_TEXT_ID, load_tokenizer

DOCUMENTS = [topics[name] for name in sorted(topics)][:24]  # 24 real English documents, ~40k tokens


class LocalWikiDocs(tfds.core.GeneratorBasedBuilder):
    """A tiny Wikipedia-shaped TFDS dataset (title, text) built from local real text: the real TFDS code path."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(DOCUMENTS[:10]):
            yield i, {"title": f"doc {i}", "text": text}


def make_config(**data):
    config = base_config()
    config.model.max_len = 32
    config.data.eval_fraction = 0.125  # every 8th document
    config.data.source = "text"
    for key, value in data.items():
        config.data[key] = value
    return config


def write_txt_corpus(directory, documents=DOCUMENTS):
    os.makedirs(directory, exist_ok=True)
    for i, text in enumerate(documents):
        with open(os.path.join(directory, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(directory, "*.txt")


def expected_stream(documents):
    tokenizer = load_tokenizer()
    ids = []
    for text in documents:
        ids += tokenizer(text, split_special_tokens=True)["input_ids"] + [END_OF_TEXT_ID]
    return np.array(ids)


def split_documents(documents, eval_fraction):
    train = [d for i, d in enumerate(documents) if not ip.is_validation_document(i, eval_fraction)]
    validation = [d for i, d in enumerate(documents) if ip.is_validation_document(i, eval_fraction)]
    return train, validation


@pytest.fixture
def txt_cache(tmp_path):
    config = make_config(path=write_txt_corpus(tmp_path / "corpus"), shard_tokens=5000)
    return config, ip.prepare(config, str(tmp_path / "work"), progress=False)


def test_cache_holds_every_token_in_order_with_eos_between_documents(txt_cache):
    config, cache = txt_cache
    train_docs, validation_docs = split_documents(DOCUMENTS, 0.125)
    assert len(validation_docs) == 3 and len(cache.manifest["splits"]["train"]) > 1  # several shards
    for split, docs in (("train", train_docs), ("validation", validation_docs)):
        stream = cache.stream(split)
        np.testing.assert_array_equal(stream.read(0, stream.num_tokens), expected_stream(docs))
    assert cache.manifest["documents"] == len(DOCUMENTS)


def test_windows_cover_the_stream_once_per_epoch(txt_cache):
    config, cache = txt_cache
    stream, seq_len = cache.stream("train"), 32
    num_windows = stream.num_windows(seq_len)
    windows = stream.windows(np.arange(num_windows), seq_len)
    assert windows.shape == (num_windows, seq_len + 1) and windows.dtype == np.int32
    every_token = stream.read(0, stream.num_tokens)
    # Inputs of consecutive windows tile the stream; each window's last token is the next window's first.
    np.testing.assert_array_equal(windows[:, :-1].reshape(-1), every_token[: num_windows * seq_len])
    np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])
    # One epoch of shuffled batches visits every window exactly once.
    batch_size = 4
    seen = np.concatenate([ip.batch_window_ids(step, batch_size, num_windows, seed=0)
                           for step in range(num_windows // batch_size)])
    assert len(set(seen.tolist())) == len(seen) == (num_windows // batch_size) * batch_size


def test_an_epochs_order_is_computed_once_not_once_per_batch(monkeypatch):
    # A Wikipedia-sized index (20M windows at context 256), no corpus needed: the order of windows is O(windows) to
    # compute, so computing it per batch would make every batch cost as much as the whole index.
    num_windows, batch_size = 20_000_000, 128
    computed = []

    def counted(n, seed, epoch):  # stands in for the O(n) order, cheaply: only how often it is asked for matters
        computed.append(epoch)
        return np.arange(batch_size * 1000)[::-1]  # as much of an order as 1000 batches read

    monkeypatch.setattr(ip, "shuffled_windows", counted)
    ip._kept_permutation.cache_clear()
    for step in range(1000):
        ip.batch_window_ids(step, batch_size, num_windows, seed=0)
    assert computed == [0]
    ip._kept_permutation.cache_clear()


def test_batches_straddling_an_epoch_keep_both_orders(txt_cache):
    config, cache = txt_cache
    num_windows = cache.stream("train").num_windows(32)
    ip._kept_permutation.cache_clear()
    first, second = ip.shuffled_windows(num_windows, 7, 0), ip.shuffled_windows(num_windows, 7, 1)
    boundary_step = num_windows // 3  # batch size 3 x that step crosses into epoch 1 when num_windows % 3 != 0
    ids = ip.batch_window_ids(boundary_step, 3, num_windows, seed=7)
    positions = np.arange(boundary_step * 3, boundary_step * 3 + 3)
    expected = [first[p] if p < num_windows else second[p - num_windows] for p in positions]
    np.testing.assert_array_equal(ids, expected)
    assert ip._kept_permutation.cache_info().currsize <= 2


def take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return np.stack(batches)


def test_batches_are_deterministic_and_seeded(txt_cache):
    config, cache = txt_cache
    stream = cache.stream("train")
    a = take(ip.train_batches(stream, 32, 8, seed=0), 5)
    b = take(ip.train_batches(stream, 32, 8, seed=0), 5)
    c = take(ip.train_batches(stream, 32, 8, seed=1), 5)
    assert a.shape == (5, 8, 33) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resume_continues_with_the_batch_it_would_have_seen(txt_cache):
    config, cache = txt_cache
    stream = cache.stream("train")
    num_windows = stream.num_windows(32)
    steps = num_windows // 8 + 4  # runs past the end of the first epoch
    straight = take(ip.train_batches(stream, 32, 8, seed=3), steps)
    resumed = take(ip.train_batches(stream, 32, 8, seed=3, start_step=steps - 6), 6)
    np.testing.assert_array_equal(straight[-6:], resumed)
    position = ip.data_position(steps, 8, num_windows)
    assert position["epoch"] == 1 and position["window_in_epoch"] == steps * 8 - num_windows


def test_two_processes_read_disjoint_halves_of_the_global_batch(txt_cache):
    config, cache = txt_cache
    stream = cache.stream("train")
    whole = take(ip.train_batches(stream, 32, 8, seed=0), 3)
    first = take(ip.train_batches(stream, 32, 8, seed=0, process_index=0, process_count=2), 3)
    second = take(ip.train_batches(stream, 32, 8, seed=0, process_index=1, process_count=2), 3)
    assert first.shape == (3, 4, 33)
    np.testing.assert_array_equal(np.concatenate([first, second], axis=1), whole)
    ids_0 = ip.batch_window_ids(0, 8, stream.num_windows(32), 0, ip.process_rows(8, 0, 2))
    ids_1 = ip.batch_window_ids(0, 8, stream.num_windows(32), 0, ip.process_rows(8, 1, 2))
    assert not set(ids_0.tolist()) & set(ids_1.tolist())


def test_validation_and_train_never_share_a_document(txt_cache):
    config, cache = txt_cache

    def documents_of(split):
        tokens = cache.stream(split).read(0, cache.num_tokens(split))
        return {tuple(doc) for doc in np.split(tokens, np.flatnonzero(tokens == END_OF_TEXT_ID) + 1) if len(doc)}

    train, validation = documents_of("train"), documents_of("validation")
    assert validation and train and not train & validation
    assert len(train) + len(validation) == len(set(DOCUMENTS))
    eval_windows = np.concatenate(list(ip.eval_batches(cache.stream("validation"), 32, batch_size=5)))
    assert len(eval_windows) == cache.stream("validation").num_windows(32)


def test_jsonl_parquet_and_blank_line_sources_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCUMENTS[:6]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"title": "t", "body": text}) + "\n")
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    with open(tmp_path / "docs.txt", "w", encoding="utf-8") as f:
        f.write("\n\n".join(re.sub(r"\n\s*\n", "\n", d.strip()) for d in docs))
    expected = expected_stream(docs)
    for path in ("docs.jsonl", "docs.parquet"):
        config = make_config(path=str(tmp_path / path), text_field="body", eval_fraction=0.0)
        stream = ip.prepare(config, str(tmp_path / f"work-{path}"), progress=False).stream("train")
        np.testing.assert_array_equal(stream.read(0, stream.num_tokens), expected)
    config = make_config(path=str(tmp_path / "docs.txt"), txt_documents="blank_lines", eval_fraction=0.0)
    cache = ip.prepare(config, str(tmp_path / "txt"), progress=False)
    assert cache.manifest["documents"] == 6


def test_hugging_face_datasets_path(tmp_path):
    docs = DOCUMENTS[:8]
    with open(tmp_path / "wiki.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    for streaming in (True, False):
        config = make_config(source="hf", name="json", path=str(tmp_path / "wiki.jsonl"), streaming=streaming,
                             eval_fraction=0.0)
        stream = ip.prepare(config, str(tmp_path / f"work{streaming}"), progress=False).stream("train")
        np.testing.assert_array_equal(stream.read(0, stream.num_tokens), expected_stream(docs))
    with pytest.raises(UserError, match="has no field 'article'"):
        ip.prepare(make_config(source="hf", name="json", path=str(tmp_path / "wiki.jsonl"), text_field="article"),
                   str(tmp_path / "bad"), progress=False)


def test_tfds_path_with_a_local_builder(tmp_path):
    config = make_config(source="tfds", name="local_wiki_docs", data_dir=str(tmp_path / "tfds"), eval_fraction=0.2)
    cache = ip.prepare(config, str(tmp_path / "work"), progress=False)
    tokenizer = load_tokenizer()
    train = cache.stream("train").read(0, cache.num_tokens("train"))
    validation = cache.stream("validation").read(0, cache.num_tokens("validation"))
    got = sorted(tokenizer.decode(d[:-1]) for d in np.split(np.concatenate([train, validation]),
                                                             np.flatnonzero(np.concatenate([train, validation])
                                                                            == END_OF_TEXT_ID) + 1) if len(d))
    assert got == sorted(DOCUMENTS[:10])
    with pytest.raises(UserError, match="has no feature 'body'"):
        ip.prepare(make_config(source="tfds", name="local_wiki_docs", data_dir=str(tmp_path / "tfds"),
                               text_field="body"), str(tmp_path / "w2"), progress=False)
    with pytest.raises(UserError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
        ip.prepare(make_config(source="tfds", name="no_such_dataset_xyz"), str(tmp_path / "w3"), progress=False)


def test_interrupted_prepare_resumes_and_matches_a_fresh_one(tmp_path):
    corpus = tmp_path / "corpus"
    pattern = write_txt_corpus(corpus)
    with open(corpus / "doc_999.txt", "wb") as f:  # sorts last: the run fails after writing earlier shards
        f.write(b"caf\xe9 in latin-1")
    config = make_config(path=pattern, shard_tokens=3000)
    with pytest.raises(UserError, match=r"doc_999.txt is not valid UTF-8 \(byte 3\)"):
        ip.prepare(config, str(tmp_path / "work"), progress=False)
    directory = ip.cache_directory(config.data, str(tmp_path / "work"))
    with open(os.path.join(directory, ip.MANIFEST)) as f:
        partial = json.load(f)
    # Everything before the bad file was kept; a rerun tokenizes only what is left.
    assert not partial["complete"] and partial["documents_done"] == len(DOCUMENTS)
    assert len(partial["splits"]["train"]) > 1
    with open(corpus / "doc_999.txt", "w", encoding="utf-8") as f:
        f.write("café, now in UTF-8")
    resumed = ip.prepare(config, str(tmp_path / "work"), progress=False)
    fresh = ip.prepare(config, str(tmp_path / "fresh"), progress=False)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(resumed.stream(split).read(0, resumed.num_tokens(split)),
                                      fresh.stream(split).read(0, fresh.num_tokens(split)))


def test_text_added_edited_or_removed_under_the_glob_is_tokenized_into_a_new_cache_and_said(tmp_path, capsys):
    pattern = write_txt_corpus(tmp_path / "corpus", DOCUMENTS[:6])
    config = make_config(path=pattern, eval_fraction=0.0)
    first = ip.prepare(config, str(tmp_path / "work"), progress=False)
    assert ip.prepare(config, str(tmp_path / "work"), progress=False).directory == first.directory  # unchanged: kept
    assert capsys.readouterr().out == ""
    corpus, caches = tmp_path / "corpus", [first]
    for change in ("add", "edit", "remove"):
        if change == "add":
            (corpus / "doc_100.txt").write_text(DOCUMENTS[10], encoding="utf-8")
        elif change == "edit":
            (corpus / "doc_001.txt").write_text(DOCUMENTS[1] + " And one more line.", encoding="utf-8")
        else:
            (corpus / "doc_100.txt").unlink()
        cache = ip.prepare(config, str(tmp_path / "work"), progress=False)
        assert cache.directory not in [c.directory for c in caches]
        what = {"add": "files 1 added: doc_100.txt", "edit": "files 1 changed: doc_001.txt",
                "remove": "files 1 removed: doc_100.txt"}[change]
        assert capsys.readouterr().out == (
            f"note     | text files {pattern!r} changed since it was tokenized into {caches[-1].directory} ({what}); "
            f"tokenizing it again, into {cache.directory}\n")
        caches.append(cache)
    expected = [DOCUMENTS[:6], DOCUMENTS[:6] + [DOCUMENTS[10]],
                [DOCUMENTS[0], DOCUMENTS[1] + " And one more line."] + DOCUMENTS[2:6] + [DOCUMENTS[10]],
                [DOCUMENTS[0], DOCUMENTS[1] + " And one more line."] + DOCUMENTS[2:6]]
    for cache, documents in zip(caches, expected):  # each cache holds the text as it was when tokenized
        np.testing.assert_array_equal(cache.stream("train").read(0, cache.num_tokens("train")),
                                      expected_stream(documents))


def test_a_new_tfds_version_is_a_new_cache_and_a_cache_from_before_versions_were_recorded_is_kept(
        tmp_path, capsys, monkeypatch):
    # A name without ':version' reads whatever version the installed tensorflow-datasets resolves it to.
    config = make_config(source="tfds", name="local_wiki_docs", data_dir=str(tmp_path / "tfds"), eval_fraction=0.0)
    workdir = str(tmp_path / "work")
    first = ip.prepare(config, workdir, progress=False)
    assert first.manifest["source"] == {"tfds_version": "1.0.0"}
    capsys.readouterr()  # (TFDS's own lines, preparing the dataset)
    assert ip.prepare(config, workdir, progress=False).directory == first.directory
    assert capsys.readouterr().out == ""

    # A cache tokenized before gptjax recorded versions (named without the version's hash; no "source" in its
    # manifest) is taken to be of the version read now, once, with a note: a Wikipedia cache is not tokenized again,
    # and checkpoints that name it still match.
    legacy = ip.unversioned_directory(config.data, workdir)
    os.rename(first.directory, legacy)
    manifest = json.loads((tmp_path / legacy / ip.MANIFEST).read_text())
    del manifest["source"]
    (tmp_path / legacy / ip.MANIFEST).write_text(json.dumps(manifest))
    assert ip.cache_directory(config.data, workdir) == legacy
    adopted = ip.prepare(config, workdir, progress=False)
    assert adopted.directory == legacy and adopted.fingerprint() == first.fingerprint()
    assert capsys.readouterr().out == (f"note     | {legacy} was tokenized before gptjax recorded dataset versions; it "
                                       f"is taken to be tfds_version 1.0.0, the one read now\n")
    assert json.loads((tmp_path / legacy / ip.MANIFEST).read_text())["source"] == {"tfds_version": "1.0.0"}

    # The builder moves on (another version, other text): another cache, said in one line, holding the new text.
    monkeypatch.setattr(LocalWikiDocs, "VERSION", tfds.core.Version("1.1.0"))
    monkeypatch.setattr(LocalWikiDocs, "_generate_examples",
                        lambda self: ((i, {"title": f"doc {i}", "text": t}) for i, t in enumerate(DOCUMENTS[10:14])))
    assert ip.cache_directory(config.data, workdir) != legacy
    newer = ip.prepare(config, workdir, progress=False)
    assert newer.directory not in (legacy, first.directory)
    assert (f"note     | tfds dataset 'local_wiki_docs' changed since it was tokenized into {legacy} (TFDS version "
            f"1.0.0 there, TFDS version 1.1.0 here); tokenizing it again, into {newer.directory}\n"
            ) in capsys.readouterr().out
    tokens = newer.stream("train").read(0, newer.num_tokens("train"))  # (TFDS orders examples by a hash of the key)
    documents = np.split(tokens, np.flatnonzero(tokens == END_OF_TEXT_ID) + 1)[:-1]
    assert sorted(load_tokenizer().decode(d[:-1]) for d in documents) == sorted(DOCUMENTS[10:14])


def test_a_hugging_face_builders_files_and_an_offline_hub_dataset(tmp_path, capsys, monkeypatch):
    # Local files read through `datasets` (data.name 'json') are fingerprinted as text files are.
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS[:4]), encoding="utf-8")
    config = make_config(source="hf", name="json", path=str(path), eval_fraction=0.0)
    first = ip.prepare(config, str(tmp_path / "work"), progress=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": DOCUMENTS[4]}) + "\n")
    second = ip.prepare(config, str(tmp_path / "work"), progress=False)
    assert second.directory != first.directory
    assert "(files 1 changed: wiki.jsonl)" in capsys.readouterr().out
    np.testing.assert_array_equal(second.stream("train").read(0, second.num_tokens("train")),
                                  expected_stream(DOCUMENTS[:5]))

    # A Hub dataset whose revision cannot be looked up (this machine is offline, and it is not in the Hugging Face
    # cache) uses the newest complete cache of its config, with a note, rather than failing to tokenize it again.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # (restored after the test: the lookup goes offline)
        monkeypatch.delenv(key, raising=False)
    for module in ("huggingface_hub.constants", "datasets.config"):
        monkeypatch.setattr(importlib.import_module(module), "HF_HUB_OFFLINE", False)
    hub = make_config(source="hf", name="gptjax-tests/no-such-dataset", eval_fraction=0.0)
    assert ip.source_fingerprint(hub.data) is None
    with pytest.raises(UserError, match="not in the local cache"):  # no cache either: the offline error line
        ip.prepare(hub, str(tmp_path / "hub"), progress=False)
    older = ip.unversioned_directory(hub.data, str(tmp_path / "hub")) + "-" + "0" * 12
    shutil.copytree(second.directory, older)  # a cache of that config, as if tokenized while online
    cache = ip.prepare(hub, str(tmp_path / "hub"), progress=False)
    assert cache.directory == older and ip.cache_directory(hub.data, str(tmp_path / "hub")) == older
    assert capsys.readouterr().out == (
        "note     | the revision of hf dataset 'gptjax-tests/no-such-dataset' cannot be looked up (offline, not in "
        f"the Hugging Face cache); using its newest token cache, {older}\n")


def test_a_stop_requested_in_one_handled_block_is_not_left_for_the_next_call(tmp_path):
    """A notebook: one call stopped by Ctrl-C inside `interrupts.handled()`; the next call that checks for a stop
    (tokenizing a corpus, which polls between batches) runs to the end."""
    with pytest.raises(interrupts.Interrupted), interrupts.handled():
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not interrupts.requested() and time.monotonic() < deadline:  # the watcher thread notes it
            time.sleep(0.01)
        interrupts.check()
    assert not interrupts.requested()
    cache = ip.prepare(make_config(path=write_txt_corpus(tmp_path / "corpus"), shard_tokens=300),
                       str(tmp_path / "work"), progress=False)
    assert cache.manifest["complete"] and cache.manifest["documents_done"] == len(DOCUMENTS)


def test_replace_mode_accepts_invalid_utf8(tmp_path):
    with open(tmp_path / "bad.txt", "wb") as f:
        f.write(b"caf\xe9 " * 40)
    config = make_config(path=str(tmp_path / "bad.txt"), utf8_errors="replace", eval_fraction=0.0)
    assert ip.prepare(config, str(tmp_path / "work"), progress=False).num_tokens("train") > 40


def test_python_docs_source_is_real_english():
    config = base_config()
    config.data.source = "python_docs"
    documents = list(ip.documents_dataset(config.data).take(3).as_numpy_iterator())
    assert len(documents) == 3 and all(b" the " in d for d in documents)


@pytest.mark.parametrize("data, message", [
    (dict(path="/no/such/dir/*.txt"), "matches no files"),
    (dict(path=""), "needs data.path"),
    (dict(source="wikipedia"), "is not one of"),
    (dict(source="hf", name=""), "needs data.name"),
])
def test_bad_sources_are_clear_errors(tmp_path, data, message):
    with pytest.raises(UserError, match=message):
        ip.prepare(make_config(**data), str(tmp_path), progress=False)


def test_empty_and_too_short_corpora_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(UserError, match="gave no training tokens"):
        ip.prepare(make_config(path=str(tmp_path / "empty" / "*.txt"), eval_fraction=0.0), str(tmp_path / "w1"),
                   progress=False)
    (tmp_path / "short.txt").write_text("Just a few words.")
    cache = ip.prepare(make_config(path=str(tmp_path / "short.txt"), eval_fraction=0.0), str(tmp_path / "w2"),
                       progress=False)
    with pytest.raises(UserError, match=r"fewer than one window of seq_len \+ 1 = 33"):
        ip.train_batches(cache.stream("train"), 32, 4, seed=0)
    (tmp_path / "notes.md").write_text("# hi")
    with pytest.raises(UserError, match=r"is not .txt, .tokens, .jsonl or .parquet; .*\(rename plain text to .txt\)"):
        ip.prepare(make_config(path=str(tmp_path / "*")), str(tmp_path / "w3"), progress=False)


def test_a_tokenizer_past_65536_ids_gets_a_uint32_cache_of_its_own(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A real local tokenizer directory of 70,000 words, as save_pretrained writes it; its last ids need 17 bits.
    vocab = {"<eos>": 0, **{f"w{i}": i + 1 for i in range(69_999)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = str(tmp_path / "tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>").save_pretrained(directory)
    documents = [" ".join(f"w{i}" for i in range(start, 70_000, 997)) for start in range(8)]
    config = make_config(path=write_txt_corpus(str(tmp_path / "corpus"), documents), tokenizer=directory,
                         eval_fraction=0.0)
    cache = ip.prepare(config, str(tmp_path / "run"), progress=False)  # model.vocab_size: still GPT-2's 50257
    assert cache.manifest["dtype"] == "uint32" and cache.manifest["key"]["token_dtype"] == "uint32"
    stream = cache.stream("train")
    tokens = stream.read(0, stream.num_tokens)
    assert tokens.max() > 65_535
    want = sorted(int(w[1:]) + 1 for text in documents for w in text.split()) + [0] * len(documents)
    np.testing.assert_array_equal(np.sort(tokens), np.sort(want))
    # GPT-2's cache is still uint16, under the directory name it always had (no dtype in its key).
    assert ip.token_dtype("gpt2") == "uint16" and "token_dtype" not in ip.cache_key(make_config().data)


def test_a_held_out_file_is_the_whole_validation_split_and_every_source_document_trains(tmp_path):
    # data.eval_path (the IsoFLOP sweep's WikiText test split): its documents, and only they, are held out; every
    # document of data.path trains, whatever data.eval_fraction says; the cache is another one (its key has the path).
    train_glob = write_txt_corpus(tmp_path / "corpus", DOCUMENTS[:6])
    held_out_glob = write_txt_corpus(tmp_path / "held_out", DOCUMENTS[20:22])
    config = make_config(path=train_glob, eval_path=held_out_glob)
    cache = ip.prepare(config, str(tmp_path / "work"), progress=False)
    for split, docs in (("train", DOCUMENTS[:6]), ("validation", DOCUMENTS[20:22])):
        stream = cache.stream(split)
        np.testing.assert_array_equal(stream.read(0, stream.num_tokens), expected_stream(docs))
    assert cache.manifest["key"]["eval_path"] == held_out_glob
    without = make_config(path=train_glob)
    assert ip.cache_directory(without.data, "w") != ip.cache_directory(config.data, "w")
    assert "eval_path" not in ip.cache_key(without.data)  # caches made before the key keep their names
    with pytest.raises(UserError, match="data.eval_path='.*nothing.txt' matches no files"):
        ip.prepare(make_config(path=train_glob, eval_path=str(tmp_path / "nothing.txt")), str(tmp_path / "w2"),
                   progress=False)
