import pytest

from gptjax.tokenizer import END_OF_TEXT_ID, load_bulk_encoder, load_text_codec, load_tokenizer

UNICODE_TEXT = "Zürich, 東京 and Москва — naïve café ☕ 🙂\n\n  tabs\tand  double  spaces\r\n"


def test_known_vectors():
    tokenizer = load_tokenizer()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_token_id == END_OF_TEXT_ID == 50256
    assert len(tokenizer) == 50257


@pytest.mark.parametrize("text", ["Hello world", UNICODE_TEXT, " leading space", "", "a" * 300])
def test_decode_inverts_encode(text):
    tokenizer = load_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bulk_encoder_gives_the_same_ids_as_hugging_face():
    with open(__file__, encoding="utf-8") as f:
        source = f.read()  # real text with code, unicode and odd whitespace
    tokenizer, bulk = load_tokenizer(), load_bulk_encoder()
    for text in (UNICODE_TEXT, source, "it's we'll they've I'd 1234567 !!!?? <|endoftext|>"):
        # Corpus text is tokenized as plain text: a literal '<|endoftext|>' in a document is not a separator.
        reference = tokenizer(text, split_special_tokens=True)["input_ids"]
        assert bulk.encode_ordinary(text) == reference


def test_the_sampling_codec_encodes_and_decodes_as_hugging_face():
    """`sample`'s tiktoken codec (no transformers import): the same prompt ids ('<|endoftext|>' in a prompt is the
    special token), the same text for every prefix of a sample, incomplete UTF-8 characters included."""
    tokenizer, codec = load_tokenizer(), load_text_codec("gpt2")
    assert codec.eos_token_id == tokenizer.eos_token_id and len(codec) == len(tokenizer) == 50257
    for text in (UNICODE_TEXT, "it's 1234567 !!!?? <|endoftext|>The next document", "🙂🙂 東京"):
        ids = tokenizer.encode(text)
        assert codec.encode(text) == ids
        for end in range(len(ids) + 1):
            assert codec.decode(ids[:end]) == tokenizer.decode(ids[:end])


def test_missing_tokenizer_directory_is_a_clear_error():
    from gptjax.errors import UserError

    with pytest.raises(UserError, match="neither 'gpt2' nor a local tokenizer directory"):
        load_tokenizer("/no/such/tokenizer")
