"""Structured outputs (SamplingParams.structured): a JSON schema, a regular expression, a list of
choices or an EBNF grammar held to token by token on the tiny random model, whose unconstrained
output is noise. What the engine returns is checked with Python's own json and re, not with the
grammar library that made the masks."""
import json
import re

import pytest
import torch

from engine import InvalidRequestError, SamplingParams
from engine.structured import apply_bitmask
from tests.engine.helpers import PROMPTS, make_engine, run_to_end

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "kind": {"enum": ["cat", "dog"]}},
          "required": ["n", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(checkpoints):
    return make_engine(checkpoints["qwen3_moe"], max_model_len=256)


def generate(engine, constraint, max_tokens=120, prompts=PROMPTS, **kw):
    params = [SamplingParams(max_tokens=max_tokens, structured=constraint, **kw) for _ in prompts]
    return [engine.generate([p], q)[0] for p, q in zip(prompts, params)]


def compile_fails(engine, monkeypatch, error: Exception) -> None:
    """The engine's own compile of every constraint raises `error` (the caller's did not)."""
    def broken(constraint):
        raise error
    monkeypatch.setattr(engine.inputs, "grammar_matcher", broken)


def finished(outs):
    done = [o for o in outs if o["finish_reason"] == "stop"]
    assert done, f"no output completed its constraint within max_tokens: {outs}"
    return done


def test_json_schema_outputs_parse_and_hold_the_schemas_types_and_enum(engine):
    outs = generate(engine, ("json_schema", json.dumps(SCHEMA)), temperature=1.0, seed=7)
    for out in finished(outs):
        value = json.loads(out["text"])
        assert set(value) == {"n", "kind"}
        assert type(value["n"]) is int and value["kind"] in ("cat", "dog")


def test_compact_json_schema_outputs_have_one_layout_and_complete_greedily(engine):
    """The compact kind (tool calls' arguments): the text is json.dumps of its own value, so the
    tiny model, whose greedy output runs on in whitespace under the plain kind, completes it."""
    bounded = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog"]}},
               "required": ["ok", "kind"], "additionalProperties": False}  # no value may run on either
    outs = generate(engine, ("json_schema_compact", json.dumps(bounded)), max_tokens=60, temperature=0)
    assert all(o["finish_reason"] == "stop" for o in outs), outs
    for out in outs:
        value = json.loads(out["text"])
        assert out["text"] == json.dumps(value) and type(value["ok"]) is bool and value["kind"] in ("cat", "dog")


def test_json_object_outputs_parse_as_json_objects(engine):
    for out in finished(generate(engine, ("json_object", ""), temperature=0)):
        assert isinstance(json.loads(out["text"]), dict)


def test_choice_outputs_are_exactly_one_of_the_choices(engine):
    choices = ['say "yes"', "no\\way", "maybe\nlater", "ünïcode"]
    outs = generate(engine, ("choice", json.dumps(choices)), temperature=1.0, seed=3)
    assert all(o["finish_reason"] == "stop" for o in outs)
    assert all(o["text"] in choices for o in outs)


def test_regex_and_ebnf_grammar_outputs_match_the_pattern_whole(engine):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for out in finished(generate(engine, ("regex", pattern), temperature=0)):
        assert re.fullmatch(pattern, out["text"]), out["text"]
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "x" [0-9]'
    for out in finished(generate(engine, ("grammar", grammar), temperature=1.0, seed=11)):
        assert re.fullmatch(r"\(([a-c]|x[0-9])(,([a-c]|x[0-9]))*\)", out["text"]), out["text"]


def test_a_completed_constraint_ends_the_sequence_even_with_ignore_eos(engine):
    outs = generate(engine, ("choice", '["alpha", "beta"]'), temperature=0, ignore_eos=True, max_tokens=50)
    assert all(o["finish_reason"] == "stop" and o["text"] in ("alpha", "beta") for o in outs)


