"""LLMEngine behaviour on a tiny Qwen3-MoE: chunked prefill, preemption, sampling, stops, text."""
import pytest
import torch

from engine import AdapterLoadError, InvalidRequestError, LoRARequest, SamplingParams
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import PROMPTS, assert_close, make_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen(checkpoints):
    return checkpoints["qwen3_moe"]


def test_chunked_prefill_logits_match_reference(qwen):
    """A 30-token prompt in chunks of 7 tokens: the last chunk's logits equal the reference."""
    engine = make_engine(qwen, max_num_batched_tokens=7)
    prompt = list(range(40, 70))
    engine.add_request("long", prompt, SamplingParams(max_tokens=1, temperature=0))
    chunks = []
    while True:
        sched = engine.scheduler.schedule()
        result = engine.execute(sched, all_logits=True)
        chunks.append(result.logits)
        engine.postprocess(sched, result)
        if not engine.has_unfinished_requests():
            break
    assert [c.shape[0] for c in chunks] == [7, 7, 7, 7, 2]
    assert_close(torch.cat(chunks), reference_logits(load_reference_model(qwen), prompt))


def test_prefill_and_decode_mix_in_one_step_and_match_solo_runs(qwen):
    solo = [make_engine(qwen).generate([p], GREEDY)[0]["token_ids"] for p in PROMPTS]
    engine = make_engine(qwen, max_num_batched_tokens=9, async_scheduling=False)  # stepped by hand below
    engine.add_request("r0", PROMPTS[0], GREEDY)
    got = {f"r{i}": [] for i in range(3)}
    got["r0"] += engine.step()[0].token_ids_delta
    engine.add_request("r1", PROMPTS[1], GREEDY)
    engine.add_request("r2", PROMPTS[2], GREEDY)
    saw_mixed = False
    while engine.has_unfinished_requests():
        sched = engine.scheduler.schedule()
        kinds = {n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens for seq, n in sched.scheduled}
        saw_mixed |= kinds == {True, False}
        for out in engine.postprocess(sched, engine.execute(sched)):
            got[out.request_id] += out.token_ids_delta
    assert saw_mixed
    assert [got[f"r{i}"] for i in range(3)] == solo


def test_preemption_recomputes_and_keeps_greedy_output(qwen):
    """Too few KV blocks for all sequences: some are preempted and recomputed, same tokens."""
    prompts = [list(range(10 + i, 22 + i)) for i in range(4)]
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    expected = make_engine(qwen).generate(prompts, params)
    tight = make_engine(qwen, num_kv_blocks=16, block_size=4, max_model_len=32)
    outs = tight.generate(prompts, params)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in expected]
    assert tight.stats()["num_preemptions"] > 0
    assert tight.block_manager.num_free_blocks == 16


def test_seeded_sampling_is_reproducible_and_batch_independent(qwen):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    alone = make_engine(qwen).generate([PROMPTS[0]], params)[0]["token_ids"]
    other = SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
    engine = make_engine(qwen)
    engine.add_request("other", PROMPTS[1], other)
    together = engine.generate([PROMPTS[0]], params)[0]["token_ids"]
    assert alone == together
    different = make_engine(qwen).generate([PROMPTS[0]], SamplingParams(
        max_tokens=10, temperature=1.0, seed=8, ignore_eos=True))[0]["token_ids"]
    assert different != alone


def test_top_k_one_equals_greedy_and_top_p_tiny_equals_greedy(qwen):
    greedy = make_engine(qwen).generate(PROMPTS, GREEDY)
    for params in (SamplingParams(max_tokens=12, temperature=1.5, top_k=1, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, ignore_eos=True)):
        sampled = make_engine(qwen).generate(PROMPTS, params)
        assert [o["token_ids"] for o in sampled] == [o["token_ids"] for o in greedy]


def test_text_deltas_concatenate_to_decode(qwen):
    engine = make_engine(qwen)
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello world!"}],
                                     add_generation_prompt=True, tokenize=False)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    engine.add_request("chat", prompt, params)
    text, ids, outputs = "", [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.text_delta
            ids += out.token_ids_delta
            outputs.append(out)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) == 30 and outputs[-1].finish_reason == "length"
    assert outputs[-1].num_prompt_tokens == len(tok(prompt)["input_ids"])  # text gets the tokenizer's default
    assert outputs[-1].num_output_tokens == 30
    # each step's output carries its delta only: the text so far would grow every message from
    # the core process with the output's length; the last one carries the whole text
    assert all(out.text == "" and isinstance(out.num_cached_tokens, int) for out in outputs[:-1])
    assert outputs[-1].text == text


def test_special_tokens_the_model_makes_stay_in_the_text_only_with_skip_special_tokens_false(qwen):
    engine = make_engine(qwen)
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = {}
    for skip in (True, False):  # the model made to say <|im_end|> three times (ignore_eos: not the end)
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logit_bias={end: 100.0},
                                skip_special_tokens=skip)
        [out] = engine.generate(["Hello"], params)
        assert out["token_ids"] == [end] * 3
        texts[skip] = out["text"]
    assert texts == {True: "", False: "<|im_end|>" * 3}
    # the end of sequence that ends an output is no text, special tokens kept or not (vLLM's)
    ended = engine.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, logit_bias={end: 100.0},
                                                      skip_special_tokens=False))[0]
    assert ended["token_ids"] == [end] and ended["finish_reason"] == "stop" and ended["text"] == ""


