"""OpenAI-compatible request and response bodies (pydantic: the HTTP edge only)."""
from __future__ import annotations

import functools
import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from adapter_store.errors import InvalidNameError
from adapter_store.names import check_name
from deployments.request_rules import (CHAT_ONLY_NO_OPS, COMPLETION_ONLY_NO_OPS, MAX_CHOICES,
                                       MAX_STOP_SEQUENCES, MAX_TOKEN_ID_DIGITS, NO_OP_VALUES,
                                       TEMPLATE_CALL_KEYWORDS, TEMPLATE_TURN_OPTIONS, FieldError,
                                       find_lone_surrogate,
                                       refuse_unless_no_op)
from deployments.structured_fields import structured_constraint
from deployments.tool_calls import ToolPlan, tool_plan
from engine.sampling_params import MAX_LOGPROBS


class _Lenient(BaseModel):
    """Strict fields (`"max_tokens": true` or `"stream": "yes"` are mistakes to report, not values
    to coerce), with two readings OpenAI's and vLLM's clients rely on: null for a field that has a
    default is that default (OpenAI's spec makes them nullable; SDK wrappers send unset options as
    null), and a whole float for an integer field is that integer (`"max_tokens": 16.0`, as vLLM's
    lax parsing takes it)."""
    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_and_whole_floats(cls, data):
        if not isinstance(data, dict):
            return data
        defaulted, integers = _lenient_fields(cls)
        if not any((v is None and k in defaulted) or (isinstance(v, float) and k in integers) for k, v in data.items()):
            return data
        return {k: (int(v) if isinstance(v, float) and k in integers and v.is_integer() else v)
                for k, v in data.items() if not (v is None and k in defaulted)}


@functools.cache
def _lenient_fields(model: type[BaseModel]) -> tuple[frozenset[str], frozenset[str]]:
    """(fields whose default is not None, fields typed int or int | None) of a model."""
    defaulted, integers = set(), set()
    for name, info in model.model_fields.items():
        if not info.is_required() and info.default is not None:
            defaulted.add(name)
        if info.annotation is int or set(typing.get_args(info.annotation)) == {int, type(None)}:
            integers.add(name)
    return frozenset(defaulted), frozenset(integers)


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk's counts so far


class _Body(_Lenient):
    # Unknown OpenAI fields (user, metadata, ...) are accepted and ignored, as the SDK sends them;
    # fields that would change the output and are not supported are refused (below).
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = find_lone_surrogate(data)
        if where is not None:
            field = where.removeprefix("a key of ")
            raise FieldError(None if field == "the request" else field,
                             f"{where} holds a lone UTF-16 surrogate (e.g. \\ud800), which is not "
                             "text; send valid Unicode")
        return data