def test_unconstrained_requests_batched_with_constrained_ones_are_unchanged(engine):
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = engine.generate([PROMPTS[1]], plain)[0]["token_ids"]
    engine.add_request("regex", PROMPTS[0], SamplingParams(max_tokens=30, temperature=0, structured=("regex", "[a-z]+ [0-9]+")))
    engine.add_request("plain", PROMPTS[1], plain)
    engine.add_request("object", PROMPTS[2], SamplingParams(max_tokens=30, temperature=0, structured=("json_object", "")))
    tokens, steps_together = {"regex": [], "plain": [], "object": []}, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps_together += {o.request_id for o in outs} >= {"regex", "plain"}
        for out in outs:
            tokens[out.request_id] += out.token_ids_delta
    assert steps_together >= 2  # they did share steps
    assert tokens["plain"] == alone


def _nested(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("constraint, message", [
    (("json_schema", "{not json"), "not JSON"),
    (("json_schema", json.dumps({"type": "array", "items": _nested(70)})), "nests deeper than 64"),
    (("regex", "a(b"), "does not compile"),
    (("grammar", "root ::= missing_rule"), "does not compile"),
    (("choice", "[]"), "non-empty list"),
    (("choice", '"yes"'), "non-empty list"),
    (("yaml", "a: 1"), "kind one of"),
    (("json_schema", ""), "needs its text"),
])
def test_constraints_that_do_not_compile_are_refused_before_they_run(engine, constraint, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=4, structured=constraint))
    assert ".cc:" not in str(caught.value) and "Check failed" not in str(caught.value)  # the reason, not the log line
    assert caught.value.param == "structured"  # the HTTP edge names the request's field for it
    assert not engine.has_unfinished_requests()


def test_min_tokens_with_a_constraint_is_refused():
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=8, min_tokens=2, structured=("json_object", ""))


def test_bitmask_application_equals_xgrammars_own_kernel():
    xgrammar = pytest.importorskip("xgrammar")
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word's high bits lie past the vocabulary
    logits = torch.randn(5, vocab, generator=gen)
    mask = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), generator=gen, dtype=torch.int32)
    rows = torch.tensor([0, 2, 4])
    got = apply_bitmask(logits, rows, mask)
    want = logits.clone()
    full = torch.full((5, mask.shape[1]), -1, dtype=torch.int32)
    full[rows] = mask
    xgrammar.apply_token_bitmask_inplace(want, full)
    assert torch.equal(got, want)


