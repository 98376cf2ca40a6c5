"""The rules a request body's fields follow, apart from their pydantic models (schemas.py):
the limits on lists and keys, what counts as asking for nothing, and the text JSON can carry
that nothing downstream can."""
from __future__ import annotations

import json

from pydantic import ValidationInfo

MAX_STOP_SEQUENCES = 4
MAX_TOKEN_ID_DIGITS = 10  # logit_bias keys: ids of any vocabulary, int() of them stays cheap


class FieldError(ValueError):
    """A rule one field breaks, found where pydantic sees the whole body (a model validator, which
    it reports at no field): the 400 names `field` in OpenAI's `param`, as it does for a field
    validator's error. The message names the field itself."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def find_lone_surrogate(data) -> str | None:
    """Where in a parsed JSON body a string (or key) holds a lone UTF-16 surrogate, or None.

    JSON's "\\ud800" escape parses into such a string; it has no UTF-8 form, so the
    tokenizer and every log line downstream would fail on it.
    """
    pending = [("", data)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return where or "the request"
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and _has_surrogate(key):
                    return f"a key of {where or 'the request'}"
                pending.append((f"{where}.{key}" if where else str(key), item))
        elif isinstance(value, list):
            pending += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    return None


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # the only str that has no UTF-8 form: one with a lone surrogate
        return True
    return False


# Fields that would change the output and that this server does not implement, with the
# values that ask for nothing (None always does): any other value is refused by name rather
# than answered as if it had not been sent. OpenAI's best_of and suffix (completions), chat's
# audio output, and the sampling extensions vLLM users send through extra_body.
NO_OP_VALUES: dict[str, tuple] = {
    "best_of": (1,), "suffix": ("",), "modalities": (["text"],), "audio": (),
    "use_beam_search": (False,), "prompt_logprobs": (0,),
    # vLLM's options of its guided_* fields: the backend is xgrammar here, whitespace its default
    "guided_decoding_backend": ("xgrammar", "auto"), "guided_whitespace_pattern": (),
}


NO_OP_VALUES.update({
    # vLLM's chat options not implemented here: a template of the request's own, documents for
    # the template, echo of the last message
    "chat_template": (), "documents": (), "echo": (False,),
    # vLLM's sampling and output extensions not implemented here: spaces around special tokens
    # kept in the text (a slow tokenizer's option), words banned, logits processors by name,
    # beam search's length penalty, tokens spelt "token_id:<id>"
    "spaces_between_special_tokens": (True,), "bad_words": ([],), "logits_processors": (), "length_penalty": (1.0,),
    "return_tokens_as_token_ids": (False,),
})
COMPLETION_ONLY_NO_OPS = ("best_of", "suffix")
CHAT_ONLY_NO_OPS = ("chat_template", "documents", "echo")  # the others: every request's
# parameters of transformers' apply_chat_template itself (5.x, and `self`): chat_template_kwargs
# passes the template's own variables and may not set these, which the replica sets or which
# would make the call something else than a rendering to text. add_generation_prompt and
# continue_final_message it may set, as in vLLM: they are the template's variables too
TEMPLATE_CALL_KEYWORDS = frozenset({
    "self", "kwargs", "conversation", "messages", "tools", "documents", "chat_template", "tokenize",
    "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})
TEMPLATE_TURN_OPTIONS = ("add_generation_prompt", "continue_final_message")
# choices one request may ask for (n); each counts against the tenant's requests in flight
MAX_CHOICES = 16


def refuse_unless_no_op(value, info: ValidationInfo):
    """`value` if it asks for nothing (see NO_OP_VALUES), else a ValueError naming the field."""
    no_ops = NO_OP_VALUES[info.field_name]
    # type() too: True == 1 and 0.0 == False, but `"best_of": true` is no request for one
    if value is None or any(type(value) is type(ok) and value == ok for ok in no_ops):
        return value
    allowed = f" or set it to {json.dumps(no_ops[0])}" if no_ops else ""
    raise ValueError(f"{info.field_name} is not supported by this server; leave it unset{allowed}")