class _SamplingFields(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices: engine requests of their own (choices.py)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM's extensions (the openai SDK sends them through extra_body)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1: no limit")
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # the text keeps the stop string that ended it
    skip_special_tokens: bool = True  # false: special tokens the model makes stay in the text
    # vLLM's: the prompt cut to its last k tokens (-1: to max_model_len), a tokenizer's BOS kept first
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    return_token_ids: bool = Field(default=False, description="each choice also carries the "
                                   "generated token ids (per chunk when streaming)")
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # None (JSON null): 0
    min_tokens: int | None = Field(default=None, ge=0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1)  # vLLM's: only these may be sampled
    # structured outputs (at most one constraint a request): OpenAI's response_format, vLLM's
    # guided_* fields and their newer structured_outputs object (deployments/structured_fields.py)
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None
    tools: list | None = None
    functions: list | None = None
    # refused unless they ask for nothing (NO_OP_VALUES)
    modalities: Any = None
    audio: Any = None
    use_beam_search: Any = None
    prompt_logprobs: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    spaces_between_special_tokens: Any = None
    bad_words: Any = None
    logits_processors: Any = None
    length_penalty: Any = None
    return_tokens_as_token_ids: Any = None
    _structured: tuple[str, str] | None = PrivateAttr(default=None)
    _structured_field: str | None = PrivateAttr(default=None)  # the field that spelt it
    takes_tools: ClassVar[bool] = False  # chat completions take tools (deployments/tool_calls.py)
    _tool_plan: ToolPlan | None = PrivateAttr(default=None)

    @field_validator(*(name for name in NO_OP_VALUES if name not in COMPLETION_ONLY_NO_OPS + CHAT_ONLY_NO_OPS))
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        return refuse_unless_no_op(value, info)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for token, bias in (value or {}).items():
            # str.isdigit() alone admits "²" and full-width digits
            digits = token.isascii() and token.isdigit() and len(token) <= MAX_TOKEN_ID_DIGITS
            if not digits or not -100 <= bias <= 100:
                raise ValueError("logit_bias maps token ids (ASCII decimal strings of up to "
                                 f"{MAX_TOKEN_ID_DIGITS} digits) to biases in [-100, 100]")
        return value

    @model_validator(mode="after")
    def _stream_options_with_stream(self):
        # as OpenAI refuses it; an empty object passes, as vLLM lets it
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _one_constraint(self):
        self._structured_field, self._structured = structured_constraint(self) or (None, None)
        return self

    def structured_field(self) -> str | None:
        """The request's field that spelt its structured output constraint (a forced tool
        choice's: "tools"), or None."""
        return self._structured_field

    @field_validator("tools", "functions")
    @classmethod
    def _tools_here(cls, value, info: ValidationInfo):
        if value and info.field_name == "functions":
            raise ValueError("functions (the legacy function calling) is not supported: send tools")
        if value and not cls.takes_tools:
            raise ValueError("tools are a field of chat completions (/v1/chat/completions)")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _some_tokens(cls, value):
        if value == 0:
            raise ValueError("truncate_prompt_tokens keeps the prompt's last k >= 1 tokens (-1: max_model_len)")
        return value

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, value, info: ValidationInfo):
        if value is not None and any(t < 0 for t in value):
            raise ValueError(f"{info.field_name} must be token ids >= 0")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_type(cls, value):
        # pydantic would name only the first type it tried ("should be a valid string")
        if not (value is None or isinstance(value, (str, list))):
            raise ValueError("stop must be a string or a list of strings")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    def tool_plan(self) -> ToolPlan | None:
        """The request's tools (deployments/tool_calls.py): None but on chat completions with tools."""
        return self._tool_plan

    def stop_sequences(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def sampling(self) -> dict:
        """The fields the engine's SamplingParams take, as the replica receives them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": max(self.top_k, 0),
                "seed": self.seed, "stop": self.stop_sequences(), "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
                "ignore_eos": self.ignore_eos, "stop_token_ids": tuple(self.stop_token_ids or ()),
                "include_stop_str_in_output": self.include_stop_str_in_output,
                "skip_special_tokens": self.skip_special_tokens,
                "logit_bias": {int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None,
                "allowed_token_ids": tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
                "logprobs": self.logprob_alternatives(), "min_p": self.min_p or 0.0,
                "min_tokens": self.min_tokens or 0, "structured": self._structured}

    def logprob_alternatives(self) -> int | None:
        """Alternatives a token whose logprobs the response carries (0: the sampled token's
        only), None for no logprobs; each request kind spells it its own way."""
        raise NotImplementedError

    def stream_usage(self):
        """The stream's usage reporting (openai_format.StreamUsage, which imports this module)."""
        from deployments.openai_format import StreamUsage

        options = self.stream_options or StreamOptions()
        return StreamUsage(options.include_usage, options.continuous_usage_stats)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = Field(default=False)  # the prompt, before the completion, in text and in logprobs
    # vLLM's: a text prompt gets the tokenizer's special tokens (a BOS where it adds one)
    add_special_tokens: bool = True
    # the legacy API's: the sampled token's logprob and this many most likely tokens' (OpenAI
    # caps it at 5, vLLM at its max_logprobs, 20)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    top_logprobs: Any = None  # chat's spelling: refused here (below)
    best_of: Any = None  # refused unless 1 (NO_OP_VALUES)
    suffix: Any = None  # refused unless ""

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    def sampling(self) -> dict:
        # echo with logprobs: the prompt's tokens get theirs too (the first one's is null)
        return {**super().sampling(), "prompt_logprobs": self.logprobs if self.echo else None}

    @field_validator("top_logprobs")
    @classmethod
    def _chat_only(cls, value):
        if value is not None:
            raise ValueError("top_logprobs is the chat API's; a completion takes logprobs=<alternatives>")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list):
            if not value or any(isinstance(one, list) and not one for one in value):
                raise ValueError("prompt must not be empty, nor any prompt of a batch")
            if isinstance(value[0], (str, list)) and len(value) == 1:  # lm-eval sends [[ids]]
                return value[0]
        return value

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or a batch (a list of strings or of lists of ids), each with
        n choices of its own, as OpenAI's and vLLM's completions take them."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @field_validator(*COMPLETION_ONLY_NO_OPS)
    @classmethod
    def _unsupported_here(cls, value, info: ValidationInfo):
        return refuse_unless_no_op(value, info)


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as a response gave it