def test_stop_token_ids_eos_and_stop_strings(qwen):
    base = make_engine(qwen).generate([PROMPTS[0]], GREEDY)[0]
    third = base["token_ids"][2]
    out = make_engine(qwen).generate([PROMPTS[0]], SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=[third]))[0]
    assert out["token_ids"] == base["token_ids"][:3] and out["finish_reason"] == "stop"
    assert out["stop_reason"] == third  # vLLM's: the stop token id that matched
    tok = make_engine(qwen).tokenizer
    assert out["text"] == tok.decode(base["token_ids"][:2], skip_special_tokens=True)  # the stop token is no text
    kept = make_engine(qwen).generate([PROMPTS[0]], SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=[third], include_stop_str_in_output=True))[0]
    assert kept["text"] == tok.decode(base["token_ids"][:3], skip_special_tokens=True)  # unless asked for
    engine = make_engine(qwen)
    engine.spec.eos_token_ids = (third,)  # as if the checkpoint's generation_config said so
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out["token_ids"] == base["token_ids"][:3] and out["finish_reason"] == "stop"
    assert out["stop_reason"] is None  # an end of sequence names none
    stop = base["text"][3:6]
    assert stop.strip(), "need a visible stop string"
    out = make_engine(qwen).generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0,
                                                                  ignore_eos=True, stop=[stop]))[0]
    assert out["finish_reason"] == "stop" and out["stop_reason"] == stop
    assert out["text"] == base["text"][:base["text"].find(stop)]
    assert base["finish_reason"] == "length" and base["stop_reason"] is None


def test_generation_config_eos_is_read(qwen):
    engine = make_engine(qwen)
    tok = engine.tokenizer
    assert set(engine.spec.eos_token_ids) >= {tok.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop"),
    (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(min_p=2), "min_p"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens"), (dict(logprobs=99), "logprobs"),
    (dict(logit_bias={1: 500}), "logit_bias"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
    (dict(min_tokens=2, structured=("regex", "a+")), "min_tokens"),
])
def test_invalid_sampling_params_raise_clear_errors_naming_the_field(kwargs, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as caught:
        SamplingParams(**kwargs)
    assert caught.value.param == fragment


def test_top_k_beyond_int64_means_no_limit(qwen):
    """A top_k no int64 tensor holds must not reach the step, where it failed every request."""
    unlimited = SamplingParams(max_tokens=6, temperature=1.0, top_k=0, seed=3, ignore_eos=True)
    huge_k = SamplingParams(max_tokens=6, temperature=1.0, top_k=2**70, seed=3, ignore_eos=True)
    expected = make_engine(qwen).generate(PROMPTS[:2], unlimited)
    got = make_engine(qwen).generate(PROMPTS[:2], huge_k)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]


def test_invalid_requests_raise(qwen):
    engine = make_engine(qwen)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", [])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("v", [10 ** 6])
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request("l", list(range(100)))
    with pytest.raises(InvalidRequestError, match="max_loras=0"):
        engine.add_request("x", [1, 2], lora=LoRARequest("t/a", "/nowhere"))
    engine.add_request("dup", [1, 2])
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [1, 2])


def test_a_text_prompt_over_max_model_len_is_refused_without_its_whole_id_list(qwen):
    engine = make_engine(qwen)
    inputs, tokenizer = engine.inputs, engine.inputs.tokenizer
    text = "moeplex " * 5000
    assert len(tokenizer.encode(text, add_special_tokens=False)) > 10 * inputs.max_model_len
    seen = []

    class Recording:  # what the tokenizer hands back to Python
        def __call__(self, *args, **kwargs):
            out = tokenizer(*args, **kwargs)
            seen.append(len(out["input_ids"]))
            return out

    inputs.tokenizer = Recording()
    with pytest.raises(InvalidRequestError, match=f"at least {inputs.max_model_len} tokens; max_model_len"):
        engine.add_request("long", text)
    assert seen == [inputs.max_model_len]
    inputs.tokenizer = tokenizer
    short = "moeplex serves many tenants"
    assert inputs.tokenize(short) == tokenizer(short)["input_ids"]
    assert inputs.tokenize(short, add_special_tokens=False) == tokenizer(short, add_special_tokens=False)["input_ids"]


def test_bad_adapter_fails_only_its_request(qwen, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = make_engine(qwen, max_loras=2)
    outs = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], GREEDY,
                           [None, LoRARequest("t/bad", str(bad)), LoRARequest("t/missing", str(tmp_path / "no"))])
    assert outs[0]["finish_reason"] == "length" and len(outs[0]["token_ids"]) == 12
    for out in outs[1:]:
        assert isinstance(out["error"], AdapterLoadError) and out["token_ids"] == []
    assert engine.stats()["lora_failures"] == 2


def test_abort_frees_blocks(qwen):
    engine = make_engine(qwen)
    free = engine.block_manager.num_free_blocks
    engine.add_request("a", PROMPTS[2], GREEDY)
    engine.step()
    assert engine.block_manager.num_free_blocks < free
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == free and not engine.has_unfinished_requests()
