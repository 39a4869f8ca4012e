"""Input pipeline: documents -> GPT-2 token ids -> a token cache on disk -> packed windows -> batches (tf.data).

Two stages, as nanoGPT's prepare.py + train.py, but resumable and exact:

1. `prepare(config, workdir)` reads documents from one of four sources through tf.data (TFDS natively; Hugging
   Face `datasets`, local files and the built-in Python docs through `from_generator`), tokenizes them in batches
   (tiktoken on all cores, ids identical to Hugging Face's GPT-2 tokenizer), appends end-of-text after each document,
   and writes the token stream to disk once as uint16 shards with a JSON manifest. Every `1 / data.eval_fraction`-th
   document goes to the validation split instead, so the two splits never share a document (with data.eval_path,
   the validation split is those files instead, and every document of the source trains). An interrupted prepare
   resumes after the last shard it finished.

2. `train_batches(...)` cuts the cached stream into windows of seq_len + 1 tokens (window w = tokens
   [w * seq_len, w * seq_len + seq_len + 1): consecutive windows overlap by one token, so every token is a prediction
   target exactly once per epoch and nothing is padded) and serves batches through tf.data (parallel reads,
   prefetch). Shuffling is a seeded permutation of window indices per epoch, computed once per epoch and kept (a
   batch costs O(batch_size) whatever the corpus size), so batch i is a pure function of (data, seed, i): a
   restarted run asks for batches from its step on and sees exactly what it would have seen.
   With several processes each one builds only its own rows of the global batch.
"""

import atexit
import dataclasses
import functools
import glob
import hashlib
import json
import os
import platform
import re
import sys
import threading
import weakref
from typing import Iterator

import ml_collections
import numpy as np

from gptjax import interrupts
from gptjax.errors import UserError
from gptjax.tokenizer import END_OF_TEXT_ID, load_bulk_encoder, load_tokenizer

SOURCES = ("text", "tfds", "hf", "python_docs")
MANIFEST = "manifest.json"
DOCUMENTS_PER_TOKENIZER_CALL = 512


def import_tensorflow():
    """TensorFlow for tf.data only (kept quiet by gptjax/__init__.py), hidden from GPUs so XLA keeps their memory."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def dataset_options():
    """Deterministic order, and small private thread pools so tf.data does not starve XLA of cores."""
    tf = import_tensorflow()
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, min(8, os.cpu_count() or 2))
    options.threading.max_intra_op_parallelism = 1
    return options


# ----------------------------------------------------------------------------------------------------------------
# Stage 1a: documents from each source, as a tf.data.Dataset of scalar tf.string


def documents_dataset(data: ml_collections.ConfigDict):
    """All documents of the configured source, in a fixed order, as a tf.data.Dataset of UTF-8 strings."""
    tf = import_tensorflow()
    if data.source not in SOURCES:
        raise UserError(f"data.source={data.source!r} is not one of {SOURCES}")
    if data.source == "tfds":
        return tfds_documents(data)
    generator = {"text": text_file_documents, "hf": hf_documents, "python_docs": python_docs_documents}[data.source]
    documents = generator(data)  # a Python iterator; opened here so bad paths fail now, not inside tf.data
    first = next(documents, None)
    if first is None:
        raise UserError(f"data source {describe_source(data)} has no documents; check data.path / data.name")

    def all_documents():
        # A UserError raised inside tf.data would reach the caller buried in a long op error: stop the stream
        # cleanly instead and leave the error for `raise_deferred_error`.
        try:
            yield first
            yield from documents
        except UserError as e:
            _deferred_errors.append(e)

    _deferred_errors.clear()
    return tf.data.Dataset.from_generator(all_documents, output_signature=tf.TensorSpec((), tf.string))


_deferred_errors: list[UserError] = []


def raise_deferred_error() -> None:
    """Re-raises the UserError that ended a generator-backed documents_dataset early, if any."""
    if _deferred_errors:
        raise _deferred_errors.pop()


def describe_source(data) -> str:
    if data.source == "text":
        return f"text files {data.path!r}"
    if data.source == "python_docs":
        return "python_docs (the Python reference manual shipped with Python)"
    return f"{data.source} dataset {data.name!r}"


def python_docs_documents(data) -> Iterator[str]:
    """The Python reference manual's topics (pydoc_data ships them with every Python): ~460 kB of English."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def text_file_documents(data) -> Iterator[str]:
    """Documents from local .txt, .jsonl and .parquet files matched by data.path (a path or glob)."""
    if not data.path:
        raise UserError("data.source=text needs data.path, e.g. --config.data.path='corpus/*.txt'")
    return _text_file_documents(matching_files(data.path, "data.path"), data)