class ToolCall(BaseModel):
    """An assistant's earlier call in a conversation, as a response gave it (checked here: chat
    templates index its fields)."""
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message's answer to one of them
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self):
        # as OpenAI's: only an assistant's turn that calls tools may leave content out; a user
        # message without it would otherwise reach the template as an empty turn
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            needs = "content or tool_calls" if self.role == "assistant" else "content"
            article = "an" if self.role == "assistant" else "a"
            raise FieldError("content", f"{article} {self.role} message needs {needs}")
        return self

    def for_template(self) -> dict:
        """The message as chat templates take it (text content; an assistant's tool calls and a
        tool's call id where given)."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls is not None:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class _TemplateOptions(_Body):
    """The chat template's options, as vLLM takes them: the assistant's turn opened for the reply,
    or the last message (an assistant's) continued instead; variables the template reads (Qwen3's
    enable_thinking, ...). Chat completions and /tokenize take them alike."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=32)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value):
        for key, item in (value or {}).items():
            if not key.isidentifier() or key in TEMPLATE_CALL_KEYWORDS:
                raise ValueError(f"{key!r} is not a variable a chat template can be given; "
                                 f"chat_template_kwargs takes the template's own (e.g. enable_thinking)")
            if key in TEMPLATE_TURN_OPTIONS and not isinstance(item, bool):
                raise ValueError(f"{key} must be true or false")
        return value

    @model_validator(mode="after")
    def _template_turn(self):
        options = self.template_options()
        if options["continue_final_message"] and options["add_generation_prompt"]:
            raise FieldError("continue_final_message", "continue_final_message continues the last message "
                             "and add_generation_prompt opens a new one: set add_generation_prompt to false "
                             "with it")
        return self

    def template_options(self) -> dict:
        """What the replica hands the chat template beside the messages and tools: the fields, which
        chat_template_kwargs may override (vLLM merges them so)."""
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, **(self.chat_template_kwargs or {})}