def test_a_slow_compile_holds_back_only_its_own_request_and_can_be_aborted(engine, monkeypatch):
    """The constraint compiles off the step loop: other requests run to the end meanwhile, the
    request enters once its matcher exists, and an abort while it compiles ends it at once."""
    import threading
    release, real = threading.Event(), engine.inputs.grammar_matcher

    def slow(constraint):
        assert release.wait(30)
        return real(constraint)
    monkeypatch.setattr(engine.inputs, "grammar_matcher", slow)
    engine.add_request("json", PROMPTS[0], SamplingParams(max_tokens=40, temperature=0, structured=("json_object", "")))
    engine.add_request("gone", PROMPTS[2], SamplingParams(max_tokens=40, temperature=0, structured=("regex", "[a-z]+")))
    engine.add_request("plain", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    aborted = engine.abort("gone")
    assert aborted.finished and aborted.finish_reason == "abort"
    done = {}
    while "plain" not in done:
        for out in engine.step():
            done.setdefault(out.request_id, []).append(out)
    assert "json" not in done and engine.has_unfinished_requests()
    release.set()
    for request_id, outs in run_to_end(engine).items():
        done.setdefault(request_id, []).extend(outs)
    assert done["json"][-1].finished and "gone" not in done
    assert done["json"][-1].finish_reason == "length" or isinstance(json.loads(done["json"][-1].text), dict)


def test_a_compile_that_fails_in_the_engine_fails_its_request_only(engine, monkeypatch):
    compile_fails(engine, monkeypatch, RuntimeError("compiler crashed"))
    engine.add_request("broken", PROMPTS[0], SamplingParams(max_tokens=8, structured=("json_object", "")))
    engine.add_request("fine", PROMPTS[1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    outs = run_to_end(engine)
    assert outs["broken"][-1].finish_reason == "abort" and "compiler crashed" in str(outs["broken"][-1].error)
    assert outs["fine"][-1].finish_reason == "length"


@pytest.mark.gpu
def test_gpu_structured_outputs_beside_graph_steps_hold_and_leave_others_unchanged(checkpoints, adapters):
    """On the GPU with its defaults (decode graphs, async scheduling): constrained requests, with
    and without an adapter, hold their constraints; an unconstrained request batched with them
    gives what it gives alone."""
    pytest.importorskip("xgrammar")
    from tests.engine.helpers import lora
    engine = make_engine(checkpoints["qwen3_moe"], device="cuda", dtype="float32", max_loras=2, max_lora_rank=16,
                         max_model_len=256)
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = engine.generate([PROMPTS[1]], plain, [lora(adapters, "qwen3_moe", "a")])[0]["token_ids"]
    choices = ["north", "south", "east", "west"]
    engine.add_request("choice", PROMPTS[0], SamplingParams(max_tokens=20, temperature=1.0, seed=5,
                                                              structured=("choice", json.dumps(choices))),
                       lora(adapters, "qwen3_moe", "b"))
    engine.add_request("plain", PROMPTS[1], plain, lora(adapters, "qwen3_moe", "a"))
    engine.add_request("regex", PROMPTS[2], SamplingParams(max_tokens=30, temperature=0, structured=("regex", "[a-z]{2,5}-[0-9]{1,3}")))
    outs = run_to_end(engine)
    assert outs["choice"][-1].text in choices and outs["choice"][-1].finish_reason == "stop"
    assert sum((o.token_ids_delta for o in outs["plain"]), []) == alone
    regex = outs["regex"][-1]
    assert regex.finish_reason == "length" or re.fullmatch("[a-z]{2,5}-[0-9]{1,3}", regex.text)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("constraint", [("regex", "a[^\\s\\S]"), ("grammar", 'root ::= root "a"')])
def test_a_constraint_that_admits_no_next_token_ends_its_request_with_a_request_error(engine, constraint, temperature):
    """It compiles, then lets no token through (after "a", or from the start): the request
    ends with an error naming its constraint, not with text that breaks it or an engine fault."""
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=temperature, seed=1,
                                                       structured=constraint))[0]
    assert out["finish_reason"] == "abort" and isinstance(out["error"], InvalidRequestError)
    assert "admits no token" in str(out["error"])


def test_a_constraint_over_its_host_time_budget_ends_its_request_only(engine, monkeypatch):
    from engine import structured
    monkeypatch.setattr(structured, "TOKEN_BUDGET_S", 0.0)  # every token over budget
    engine.add_request("costly", PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, structured=("regex", "(a*)*b")))
    engine.add_request("plain", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = run_to_end(engine)
    costly = outs["costly"][-1]
    assert costly.finish_reason == "abort" and isinstance(costly.error, InvalidRequestError)
    assert "ms of CPU to match one token" in str(costly.error) and len(outs["costly"]) == 1
    assert outs["plain"][-1].finish_reason == "length"
    # a token that ends its request anyway keeps its own finish reason
    last = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=1, temperature=0, structured=("regex", "(a*)*b")))[0]
    assert last["finish_reason"] == "length" and last["error"] is None


def test_a_failed_compile_is_reported_even_when_the_step_that_finds_it_raises(engine, monkeypatch):
    import time
    from engine.async_engine import step_or_fail

    compile_fails(engine, monkeypatch, MemoryError("compile failed"))
    engine.add_request("structured", PROMPTS[0], SamplingParams(max_tokens=5, structured=("json_object", "")))
    engine.add_request("plain", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    deadline = time.monotonic() + 10
    while not engine._compiling["structured"][1].done() and time.monotonic() < deadline:
        time.sleep(0.01)
    real = engine.runner.launch

    def flaky(*args, **kwargs):
        raise RuntimeError("launch failed")
    monkeypatch.setattr(engine.runner, "launch", flaky)
    first = step_or_fail(engine)
    monkeypatch.setattr(engine.runner, "launch", real)
    outs = {o.request_id: o for o in first}
    outs.update({request_id: got[-1] for request_id, got in run_to_end(engine).items()})
    assert outs["structured"].finish_reason == "abort" and "compile failed" in str(outs["structured"].error)


def test_allowed_token_ids_sample_only_those_tokens_as_a_large_bias_on_them_does(engine):
    """vLLM's allowed_token_ids, against an independent way to the same greedy choice: +100 on
    those tokens' logits (the tiny model's logits span a few units) makes argmax pick among them."""
    tok = engine.tokenizer
    allowed = sorted(set(tok.encode(" the quick brown fox", add_special_tokens=False)))
    kept = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                        allowed_token_ids=allowed))[0]
    biased = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                          logit_bias={t: 100.0 for t in allowed}))[0]
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert set(kept["token_ids"]) <= set(allowed) and kept["token_ids"] == biased["token_ids"]
    assert not set(free["token_ids"]) <= set(allowed)  # without them the model says other things
    sampled = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.5, seed=1, ignore_eos=True,
                                                      allowed_token_ids=allowed))
    assert all(set(o["token_ids"]) <= set(allowed) for o in sampled)


