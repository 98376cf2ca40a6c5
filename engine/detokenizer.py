"""Incremental detokenisation whose streamed deltas concatenate to exactly
`tokenizer.decode(output_ids, skip_special_tokens=True)` (cut at a stop string, if any)."""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.sent = ""  # text already handed out

    def update(self, output_ids: list[int], finished: bool) -> tuple[str, bool]:
        """(new text delta, whether a stop string ended the text)."""
        full = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        cut = self._find_stop(full)
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

    def _find_stop(self, full: str) -> int | None:
        start = max(0, len(self.sent) - self.hold_back)
        hits = [i for s in self.stop if (i := full.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # never retract text already streamed
        delta, self.sent = text[len(self.sent):], text
        return delta
