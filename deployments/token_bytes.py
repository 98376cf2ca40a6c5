"""A token's own bytes, for logprobs, where its text alone is part of a character.

A byte-level BPE (Qwen's, GPT-2's) or a sentencepiece model with byte fallback (Mixtral's) may
split one UTF-8 character over several tokens; `decode([token])` then gives U+FFFD, whose bytes
are not the token's, where OpenAI's chat logprobs carry `bytes` so that a client can join tokens
back into text. Here such a token's text is its raw bytes decoded with "surrogateescape": a
client is shown U+FFFD (`shown`), and `token_bytes` gives the token's own bytes back. The
replica hands these strings to the ingress by pickle (Serve's transports of the app), which
carries lone surrogates; only `shown` and `token_bytes` output reaches JSON.
"""
import json
import re

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece's byte fallback pieces


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE's character for each byte, inverted: bytes that are printable and not
    a space stand for themselves; the other 68 take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(0x100 + i): b for i, b in enumerate(moved)}}


def _decoder_kinds(tokenizer) -> set[str]:
    """The types of a fast tokenizer's decoder and of the decoders it chains ({} for others, and
    for a decoder that cannot say: its tokens keep their decoded texts)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        state = json.loads(decoder.__getstate__()) if decoder is not None else {}
    except Exception:  # noqa: BLE001 - a custom decoder's state is not ours to require
        return set()
    found, todo = set(), [state]
    while todo:
        decoder = todo.pop()
        found.add(decoder.get("type"))
        todo += decoder.get("decoders") or []
    return found


class TokenTexts:
    """Each token's text for logprobs, cached by id (at most the vocabulary)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer) if tokenizer is not None else set()
        self._alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
        self._byte_fallback = "ByteFallback" in kinds
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self._text(token)
        return self._texts[token]

    def _text(self, token: int) -> str:
        if self._tokenizer is None:  # a checkpoint without a tokenizer serves token ids only
            return ""
        text = self._tokenizer.decode([token])
        if "\ufffd" not in text:
            return text
        raw = self._raw(self._tokenizer.convert_ids_to_tokens(token))
        return text if raw is None else raw.decode("utf-8", "surrogateescape")

    def _raw(self, piece: str | None) -> bytes | None:
        if not piece:
            return None
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        match = _BYTE_PIECE.match(piece) if self._byte_fallback else None
        return bytes([int(match.group(1), 16)]) if match else None


def shown(text: str) -> str:
    """The text a client is shown for a token's text: a byte no character holds as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if _escaped(text) else text


def token_bytes(text: str) -> list[int]:
    """The UTF-8 bytes of a token's text, a partial character's own bytes included."""
    return list(text.encode("utf-8", "surrogateescape" if _escaped(text) else "surrogatepass"))


def _escaped(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)