def test_allowed_token_ids_narrow_a_structured_output_constraint(engine):
    """Both masks hold: of the choices the grammar allows, only the one spelt with allowed ids."""
    tok = engine.tokenizer
    choices = ["yes", "no"]
    end = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    allowed = tok.encode("no", add_special_tokens=False) + end
    draws = lambda **kw: [o["text"] for seed in range(6)  # noqa: E731
                          for o in generate(engine, ("choice", json.dumps(choices)), temperature=2.0, seed=seed, **kw)]
    assert set(draws()) == set(choices)  # without the ids, both come out of these draws
    assert set(draws(allowed_token_ids=allowed)) == {"no"}


def test_allowed_token_ids_that_leave_a_constraint_nothing_end_the_request_with_a_400_not_an_engine_error(engine):
    """The constraint done, only an end of sequence is allowed next; allowed ids without one leave
    the step nothing to sample: the request's own doing."""
    tok = engine.tokenizer
    outs = generate(engine, ("choice", json.dumps(["no"])), temperature=1.0, seed=1,
                    allowed_token_ids=tok.encode("no", add_special_tokens=False))
    assert all(o["finish_reason"] == "abort" and isinstance(o["error"], InvalidRequestError) for o in outs), outs
    assert "allowed_token_ids leave none of the tokens" in str(outs[0]["error"])


def test_allowed_token_ids_of_ending_tokens_only_are_refused_under_min_tokens(engine):
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(InvalidRequestError, match="allowed_token_ids holds only tokens that end") as refused:
        engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=8, min_tokens=3, allowed_token_ids=[end]))
    assert refused.value.param == "allowed_token_ids"
    engine.add_request("ok", PROMPTS[0], SamplingParams(max_tokens=2, min_tokens=1, allowed_token_ids=[end, 5]))
    run_to_end(engine)
    for bad in (["a", 1], [[1]], 5, []):
        with pytest.raises(InvalidRequestError, match="allowed_token_ids must be a non-empty list"):
            SamplingParams(allowed_token_ids=bad)


@pytest.mark.parametrize("vocab", [100, 384, 1000])
def test_an_id_bitmask_allows_exactly_its_ids_as_apply_bitmask_reads_it(vocab):
    from engine.sampling_inputs import id_bitmask

    ids = tuple(t for t in (0, 1, 31, 32, 33, 63, 64, 99, vocab - 1) if t < vocab)
    logits = torch.zeros(2, vocab)
    masked = apply_bitmask(logits, torch.tensor([1]), id_bitmask(ids, vocab)[None, :])
    assert masked[0].isfinite().all()  # the row without a mask is untouched
    assert torch.isfinite(masked[1]).nonzero().view(-1).tolist() == sorted(set(ids))


def test_a_constraint_over_the_length_limit_is_refused_by_its_size_without_echoing_it():
    from engine.structured import MAX_TEXT, check_constraint

    with pytest.raises(InvalidRequestError) as refused:
        check_constraint(("regex", "ab" * (MAX_TEXT // 2) + "c"))
    message = str(refused.value)
    assert message == f"the structured output constraint is {MAX_TEXT + 1} characters as compiled; at most {MAX_TEXT} are taken"
    assert refused.value.param == "structured"
