"""Logprobs of tokens that hold part of a character: a chat's `bytes` are the token's own, so a
client joins them back into the text, while the token's shown text is U+FFFD."""
import pytest

from deployments.openai_format import CHAT, COMPLETION, ResponseBuilder
from deployments.token_bytes import TokenTexts, shown, token_bytes
from engine.tiny_model import make_tokenizer


def _byte_fallback_tokenizer():
    """A sentencepiece-style tokenizer (Metaspace, byte fallback), as Mixtral's and Llama's are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁a": 1, "a": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(params=["byte_level_bpe", "byte_fallback"])
def tokenizer(request, tmp_path):
    return make_tokenizer(tmp_path) if request.param == "byte_level_bpe" else _byte_fallback_tokenizer()


def test_a_character_split_over_tokens_is_their_bytes_joined(tokenizer):
    ids = tokenizer.encode("a€", add_special_tokens=False)
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # some token holds part of the €
    texts = TokenTexts(tokenizer)
    joined = bytes(b for i in ids for b in token_bytes(texts(i))).decode("utf-8")
    assert joined.replace("▁", " ").strip() == "a€"
    assert [shown(texts(i)) for i in ids] == [tokenizer.decode([i]) for i in ids]


def test_a_whole_tokens_text_and_bytes_are_its_decoded_texts(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    texts = TokenTexts(tokenizer)
    for token in tokenizer.encode("the quick fox"):
        assert texts(token) == tokenizer.decode([token])
        assert token_bytes(texts(token)) == list(tokenizer.decode([token]).encode())


def test_chat_logprobs_carry_the_partial_tokens_own_bytes_and_completions_their_shown_text(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("€")
    assert len(ids) > 1
    entries = [[texts(i), -0.5, [[texts(i), -0.5]]] for i in ids]
    chat = ResponseBuilder(CHAT, "chatcmpl-1", "m").logprobs(entries)["content"]
    assert [e["token"] for e in chat] == ["\ufffd"] * len(ids)
    assert bytes(b for e in chat for b in e["bytes"]).decode("utf-8") == "€"
    assert [e["top_logprobs"][0]["bytes"] for e in chat] == [e["bytes"] for e in chat]
    completion = ResponseBuilder(COMPLETION, "cmpl-1", "m").logprobs(entries)
    assert completion["tokens"] == ["\ufffd"] * len(ids) and completion["top_logprobs"][0] == {"\ufffd": -0.5}
    assert completion["text_offset"] == list(range(len(ids)))


def test_a_tokenizer_without_a_byte_decoder_keeps_the_decoded_text():
    class Plain:  # a slow tokenizer: no backend to read the decoder of
        def decode(self, ids):
            return "\ufffd"

        def convert_ids_to_tokens(self, token):
            return "<0xE2>"

    assert TokenTexts(Plain())(5) == "\ufffd"
