"""IncrementalDetokenizer against tokenizer.decode of the whole output, for long outputs where
the decoded head moves: a byte-level BPE tokenizer (the tiny checkpoints') and a SentencePiece-
style one (Metaspace: a leading space is dropped when a piece starts the text) built here."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer

TEXT = ("Mixture of experts routes each token to a few experts; a LoRA adapter per tenant adds a "
        "small delta. Ünïcödé, 数字 and emoji 🙂 keep the byte-level pieces honest! ") * 20


@pytest.fixture(scope="module")
def byte_level(checkpoints):
    return AutoTokenizer.from_pretrained(str(checkpoints["qwen3_moe"]))


@pytest.fixture(scope="module")
def metaspace():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def stream(tokenizer, ids: list[int], stop=(), window: int = 8, skip: bool = True) -> tuple[str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop, window=window, skip_special_tokens=skip)
    text = ""
    for k in range(1, len(ids) + 1):
        delta, hit = detok.update(ids[:k], finished=k == len(ids))
        text += delta
        if hit:
            break
    return text, detok


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
@pytest.mark.parametrize("source", ["random", "text"])
def test_long_outputs_stream_exactly_their_decode(request, which, source):
    tokenizer = request.getfixturevalue(which)
    rng = random.Random(3)
    if source == "random":  # any ids, specials included: partial characters, odd boundaries
        ids = [rng.randrange(len(tokenizer)) for _ in range(400)]
    else:
        ids = tokenizer.encode(TEXT, add_special_tokens=False)[:400]
    text, detok = stream(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.head_len > 0  # the head moved: most of the text came from short decodes


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_with_skip_special_tokens_false_the_stream_is_the_decode_that_keeps_them(request, which):
    tokenizer = request.getfixturevalue(which)
    rng = random.Random(5)
    specials = tokenizer.all_special_ids
    ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tokenizer)) for _ in range(400)]
    kept = tokenizer.decode(ids, skip_special_tokens=False)
    assert kept != tokenizer.decode(ids, skip_special_tokens=True)  # the specials are in this output
    assert stream(tokenizer, ids, skip=False)[0] == kept


def test_a_stop_string_far_into_a_long_output(byte_level):
    ids = byte_level.encode(TEXT, add_special_tokens=False)[:300]
    full = byte_level.decode(ids, skip_special_tokens=True)
    stop = "emoji 🙂 keep"
    cut = full.find(stop, len(full) // 2)
    assert cut > 0
    text, detok = stream(byte_level, ids, stop=(stop,))
    assert text == full[:full.find(stop)] and detok.head_len > 0


def test_a_tokenizer_that_cleans_up_spaces_streams_its_cleaned_decode():
    """transformers' clean-up of tokenization spaces (" ," -> ",") happens outside the Rust
    tokenizer, so a tokenizer with it on must not take the detokenizer's direct-to-Rust decode."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    tok.train_from_iterator(["Hello , world . How are you ? Fine , thanks ! " * 10],
                            trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    ids = tokenizer.encode("Hello, world. How are you? Fine, thanks! " * 12, add_special_tokens=False)
    text, detok = stream(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert " ," not in text and detok.head_len > 0



class _CharTokenizer:
    """One character a token (id = code point), for stop-string arithmetic."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("min_tokens,text,finish", [
    (6, "xENDab", None),  # END ended at the 4th token, before min_tokens: passed
    (6, "xENDabEND", "xENDab"),  # the next END, after it, ends the text
    (3, "xEND", "x"),  # END ends at the 4th token, past min_tokens: ends the text
])
def test_a_stop_string_ending_before_min_tokens_is_passed_even_inside_the_held_back_text(min_tokens, text, finish):
    detok = IncrementalDetokenizer(_CharTokenizer(), stop=("END",))
    ids, ended, sent = [], None, ""
    for char in text:
        ids.append(ord(char))
        delta, hit = detok.update(ids, False, check_stop=len(ids) >= min_tokens)
        sent += delta
        if hit:
            ended = sent
            break
    assert ended == finish
    if finish is None:
        assert sent + detok.update(ids, True)[0] == text


@pytest.mark.parametrize("include, finish", [(False, "xy"), (True, "xyEND")])
def test_the_text_ends_before_the_stop_string_or_after_it_when_it_is_kept(include, finish):
    detok = IncrementalDetokenizer(_CharTokenizer(), stop=("END", "ab"), include_stop=include)
    ids, sent = [], ""
    for char in "xyENDab":
        ids.append(ord(char))
        delta, hit = detok.update(ids, False)
        sent += delta
        if hit:
            break
    assert hit and sent == finish
