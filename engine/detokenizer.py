"""Incremental detokenisation whose streamed deltas concatenate to exactly
`tokenizer.decode(output_ids, skip_special_tokens=True)` (cut at a stop string, if any; with
skip_special_tokens=False, the decode that keeps special tokens).

Decoding the whole output at every token costs O(n) a step (1.3 ms at 4000 ids on a 2-core
CPU, benchmarks/bench_detokenizer.py; x 64 sequences, longer than a decode step). So the text
is kept as a fixed head (the decode of the first `head_len` ids) plus the decode of the ids
after it. The head moves
forward only to a boundary where that split was checked to give the full decode with the ids
known then: what decides it (an incomplete UTF-8 character, a SentencePiece leading space,
clean-up of a space before punctuation) sits at the boundary and is fixed once the first id
after it is known. Where no boundary checks out (SentencePiece: every id in the window starts a
word), the head stays and the tail grows until one does.
"""

WINDOW = 64  # ids decoded past the head between moves; a move costs two full decodes
_CONTEXT = 4  # ids decoded before the tail and cut off again
_TRIES = 4  # boundaries tried per move


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), window: int = WINDOW, include_stop: bool = False,
                 skip_special_tokens: bool = True):
        """include_stop: the text ends after the stop string that ended it, not before (vLLM's
        include_stop_str_in_output); skip_special_tokens: as decode takes it."""
        self.tokenizer = tokenizer
        self._decode_ids = decode_route(tokenizer, skip_special_tokens)
        self.stop, self.include_stop = stop, include_stop
        self.window = window
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.sent = ""  # text already handed out
        self.head_len, self.head_text = 0, ""  # decode(ids[:head_len]), checked to split cleanly
        self.next_move = 2 * window  # output length at which to try moving the head
        self.stop_floor = 0  # a stop string counts only if it ends past this (min_tokens)
        self.stopped_by: str | None = None  # the stop string that ended the text

    def update(self, output_ids: list[int], finished: bool, check_stop: bool = True) -> tuple[str, bool]:
        """(new text delta, whether a stop string ended the text); check_stop=False: no stop string
        ends it yet (min_tokens), nor later one that ended in the text of this call."""
        full = self._text(output_ids)
        if not check_stop:
            self.stop_floor = len(full.rstrip("\ufffd"))
        cut = self._find_stop(full) if check_stop else None
        if cut is not None:
            return self._emit(full[:cut]), True
        if finished:
            return self._emit(full), False
        # hold back what a later token may still change: a partial UTF-8 character, trailing
        # spaces (tokenizer clean-up may merge them) and a possible stop-string prefix
        safe = full.rstrip("\ufffd").rstrip()
        if self.hold_back:
            safe = safe[:max(len(self.sent), len(safe) - self.hold_back)]
        return (self._emit(safe) if safe.startswith(self.sent) else ""), False

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids)

    def _text(self, ids: list[int]) -> str:
        """decode(ids), from the head and the ids after it."""
        if len(ids) >= self.next_move:
            self._move_head(ids)
        return self.head_text + self._tail(ids, self.head_len)

    def _tail(self, ids: list[int], boundary: int) -> str:
        """The text of ids[boundary:], decoded after a few ids of context and cut after their
        text, so a piece that starts the tail decodes as it does mid-text (a SentencePiece
        leading space is kept)."""
        if boundary == 0:
            return self._decode(ids)
        context = ids[max(0, boundary - _CONTEXT):boundary]
        with_context, alone = self._decode(context + ids[boundary:]), self._decode(context)
        return with_context[len(alone):] if with_context.startswith(alone) else "\ufffd"  # fails the check

    def _move_head(self, ids: list[int]) -> None:
        """Move the head to a boundary `window` ids back (or up to _TRIES ids before it) whose
        split gives the full decode with the ids known now."""
        self.next_move = len(ids) + self.window
        full = self._decode(ids)
        for boundary in range(len(ids) - self.window, max(self.head_len, len(ids) - self.window - _TRIES), -1):
            head = self._decode(ids[:boundary])
            if head + self._tail(ids, boundary) == full:
                self.head_len, self.head_text = boundary, head
                return

    def _find_stop(self, full: str) -> int | None:
        """Where the text ends at the first stop string in it (before it, or after it with
        include_stop), or None."""
        start = max(0, len(self.sent) - self.hold_back)
        hits = [(i, i + len(s) if self.include_stop else i, s) for s in self.stop
                if (i := full.find(s, max(start, self.stop_floor - len(s) + 1))) >= 0]
        if not hits:
            return None
        _, end, self.stopped_by = min(hits)
        return end

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # never retract text already streamed
        delta, self.sent = text[len(self.sent):], text
        return delta


def decode_route(tokenizer, skip_special_tokens: bool = True):
    """`ids -> tokenizer.decode(ids, skip_special_tokens=...)`, through the Rust tokenizer
    itself where that is what decode runs: a fast tokenizer without clean-up of tokenization
    spaces (transformers' decode is then the backend's decode after a Python walk over every id,
    `to_py_obj`, which is over half of a decode's time at the ~70 ids the detokenizer decodes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
