"""Structured outputs: a request's JSON schema, regular expression, list of choices or EBNF
grammar, held to token by token.

xgrammar compiles a constraint against the tokenizer's vocabulary (GrammarCompiler, which caches
compiled constraints, so a schema many requests share compiles once a process). Each sequence
walks its constraint with a GrammarMatcher: before a step samples its next token, the matcher
writes the bitmask of the tokens that keep the output a valid prefix (bit v of row r: word v // 32,
bit v % 32), the sampler sets every other token's logit to -inf, and the sampled token is fed
back. Once the constraint is complete only the end-of-sequence tokens remain allowed; the
sequence ends when one is sampled (finish reason "stop").

A constraint is plain data, (kind, text), so it travels with SamplingParams to the engine's
process; the matcher is made there (`Constrained`, which also ends a request whose constraint
admits no next token or costs the step loop too much host time a token). The replica's process compiles it too, to refuse a bad
schema or pattern before the request costs the engine loop anything.

A step that samples for such a sequence is launched only once the sequence's tokens so far are
on the host (its mask depends on them), like a step with a penalty: with async scheduling it is
not launched ahead of the step before it.
"""
import json
import re
import time

import torch
from torch import Tensor

from engine.errors import InvalidRequestError

# json_object: any JSON object; json_schema: text is the schema as JSON; json_schema_compact: the
# same with one layout of whitespace (", " and ": ", no other), for output a program reads, such
# as tool calls (deployments/tool_calls.py), which then cannot run on in whitespace; regex: the
# pattern the whole output matches; choice: text is a JSON list of the strings the output is one
# of; grammar: an EBNF grammar (xgrammar's dialect, GBNF-like) whose rule `root` the output matches
KINDS = ("json_object", "json_schema", "json_schema_compact", "regex", "choice", "grammar")
# characters of a schema, pattern or grammar, and nesting of a JSON schema's text (objects and
# arrays): a compile cannot be interrupted, and its time grows steeply with nesting
MAX_TEXT = 64 << 10
MAX_SCHEMA_DEPTH = 64
# the param of a refused constraint: SamplingParams' field (the HTTP edge names the request's field
# that spelt it)
PARAM = "structured"
# CPU time a sequence's mask and match may take for one token before its request ends: well above
# what an ordinary schema costs over a large vocabulary, well below what stalls every tenant
TOKEN_BUDGET_S = 0.05
# bytes of compiled constraints a process keeps for reuse (xgrammar's cache is unbounded by default)
CACHE_BYTES = 256 << 20


def check_constraint(constraint) -> tuple[str, str]:
    """(kind, text) as SamplingParams keeps it; InvalidRequestError for another shape. Whether
    the text compiles is Grammars.compile's to say."""
    ok = (isinstance(constraint, (tuple, list)) and len(constraint) == 2 and constraint[0] in KINDS
          and isinstance(constraint[1], str))
    if ok and len(constraint[1]) > MAX_TEXT:  # said in the request's terms, without echoing the text
        raise InvalidRequestError(f"the structured output constraint is {len(constraint[1])} characters as "
                                  f"compiled; at most {MAX_TEXT} are taken", PARAM)
    if not ok:
        raise InvalidRequestError(f"structured must be (kind, text) with kind one of {KINDS} and text a "
                                  f"string of at most {MAX_TEXT} characters, got {str(constraint)[:200]!r}", PARAM)
    kind, text = constraint
    if kind != "json_object" and not text:
        raise InvalidRequestError(f"a {kind} constraint needs its text (schema, pattern, choices or grammar)", PARAM)
    return kind, text


def is_choice_list(value) -> bool:
    """Whether `value` is what a choice constraint takes: a non-empty list of non-empty strings."""
    return isinstance(value, list) and bool(value) and all(isinstance(c, str) and c for c in value)