def matching_files(pattern: str, key: str) -> list[str]:
    """The files a comma-separated list of paths or globs matches, sorted; refuses none, or another kind of file."""
    paths = sorted(p for part in pattern.split(",") for p in glob.glob(os.path.expanduser(part.strip()),
                                                                      recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise UserError(f"{key}={pattern!r} matches no files; check the path or quote the glob")
    unknown = [p for p in paths if not p.endswith((*TEXT_EXTENSIONS, ".jsonl", ".parquet"))]
    if unknown:
        raise UserError(f"{unknown[0]} is not {', '.join(TEXT_EXTENSIONS)}, .jsonl or .parquet; narrow {key} to "
                        f"those files (rename plain text to .txt)")
    return paths


# Plain UTF-8 text: .txt, and WikiText's files as they are published (wiki.test.tokens).
TEXT_EXTENSIONS = (".txt", ".tokens")


def _text_file_documents(paths, data) -> Iterator[str]:
    for path in paths:
        if path.endswith(TEXT_EXTENSIONS):
            text = read_utf8(path, data.utf8_errors)
            if data.txt_documents == "file":
                yield text
            elif data.txt_documents == "blank_lines":
                yield from (doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip())
            else:
                raise UserError(f"data.txt_documents={data.txt_documents!r} is not 'file' or 'blank_lines'")
        elif path.endswith(".jsonl"):
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, 1):
                    if line.strip():
                        where = f"{path} line {line_number}"
                        yield field_of(json_record(line, where, data.utf8_errors), data.text_field, where)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if data.text_field not in table.schema_arrow.names:
                raise UserError(f"{path} has no column {data.text_field!r} (columns: {table.schema_arrow.names}); "
                                f"set data.text_field")
            column_type = table.schema_arrow.field(data.text_field).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                raise UserError(f"{path} column {data.text_field!r} holds {column_type}, not text; set "
                                f"data.text_field to its text column")
            for batch in table.iter_batches(columns=[data.text_field]):
                yield from (text for text in batch.column(0).to_pylist() if text)


def read_utf8(path: str, errors: str) -> str:
    with open(path, "rb") as f:
        return decode_utf8(f.read(), path, errors)


def decode_utf8(raw: bytes, where: str, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not valid UTF-8 (byte {e.start}); convert it (iconv -t utf-8) or set "
                        f"data.utf8_errors=replace") from None


def json_record(line: bytes, where: str, utf8_errors: str = "strict"):
    """One line of a .jsonl file, parsed; a line that is not JSON is a UserError naming it."""
    try:
        return json.loads(decode_utf8(line, where, utf8_errors).strip())
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e.msg}: column {e.colno}); each line must be one JSON object: fix "
                        f"or remove that line") from None