class ChatCompletionRequest(_SamplingFields, _TemplateOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None  # None (JSON null): false
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # tool calling (deployments/tool_calls.py); tools itself is a field of every request, refused
    # on completions
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    takes_tools: ClassVar[bool] = True
    # vLLM's: the rendered template is tokenised as it is (it holds its own BOS, if any)
    add_special_tokens: bool = False
    # refused unless they ask for nothing (NO_OP_VALUES)
    chat_template: Any = None
    documents: Any = None
    echo: Any = None

    @field_validator(*CHAT_ONLY_NO_OPS)
    @classmethod
    def _unsupported_here(cls, value, info: ValidationInfo):
        return refuse_unless_no_op(value, info)

    @model_validator(mode="after")
    def _one_constraint(self):
        """The structured output constraint, a forced tool choice's included: one at most."""
        self._structured_field, self._structured = structured_constraint(self) or (None, None)
        self._tool_plan = tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls)
        forced = self._tool_plan.constraint() if self._tool_plan else None
        if forced is not None:
            if self._structured is not None:
                raise FieldError("tool_choice", "tool_choice \"required\" or a named tool constrains the output: "
                                 "it takes no response_format or guided_* constraint beside it")
            self._structured_field, self._structured = "tools", forced  # the tools' parameter schemas
        return self

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:  # OpenAI refuses it too
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_TemplateOptions):
    """vLLM's POST /tokenize body: a prompt as /v1/completions takes it, or messages as
    /v1/chat/completions take them (with the template's options and tools). The answer's ids are
    the ones those routes would give the model, add_special_tokens likewise (unset: true for a
    prompt, false for messages)."""
    model: str | None = Field(default=None, min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list | None = None
    return_token_strs: bool | None = False
    add_special_tokens: bool | None = None
    # refused unless they ask for nothing (NO_OP_VALUES)
    chat_template: Any = None
    documents: Any = None
    _tool_plan: ToolPlan | None = PrivateAttr(default=None)

    @field_validator("chat_template", "documents")
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        return refuse_unless_no_op(value, info)

    @model_validator(mode="after")
    def _template_turn(self):
        """The template's options matter with messages only (a prompt's body ignores them, as vLLM's does)."""
        return self if self.messages is None else super()._template_turn()

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            both = self.prompt is not None
            raise FieldError("messages" if both else "prompt",
                             "send a prompt (text, as /v1/completions takes it) or messages (as "
                             f"/v1/chat/completions take them){', not both' if both else ''}")
        if self.tools and self.messages is None:
            raise FieldError("tools", "tools are rendered by the chat template: they go with messages")
        self._tool_plan = tool_plan(self.tools, None, None)
        return self

    def payload(self) -> dict:
        """What the engine replica's `tokenize` takes (deployments/replica.py)."""
        payload = {"return_token_strs": bool(self.return_token_strs)}
        if self.add_special_tokens is not None:
            payload["add_special_tokens"] = self.add_special_tokens
        if self.messages is None:
            return {"prompt": self.prompt, **payload}
        return {"messages": [m.for_template() for m in self.messages], "template_options": self.template_options(),
                "template_variables": bool(self.chat_template_kwargs),
                "tools": self._tool_plan.tools if self._tool_plan is not None else None, **payload}


class DetokenizeRequest(_Body):
    """vLLM's POST /detokenize body: token ids back to the text they decode to."""
    model: str | None = Field(default=None, min_length=1)
    tokens: list[int]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held (engine.prefix_cache)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))

    @classmethod
    def of_item(cls, item: dict, completion_tokens: int | None = None) -> "Usage":
        """From a replica stream's last item (completion_tokens: a sum over choices instead)."""
        done = item["completion_tokens"] if completion_tokens is None else completion_tokens
        return cls.of(item["prompt_tokens"], done, item.get("cached_tokens", 0))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0  # Unix seconds: the ingress's start for the base model, an adapter's upload
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None  # vLLM's: the context a request's prompt and output share


class AdapterCard(BaseModel):
    id: str
    name: str
    version: str
    owner: str
    shared: bool
    object: Literal["adapter"] = "adapter"
    manifest: dict = Field(default_factory=dict)


class _LoRAName(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str

    @field_validator("lora_name")
    @classmethod
    def _safe_name(cls, value):
        try:
            return check_name(value)
        except InvalidNameError as exc:
            raise ValueError(str(exc)) from None


class LoadLoRAAdapterRequest(_LoRAName):
    """vLLM's POST /v1/load_lora_adapter body; `load_inplace` is accepted and needs nothing:
    every load is a new version of `lora_name`, used by requests from then on."""
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False

    @field_validator("lora_path")
    @classmethod
    def _server_directory(cls, value):
        if "://" in value:
            raise ValueError("only a directory on the server can be loaded from (s3:// and other "
                             "URLs are not supported yet); upload the files with POST /v1/adapters")
        if not value.startswith("/"):
            raise ValueError("give the directory as an absolute path")
        return value


class UnloadLoRAAdapterRequest(_LoRAName):
    """vLLM's POST /v1/unload_lora_adapter body; vLLM's `lora_int_id` names nothing here."""
    lora_int_id: int | None = None