def choice_grammar(choices_json: str) -> str:
    """The EBNF grammar whose output is exactly one of the choices (a JSON list of strings)."""
    try:
        choices = json.loads(choices_json)
    except ValueError as exc:
        raise InvalidRequestError(f"choice: not a JSON list of strings ({exc})", PARAM) from None
    if not is_choice_list(choices):
        raise InvalidRequestError("choice takes a non-empty list of non-empty strings", PARAM)
    # JSON string literals are the grammar's: the same escapes for quotes, backslashes, newlines
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiles constraints for one tokenizer (thread-safe: xgrammar's compiler is)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        import xgrammar  # imported here: an engine without a tokenizer never needs it
        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        # one thread a compile: xgrammar's default of 8 takes the CPU the step loop and its
        # mask fills run on
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)

    def compile(self, constraint: tuple[str, str]):
        """The constraint's compiled grammar; InvalidRequestError when it does not compile (a
        schema that is not JSON, a pattern or grammar with a syntax error)."""
        kind, text = check_constraint(constraint)
        try:
            if kind == "json_object":  # OpenAI's JSON mode: an object (the builtin JSON grammar takes any value)
                return self._compiler.compile_json_schema('{"type": "object"}')
            if kind in ("json_schema", "json_schema_compact"):
                _check_depth(text)
                return self._compiler.compile_json_schema(text, any_whitespace=kind == "json_schema")
            if kind == "regex":
                return self._compiler.compile_regex(text)
            return self._compiler.compile_grammar(choice_grammar(text) if kind == "choice" else text)
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar reports every bad input as RuntimeError or ValueError
            raise InvalidRequestError(f"the {kind} constraint does not compile: {_first_line(exc)}", PARAM) from None

    def matcher(self, constraint: tuple[str, str]) -> "Constrained":
        """A fresh walk through the constraint: one a sequence."""
        return Constrained(self._xgr.GrammarMatcher(self.compile(constraint)))


class Constrained:
    """A sequence's walk through its constraint: the matcher, and what it cost. `fault` says why
    the request must end (its constraint admits no next token, or costs more than
    TOKEN_BUDGET_S a token of host time, which the step loop waits for), else None."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.fault: str | None = None
        self._fill_seconds = 0.0

    def fill(self, mask: Tensor, row: int) -> None:
        start = time.thread_time()  # this thread's CPU: waits for the GIL or a core are not the constraint's
        self.matcher.fill_next_token_bitmask(mask, row)
        self._fill_seconds = time.thread_time() - start
        if not bool(mask[row].any()):
            self.fault = "the structured output constraint admits no token after the output so far"

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def charge(self, accept_seconds: float) -> None:
        """Sets fault when the last token's mask and match took more than TOKEN_BUDGET_S of CPU."""
        spent = self._fill_seconds + accept_seconds
        if spent > TOKEN_BUDGET_S and self.fault is None:
            self.fault = (f"the structured output constraint took {spent * 1e3:.0f} ms of CPU to match one token "
                          f"(at most {TOKEN_BUDGET_S * 1e3:.0f}); an ambiguous pattern such as (a*)* grows with "
                          "the output: simplify it")


def fill_bitmask(walks: list[Constrained], vocab_size: int) -> Tensor:
    """[len(walks), ceil(V / 32)] int32 on the host: row i the tokens walks[i] allows next."""
    import xgrammar
    mask = xgrammar.allocate_token_bitmask(len(walks), vocab_size)
    for row, walk in enumerate(walks):
        walk.fill(mask, row)
    return mask


def _check_depth(schema_text: str) -> None:
    try:
        schema = json.loads(schema_text)
    except ValueError as exc:
        raise InvalidRequestError(f"the json_schema constraint is not JSON: {exc}", PARAM) from None
    level = [(schema, 1)]
    while level:
        value, depth = level.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequestError(f"the json_schema constraint's JSON nests deeper than {MAX_SCHEMA_DEPTH} levels", PARAM)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        level += [(child, depth + 1) for child in children]


def apply_bitmask(logits: Tensor, rows: Tensor, bitmask: Tensor) -> Tensor:
    """logits [B, V] with -inf on the tokens that rows' bitmask rows leave out (a new tensor).
    rows [R] int64 and bitmask [R, ceil(V / 32)] int32 on logits' device."""
    vocab = logits.shape[1]
    # the words' bytes (little-endian: bit b of byte j is token 8j + b), unpacked one byte a token:
    # a 64-row step over a 152k vocabulary holds ~10 MB of these, not int32s
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    bits = (bitmask.contiguous().view(torch.uint8)[:, :, None] >> shifts) & 1
    allowed = bits.view(bits.shape[0], -1)[:, :vocab]
    picked = logits.index_select(0, rows)
    return logits.index_copy(0, rows, picked.masked_fill(allowed == 0, float("-inf")))


def _first_line(exc: Exception) -> str:
    """The reason xgrammar gives, without its log prefix ("[12:00:00] /project/cpp/x.cc:94: ",
    "Check failed: (...) is false: ")."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", lines[0] if lines else type(exc).__name__)
    return re.sub(r"^Check failed: \(.*?\) is false: ", "", text)[:300]