def field_of(record, field: str, where: str, fix: str = "set data.text_field") -> str:
    """The text in `record[field]`; a record that is not an object, lacks the field or holds no string there is a
    UserError naming where it is and `fix`."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object with a {field!r} field; each line "
                        f"must be an object such as {{\"{field}\": \"...\"}}")
    if field not in record:
        raise UserError(f"{where} has no text field {field!r} (it has {sorted(record)}); {fix}")
    if not isinstance(record[field], str):
        raise UserError(f"{where} field {field!r} is a {type(record[field]).__name__}, not text; {fix} to the field "
                        f"that holds the text")
    return record[field]


def hugging_face_offline() -> None:
    """Offline mode for `datasets` and huggingface_hub: a dataset in the local cache still loads, and a missing one
    fails at once instead of after ~30 s of retries, each logged twice. They read it from the environment when they
    are imported, so it is also set on them where they already are (a notebook's second call)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module in ("huggingface_hub.constants", "datasets.config"):
        if hasattr(sys.modules.get(module), "HF_HUB_OFFLINE"):
            sys.modules[module].HF_HUB_OFFLINE = True


def hf_documents(data) -> Iterator[str]:
    """Hugging Face `datasets`: a Hub dataset (wikimedia/wikipedia) or a local builder ('json', 'text', 'parquet')."""
    if not data.name:
        raise UserError("data.source=hf needs data.name, e.g. wikimedia/wikipedia (with data.hf_config=20231101.en)")
    hub_unreachable = data.name not in HF_LOCAL_BUILDERS and not os.path.exists(data.name) and not reachable(HF_HOST)
    if hub_unreachable:
        hugging_face_offline()
    import datasets

    kwargs = dict(split=data.split, streaming=data.streaming)
    if data.path:
        kwargs["data_files"] = sorted(glob.glob(os.path.expanduser(data.path))) or data.path
    try:
        dataset = datasets.load_dataset(data.name, data.hf_config or None, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        if hub_unreachable:
            raise UserError(f"Hugging Face dataset {data.name!r} is not in the local cache and {HF_HOST[0]} is "
                            f"unreachable; go online once (the first run downloads it) or train on local files "
                            f"(--config.data.source=text --config.data.path=...)") from None
        raise UserError(f"Hugging Face dataset {data.name!r} could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); check data.name / data.hf_config / data.path, "
                        f"and the network for Hub datasets") from None
    columns = dataset.column_names
    if columns is not None and data.text_field not in columns:
        raise UserError(f"Hugging Face dataset {data.name!r} has no field {data.text_field!r} (fields: {columns}); "
                        f"set data.text_field")
    return (example[data.text_field] for example in dataset)


def tfds_documents(data):
    """A TFDS text dataset (default wikipedia/20230601.en): prepared from data.data_dir, downloaded if missing."""
    builder = tfds_builder(data)
    if not builder.is_prepared():
        download_and_prepare_tfds(builder, data)
    features = builder.info.features
    if data.text_field not in features:
        raise UserError(f"TFDS dataset {data.name!r} has no feature {data.text_field!r} (features: "
                        f"{sorted(features.keys())}); set data.text_field")
    dataset = builder.as_dataset(split=data.split, shuffle_files=False)
    return dataset.map(lambda example: example[data.text_field])


def tfds_builder(data):
    """The TFDS builder of data.name in data.data_dir: its `version` is the one a name without ':version' reads."""
    import tensorflow_datasets as tfds

    if not data.name:
        raise UserError("data.source=tfds needs data.name, e.g. wikipedia/20230601.en")
    try:
        return tfds.builder(data.name, data_dir=data.data_dir or None)
    except Exception as e:  # TFDS raises several types for unknown names and versions
        raise UserError(f"TFDS has no dataset {data.name!r} ({type(e).__name__}: {str(e).splitlines()[0][:400]}); "
                        f"check data.name, or point data.data_dir at a directory where it is prepared") from None


# Where TFDS fetches prepared copies of its catalog datasets: reachable means a download can be tried at all.
TFDS_DOWNLOAD_HOST = ("storage.googleapis.com", 443)
HF_HOST = ("huggingface.co", 443)
# `datasets`' packaged builders, which read data.path and never the Hub.
HF_LOCAL_BUILDERS = ("json", "text", "parquet", "csv", "arrow")


def reachable(host: tuple[str, int]) -> bool:
    import socket

    try:
        socket.create_connection(host, timeout=5).close()
        return True
    except OSError:
        return False


def download_and_prepare_tfds(builder, data) -> None:
    """Downloads and prepares a TFDS dataset, failing fast (one line, no retry storm) when the machine is offline,
    and leaving no half-built dataset or download directory behind when anything fails."""
    import shutil

    root = str(builder.data_dir_root)
    fixes = ("go online once (the first run downloads and prepares it), point data.data_dir at a directory where "
             "it is prepared, or train on local files (--config.data.source=text --config.data.path=...)")
    if type(builder).__module__.startswith("tensorflow_datasets."):  # catalog datasets download; local ones build
        if not reachable(TFDS_DOWNLOAD_HOST):
            raise UserError(f"TFDS dataset {data.name!r} is not prepared in {root} and cannot be downloaded: "
                            f"{TFDS_DOWNLOAD_HOST[0]} is unreachable; {fixes}")
    downloads = os.path.join(root, "downloads")
    new_paths = [p for p in (root, os.path.join(root, builder.name), downloads, os.path.join(downloads, builder.name))
                 if not os.path.exists(p)]
    try:
        builder.download_and_prepare()
    except BaseException as e:
        for path in new_paths:
            shutil.rmtree(path, ignore_errors=True)
        if not isinstance(e, Exception):  # Ctrl-C: cleaned up, and still an interrupt
            raise
        raise UserError(f"TFDS dataset {data.name!r} is not prepared in {root} and could not be downloaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); {fixes}") from None


# ----------------------------------------------------------------------------------------------------------------
# Stage 1b: tokenize once into a cache on disk


def cache_key(data) -> dict:
    """Everything that changes the token stream; the cache directory is named after its hash."""
    key = {k: data[k] for k in ("source", "name", "hf_config", "split", "path", "data_dir", "text_field",
                                "txt_documents", "utf8_errors", "tokenizer", "eval_fraction")}
    if data.get("eval_path"):  # a held-out corpus of its own (caches without one keep the names they always had)
        key["eval_path"] = data.eval_path
    dtype = token_dtype(data.tokenizer)
    if dtype != "uint16":  # GPT-2's caches keep the names they always had
        key["token_dtype"] = dtype
    return key


def token_dtype(tokenizer_name: str) -> str:
    """The cache's integer type: uint16 (2 bytes a token) while every id of the tokenizer fits, else uint32."""
    if tokenizer_name == "gpt2":
        return "uint16"
    return "uint16" if len(load_tokenizer(tokenizer_name)) <= 2 ** 16 else "uint32"


def source_fingerprint(data) -> dict | None:
    """What the source reads, where it can change under the same config (in `cache_key`):
    - local files (data.path and data.eval_path of a text source, a Hugging Face builder's data.path, a Hugging Face
      dataset directory): each one's [path, bytes, modification time in ns], so a file added, removed, edited or
      touched is other text;
    - a TFDS dataset: the version its builder reads (a new tensorflow-datasets can move a name to another version);
    - a Hugging Face Hub dataset: the revision (commit) it loads; None when it cannot be looked up (offline and not
      in the local cache);
    - python_docs: the Python whose manual it reads."""
    fingerprint = {}
    if data.source == "python_docs":
        fingerprint["python"] = platform.python_version()
    elif data.source == "tfds":
        fingerprint["tfds_version"] = str(tfds_builder(data).version)
    elif data.source == "hf":
        local = sorted(glob.glob(os.path.expanduser(data.path))) if data.path else []
        if os.path.isdir(data.name):
            local += sorted(os.path.join(top, name) for top, _, names in os.walk(data.name) for name in names)
        if local:
            fingerprint["files"] = file_stats(local)
        elif data.name not in HF_LOCAL_BUILDERS:
            revision = hf_hub_revision(data)
            if revision is None:
                return None
            fingerprint["hf_revision"] = revision
    patterns = [(data.path, "data.path")] if data.source == "text" and data.path else []
    patterns += [(data.eval_path, "data.eval_path")] if data.get("eval_path") else []
    if patterns:
        files = fingerprint.get("files", []) + file_stats([p for pattern, key in patterns
                                                           for p in matching_files(pattern, key)])
        fingerprint["files"] = files
    return fingerprint


def file_stats(paths: list[str]) -> list[list]:
    return [[os.path.abspath(path), stat.st_size, stat.st_mtime_ns] for path, stat in zip(paths, map(os.stat, paths))]


def hf_hub_revision(data) -> str | None:
    """The commit of a Hub dataset that `datasets` loads (from the Hub, or from its local cache when offline)."""
    if not data.name:
        return None  # hf_documents names the missing key
    if not reachable(HF_HOST):
        hugging_face_offline()
    import datasets

    try:
        return datasets.load_dataset_builder(data.name, data.hf_config or None).hash
    except Exception:  # offline and not cached, or no such dataset: hf_documents says which, in one line
        return None


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def cache_directory(data, workdir: str) -> str:
    return find_cache(data, workdir, source_fingerprint(data))


def unversioned_directory(data, workdir: str) -> str:
    """<data.cache_dir or workdir/data>/<source>-<hash of cache_key>: every cache of one data config starts so."""
    return os.path.join(data.cache_dir or os.path.join(workdir, "data"), f"{data.source}-{digest(cache_key(data))}")


def find_cache(data, workdir: str, fingerprint: dict | None) -> str:
    """<unversioned_directory>[-<hash of source_fingerprint>]: other text is another cache, so a cache is never
    silently stale. Two exceptions keep a Wikipedia-sized cache from being tokenized again for nothing: a TFDS or
    Hub cache tokenized before versions were recorded (named without the second hash) is taken to be of the version
    read now, and a Hub dataset whose revision cannot be looked up (offline) uses the newest complete cache of its
    config."""
    unversioned = unversioned_directory(data, workdir)
    if fingerprint is None:
        caches = complete_caches(unversioned)
        return max(caches)[1] if caches else unversioned
    if not fingerprint:
        return unversioned
    if {"tfds_version", "hf_revision"} & set(fingerprint):
        legacy = [source for _, directory, source in complete_caches(unversioned) if directory == unversioned]
        if legacy and legacy[0] in (None, fingerprint):
            return unversioned
    return f"{unversioned}-{digest(fingerprint)}"


def complete_caches(unversioned: str) -> list[tuple[float, str, dict | None]]:
    """(time, directory, source fingerprint or None) of each complete cache of one config, whatever text it holds."""
    caches = []
    for manifest_path in [os.path.join(unversioned, MANIFEST)] + glob.glob(f"{glob.escape(unversioned)}-*/{MANIFEST}"):
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue
        if manifest.get("complete"):
            caches.append((os.path.getmtime(manifest_path), os.path.dirname(manifest_path), manifest.get("source")))
    return caches


def what_changed(unversioned: str, directory: str, fingerprint: dict) -> str | None:
    """The newest complete cache of the same config (other files, version or Python) and how the source differs
    from what it was tokenized from, in a few words; None when there is no such cache."""
    older = [cache for cache in complete_caches(unversioned) if cache[1] != directory and cache[2] is not None]
    if not older:
        return None
    _, old_directory, old = max(older)
    for key, what in (("python", "Python {}'s manual"), ("tfds_version", "TFDS version {}"),
                      ("hf_revision", "revision {}")):
        if old.get(key) != fingerprint.get(key):
            return f"{old_directory} ({what.format(old.get(key))} there, {what.format(fingerprint.get(key))} here)"
    before = {path: (size, mtime) for path, size, mtime in old.get("files", [])}
    now = {path: (size, mtime) for path, size, mtime in fingerprint.get("files", [])}
    changes = {"added": sorted(set(now) - set(before)), "removed": sorted(set(before) - set(now)),
               "changed": sorted(p for p in set(now) & set(before) if now[p] != before[p])}
    counts = ", ".join(f"{len(paths)} {what}" for what, paths in changes.items() if paths)
    first = [os.path.basename(p) for paths in changes.values() for p in paths][:3]
    more = ", ..." if sum(map(len, changes.values())) > len(first) else ""
    return f"{old_directory} (files {counts}: {', '.join(first)}{more})"


def held_out_documents(data: ml_collections.ConfigDict):
    """data.eval_path's documents (local text files, read as data.path's are) as a tf.data.Dataset, or None."""
    if not data.get("eval_path"):
        return None
    matching_files(data.eval_path, "data.eval_path")  # a wrong path is named as the key the user set
    held_out = ml_collections.ConfigDict(data.to_dict())
    held_out.source, held_out.path = "text", data.eval_path
    return documents_dataset(held_out)


def tagged_documents(data: ml_collections.ConfigDict):
    """(document, from data.eval_path) pairs: the source's documents, then data.eval_path's, as one dataset."""
    documents = documents_dataset(data).map(lambda text: (text, False))
    held_out = held_out_documents(data)
    return documents if held_out is None else documents.concatenate(held_out.map(lambda text: (text, True)))


def holds_out_nothing(data) -> bool:
    """Whether a run's data config holds no text out for evaluation (no eval_fraction and no eval_path)."""
    return data.eval_fraction == 0 and not data.get("eval_path")


def is_validation_document(index: int, eval_fraction: float) -> bool:
    """Every round(1 / eval_fraction)-th document (counting from the middle of the first stride) is held out."""
    if eval_fraction <= 0:
        return False
    stride = max(1, round(1 / eval_fraction))
    return index % stride == stride // 2


def write_atomically(path: str, payload: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tokenizer_encode_batch(tokenizer_name: str):
    """texts -> list of token id lists; the GPT-2 path uses tiktoken's threaded batch encoder on every core."""
    if tokenizer_name == "gpt2":
        encoder = load_bulk_encoder()
        threads = os.cpu_count() or 1
        return (lambda texts: encoder.encode_ordinary_batch(texts, num_threads=threads)), END_OF_TEXT_ID
    tokenizer = load_tokenizer(tokenizer_name)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {tokenizer_name!r} has no end-of-text token to separate documents")
    return (lambda texts: tokenizer(texts, split_special_tokens=True)["input_ids"]), tokenizer.eos_token_id


def prepare(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> "TokenCache":
    """Tokenizes the configured corpus into the cache (or reuses a complete one) and returns it."""
    data = config.data
    fingerprint = source_fingerprint(data)
    directory = find_cache(data, workdir, fingerprint)
    manifest_path = os.path.join(directory, MANIFEST)
    manifest = {"version": 1, "key": cache_key(data), "source": fingerprint, "complete": False,
                "documents_done": 0, "splits": {"train": [], "validation": []}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest["complete"]:
            return adopted(TokenCache(directory, manifest), data, fingerprint)
        print(f"Resuming tokenization after {manifest['documents_done']} documents ({directory})")
    elif fingerprint:
        change = what_changed(unversioned_directory(data, workdir), directory, fingerprint)
        if change:
            print(f"note     | {describe_source(data)} changed since it was tokenized into {change}; tokenizing "
                  f"it again, into {directory}")

    encode_batch, eos_id = tokenizer_encode_batch(data.tokenizer)
    manifest["dtype"] = dtype = manifest.get("dtype", token_dtype(data.tokenizer))
    manifest["eos_id"] = eos_id
    done = manifest["documents_done"]
    documents = tagged_documents(data).skip(done).batch(DOCUMENTS_PER_TOKENIZER_CALL)
    documents = documents.with_options(dataset_options()).prefetch(2)
    buffers = {"train": [], "validation": []}
    buffered_tokens = 0

    def flush():
        nonlocal buffered_tokens
        if not buffered_tokens and not any(manifest["splits"].values()):
            return  # no token yet: nothing worth resuming, so no directory (a failed first read leaves nothing)
        os.makedirs(directory, exist_ok=True)
        for split, chunks in buffers.items():
            if chunks:
                tokens = np.concatenate(chunks)
                largest = int(tokens.max())
                if largest > np.iinfo(dtype).max:  # never wrap an id around silently
                    raise UserError(f"tokenizer {data.tokenizer!r} gave the id {largest}, which does not "
                                    f"fit the token cache's {dtype}; use a tokenizer whose ids are below its size")
                tokens = tokens.astype(dtype)
                name = f"{split}_{len(manifest['splits'][split]):05d}.bin"
                write_atomically(os.path.join(directory, name), tokens.tobytes())
                manifest["splits"][split].append({"file": name, "tokens": int(tokens.size)})
                chunks.clear()
        manifest["documents_done"] = done
        write_atomically(manifest_path, json.dumps(manifest, indent=1).encode())
        buffered_tokens = 0

    from tqdm import tqdm

    bar = tqdm(desc="tokenizing", unit=" docs", initial=done, disable=not progress)
    for batch, from_eval_path in documents.as_numpy_iterator():
        texts = [decode_utf8(raw, f"document {done + i} of {describe_source(data)}", data.utf8_errors)
                 for i, raw in enumerate(batch)]
        for ids, held_out in zip(encode_batch(texts), from_eval_path):
            if ids:  # an empty document adds nothing, not even a separator
                if data.get("eval_path"):  # its files are the whole validation split
                    split = "validation" if held_out else "train"
                else:
                    split = "validation" if is_validation_document(done, data.eval_fraction) else "train"
                buffers[split].append(np.asarray(ids + [eos_id], dtype=np.int64))
                buffered_tokens += len(ids) + 1
            done += 1
            if buffered_tokens >= data.shard_tokens:
                flush()
        bar.update(len(texts))
        bar.set_postfix(tokens=f"{sum(s['tokens'] for s in manifest['splits']['train']) + buffered_tokens:,}")
        if interrupts.requested():  # Ctrl-C: keep what is done (below), then stop
            break
    bar.close()
    flush()  # keeps what was tokenized even if the source failed or was interrupted: a rerun resumes after it
    interrupts.check()
    raise_deferred_error()
    if not manifest["splits"]["train"]:
        raise UserError(f"{describe_source(data)} gave no training tokens (all documents empty?); add text")
    manifest["complete"] = True
    manifest["documents"] = done
    write_atomically(manifest_path, json.dumps(manifest, indent=1).encode())
    return TokenCache(directory, manifest)


def adopted(cache: "TokenCache", data, fingerprint: dict | None) -> "TokenCache":
    """A complete cache, with one note where `find_cache` chose it without knowing the version it holds."""
    if fingerprint is None:
        print(f"note     | the revision of {describe_source(data)} cannot be looked up (offline, not in the Hugging "
              f"Face cache); using its newest token cache, {cache.directory}")
    elif cache.manifest.get("source") is None and fingerprint:
        print(f"note     | {cache.directory} was tokenized before gptjax recorded dataset versions; it is taken to "
              f"be {', '.join(f'{k} {v}' for k, v in fingerprint.items())}, the one read now")
        cache.manifest["source"] = fingerprint
        write_atomically(os.path.join(cache.directory, MANIFEST), json.dumps(cache.manifest, indent=1).encode())
    return cache


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: windows and batches


def prepare_once(config: ml_collections.ConfigDict, workdir: str) -> "TokenCache":
    """`prepare` for a run of one or several processes: process 0 tokenizes (or finds the cache); the others wait for
    it and then open the same cache."""
    import jax

    if jax.process_count() == 1:
        return prepare(config, workdir)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        prepare(config, workdir)
    multihost_utils.sync_global_devices("gptjax token cache ready")
    return prepare(config, workdir, progress=False)


@dataclasses.dataclass
class TokenCache:
    """A finished token cache: per split, a list of memory-mapped shards that read as one stream."""

    directory: str
    manifest: dict

    def num_tokens(self, split: str) -> int:
        return sum(shard["tokens"] for shard in self.manifest["splits"][split])

    def fingerprint(self) -> str:
        """Changes when the cached token stream does: another source, tokenizer or split, or a rebuilt corpus."""
        content = json.dumps({"key": self.manifest["key"], "splits": self.manifest["splits"]}, sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    def stream(self, split: str) -> "TokenStream":
        shards = [open_shard(os.path.join(self.directory, s["file"]), self.manifest["dtype"])
                  for s in self.manifest["splits"][split] if s["tokens"]]
        return TokenStream(shards)


def open_shard(path: str, dtype: str) -> np.ndarray:
    """A shard file memory-mapped read-only as a 1-D token array, advised for random access.

    Training reads one 514-byte window here, the next one far away: the kernel's default read-ahead would fetch
    ~128 kB around each. Measured at Wikipedia scale (20M windows of 256): 120 ms -> 1.7 ms per batch of 128.
    """
    import mmap

    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise"):  # not on Windows
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype)


class TokenStream:
    """Several shards read as one long array of token ids."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int32, across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right") - 1)
        while length > 0:
            offset = start - self.starts[shard]
            piece = self.shards[shard][offset: offset + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces).astype(np.int32) if len(pieces) > 1 else pieces[0].astype(np.int32)

    def num_windows(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def windows(self, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
        """[len(window_ids), seq_len + 1] int32: window w is tokens[w * seq_len : w * seq_len + seq_len + 1]."""
        return np.stack([self.read(int(w) * seq_len, seq_len + 1) for w in window_ids])


def shuffled_windows(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of windows in one epoch: a pure function of (seed, epoch). O(num_windows): ~2 s for English
    Wikipedia's ~20M windows of 256 tokens, so `epoch_permutation` computes it once per epoch, not once per batch."""
    order = np.random.default_rng([seed, epoch]).permutation(num_windows)
    return order.astype(np.uint32 if num_windows < 2**32 else np.int64)  # 80 MB instead of 160 for 20M windows


_permutation_lock = threading.Lock()


@functools.lru_cache(maxsize=2)  # this epoch and the next: one batch can span the boundary
def _kept_permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    order = shuffled_windows(num_windows, seed, epoch)
    order.setflags(write=False)  # shared by every batch of the epoch
    return order


def epoch_permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """`shuffled_windows`, kept for the next batches: tf.data loads several batches at once on its threads, and the
    lock makes the first of them compute an epoch's order while the others wait for it."""
    with _permutation_lock:
        return _kept_permutation(num_windows, seed, epoch)


def batch_window_ids(step: int, batch_size: int, num_windows: int, seed: int,
                     rows: slice = slice(None)) -> np.ndarray:
    """Window ids of global batch `step` (optionally only some of its rows): epochs follow each other seamlessly."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)[rows]
    epochs, within = np.divmod(positions, num_windows)
    ids = np.empty_like(positions)
    for epoch in np.unique(epochs):  # one or two epochs; their orders are computed once and kept
        ids[epochs == epoch] = epoch_permutation(num_windows, seed, int(epoch))[within[epochs == epoch]]
    return ids


def data_position(step: int, batch_size: int, num_windows: int) -> dict:
    """Where the data stream stands before `step`: saved in checkpoints so a human can read it."""
    epoch, window = divmod(step * batch_size, num_windows)
    return {"step": step, "epoch": int(epoch), "window_in_epoch": int(window), "windows_per_epoch": num_windows}


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that this process feeds (preflight.check_batch_layout made them divide)."""
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def check_enough_tokens(stream: TokenStream, seq_len: int, split: str) -> None:
    if stream.num_windows(seq_len) == 0:
        raise UserError(f"the {split} split has {stream.num_tokens} tokens, fewer than one window of "
                        f"seq_len + 1 = {seq_len + 1}; add text or lower data.seq_len")


def train_batches(stream: TokenStream, seq_len: int, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
    """Endless int32 batches [batch_size / process_count, seq_len + 1], from global step `start_step` on."""
    tf = import_tensorflow()
    check_enough_tokens(stream, seq_len, "train")
    num_windows = stream.num_windows(seq_len)
    rows = process_rows(batch_size, process_index, process_count)

    def load(step):
        ids = batch_window_ids(int(step), batch_size, num_windows, seed, rows)
        return stream.windows(ids, seq_len)

    steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
    batches = steps.map(lambda step: tf.numpy_function(load, [step], tf.int32, stateful=False),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = batches.with_options(dataset_options()).prefetch(tf.data.AUTOTUNE)
    return BatchIterator(batches.as_numpy_iterator())


class BatchIterator:
    """A tf.data iterator that is closed before the interpreter shuts down.

    A live tf.data iterator whose map calls back into Python (numpy_function) can deadlock at interpreter exit, so
    every one is closed by an atexit hook (or earlier with `close()`).
    """

    _live = weakref.WeakSet()

    def __init__(self, iterator):
        self._iterator = iterator
        BatchIterator._live.add(self)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        self._iterator = None


@atexit.register
def _close_live_iterators():
    for iterator in list(BatchIterator._live):
        iterator.close()


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int, max_batches: int = 0) -> Iterator[np.ndarray]:
    """The held-out windows in order, in global batches (each process takes its `process_rows`); the last batch may
    be smaller. 0 = all of them."""
    check_enough_tokens(stream, seq_len, "validation")
    num_windows = stream.num_windows(seq_len)
    num_batches = -(-num_windows // batch_size)
    if max_batches:
        num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
        yield stream.windows(np.arange(b * batch_size, min((b + 1) * batch_size, num_windows)), seq_len)

