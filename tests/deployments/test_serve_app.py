"""The Serve application on real Ray over loopback: OpenAI API, tenancy, uploads, faults.

One Ray instance and one Serve app for the module: two engine replicas on the tiny
checkpoint, the adapter store on an S3 server on loopback (moto), a key file with three
tenants (fixtures in conftest.py). Outputs are compared with the engine called directly (greedy decoding).
"""
import json
import os
import re
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from deployments.schemas import ChatCompletionRequest
from tests.deployments.fake_cluster import wait_for
from tests.deployments.serve_helpers import (APP, BASE, KEYS, MAX_ADAPTER_BYTES,
                                             MAX_ADAPTERS_PER_TENANT, MAX_MODEL_LEN, auth,
                                             llm_replica_actors, upload)

PROMPTS = ["The quick brown fox", "Tenants upload LoRA adapters"]


def _client(service: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service}/v1", api_key=KEYS[tenant], max_retries=0,
                         timeout=120)


def _served_text(client, model: str, prompt: str, stream: bool, max_tokens: int = 12):
    kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    if not stream:
        done = client.completions.create(**kwargs)
        return done.choices[0].text, done.choices[0].finish_reason, done.usage
    text, finish, usage = "", None, None
    for chunk in client.completions.create(**kwargs, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


def test_continuous_usage_stats_count_every_chunk_up_to_the_totals(service, adapters):
    client = _client(service, "acme")
    kwargs = dict(model="style", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
    counts = [chunk.usage for chunk in client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})]
    whole = client.completions.create(**kwargs).usage
    assert all(u is not None and u.prompt_tokens == whole.prompt_tokens for u in counts)
    done = [u.completion_tokens for u in counts]
    assert done == sorted(done) and done[0] >= 1 and done[-1] == whole.completion_tokens == 8


def test_health_ready_and_models(service, adapters):
    assert httpx.get(f"{service}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{service}/ready", timeout=60)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    # /ready needs no key: it shows counts, never which tenants' adapters run
    assert {"running_adapters", "waiting_adapters"}.isdisjoint(ready.json()["engine"])
    assert "running" in ready.json()["engine"]
    models = [m.id for m in _client(service, "acme").models.list()]
    assert models == [BASE, "style"]


def test_completions_say_where_their_time_went_in_server_timing(service, adapters):
    """Real requests through Serve: every phase the replica and its engine report fits in the
    ingress's time to the first token (one host: one monotonic clock for the three processes)."""
    from deployments.server_timing import parse

    for model, stream in (("style", False), ("style", True), (BASE, False)):
        response = httpx.post(f"{service}/v1/completions", headers=auth("acme"), timeout=120, json={
            "model": model, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": stream})
        assert response.status_code == 200, response.text
        phases = parse(response.headers["server-timing"])
        engine = {"handoff", "queue", "prefill"} | ({"adapter"} if model == "style" else set())
        assert {"resolve", "route", "fetch", "prepare", "tokenize", "deliver", "ttft"} | engine <= set(phases)
        assert ("total" in phases) is not stream and ("adapter" in phases) is (model == "style")
        assert all(v >= 0 for v in phases.values())
        # the phases follow one another and fill the time to the first token (a few ms of code
        # between the stamps, and each rounded to 0.1 ms)
        sequential = ("resolve", "route", "fetch", "prepare", "tokenize", "handoff", "queue", "prefill", "deliver")
        assert phases["ttft"] - 5.0 <= sum(phases[name] for name in sequential) <= phases["ttft"] + 0.1 * len(sequential)


def test_two_tenants_stream_and_not_equal_the_engine(service, adapters, oracle):
    """acme and globex at once, streaming and not; every text equals the direct engine's."""
    jobs = [(t, p, s) for t in ("acme", "globex") for p in PROMPTS for s in (False, True)]
    results, errors = {}, []

    def run(tenant, prompt, stream):
        try:
            results[(tenant, prompt, stream)] = _served_text(
                _client(service, tenant), "style", prompt, stream)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert not [t for t in threads if t.is_alive()], "a request never returned"
    assert sorted(results) == sorted(jobs)
    for (tenant, prompt, stream), (text, finish, usage) in results.items():
        want = oracle.complete(prompt, 12, adapters[tenant], name=f"{tenant}/style")
        assert text == want["text"], (tenant, prompt, stream)
        assert finish == want["finish_reason"]
        assert usage.completion_tokens == len(want["token_ids"])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The adapters matter: the two tenants' texts differ from each other or from the base.
    base_text = _served_text(_client(service, "acme"), BASE, PROMPTS[0], False)[0]
    assert base_text == oracle.complete(PROMPTS[0], 12)["text"]
    acme, globex = results[("acme", PROMPTS[0], False)][0], results[("globex", PROMPTS[0], False)][0]
    assert len({acme, globex, base_text}) > 1


def test_chat_completions_stream_and_not(service, adapters, oracle):
    client = _client(service, "globex")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    want = oracle.complete(oracle.chat_prompt(messages), 10, adapters["globex"], "globex/style")
    done = client.chat.completions.create(model="style", messages=messages, max_tokens=10,
                                          temperature=0)
    assert done.choices[0].message.content == want["text"]
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason == want["finish_reason"]
    streamed = "".join(
        chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="style", messages=messages, max_tokens=10, temperature=0, stream=True)
        if chunk.choices)
    assert streamed == want["text"]


@pytest.mark.parametrize("options, template", [
    ({"add_generation_prompt": False, "continue_final_message": True}, {"continue_final_message": True}),
    ({"chat_template_kwargs": {"enable_thinking": False}}, {"add_generation_prompt": True, "enable_thinking": False}),
], ids=["continue_final_message", "enable_thinking_false"])
def test_chat_template_options_reach_the_template_as_vllm_passes_them(service, adapters, oracle, options, template):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "The quick"}]
    prompt = oracle.engine.tokenizer.apply_chat_template(messages, tokenize=False, **template)
    want = oracle.complete(prompt, 6, adapters["globex"], "globex/style")
    done = _client(service, "globex").chat.completions.create(
        model="style", messages=messages, max_tokens=6, temperature=0, extra_body=options)
    assert done.choices[0].message.content == want["text"]
    assert done.usage.prompt_tokens == len(oracle.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_logprobs_of_completions_and_chats_equal_the_engines_streamed_or_not(service, adapters, oracle):
    client, text_of = _client(service, "acme"), lambda token: oracle.engine.tokenizer.decode([token])
    want = oracle.complete(PROMPTS[0], 6, adapters["acme"], "acme/style", logprobs=2)
    texts = [text_of(t) for t in want["token_ids"]]
    chosen = [logprob for logprob, _ in want["logprobs"]]
    alternatives = [[(text_of(t), lp) for t, lp in alts] for _, alts in want["logprobs"]]

    kwargs = dict(model="style", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True)
              if c.choices and c.choices[0].logprobs is not None]
    streamed = {key: [v for c in chunks for v in getattr(c, key)]
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for got in (whole.model_dump(), streamed):
        assert got["tokens"] == texts
        assert got["token_logprobs"] == pytest.approx(chosen, abs=1e-4)
        assert got["text_offset"] == [sum(map(len, texts[:i])) for i in range(len(texts))]
        for top, alts in zip(got["top_logprobs"], alternatives):
            assert top == pytest.approx(dict(alts), abs=1e-4)

    messages = [{"role": "user", "content": "Hello"}]
    want = oracle.complete(oracle.chat_prompt(messages), 5, adapters["acme"], "acme/style", logprobs=2)
    kwargs = dict(model="style", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs is not None for entry in c.choices[0].logprobs.content]
    for got in (whole, streamed):
        assert [e.token for e in got] == [text_of(t) for t in want["token_ids"]]
        assert [e.bytes for e in got] == [list(e.token.encode()) for e in got]
        assert [e.logprob for e in got] == pytest.approx([lp for lp, _ in want["logprobs"]], abs=1e-4)
        for entry, (_, alts) in zip(got, want["logprobs"]):
            assert [t.token for t in entry.top_logprobs] == [text_of(t) for t, _ in alts]
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in alts], abs=1e-4)
    plain = client.chat.completions.create(model="style", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="style", messages=messages, max_tokens=2, top_logprobs=2)


def test_echo_puts_the_prompt_and_its_tokens_logprobs_before_the_completion(service, adapters, oracle):
    """What lm-eval-harness's loglikelihood asks of a completions server: echo with logprobs and
    one token; the prompt tokens' entries equal the engine's prompt logprobs (tested against
    transformers + PEFT in tests/engine/test_logprobs.py), the first one's null."""
    client, text_of = _client(service, "acme"), lambda token: oracle.engine.tokenizer.decode([token])
    want = oracle.complete(PROMPTS[1], 1, adapters["acme"], "acme/style", logprobs=1, prompt_logprobs=1)
    prompt = want["prompt_logprobs"]
    texts = [text_of(t) for t, _, _ in prompt] + [text_of(t) for t in want["token_ids"]]
    chosen = [lp for _, lp, _ in prompt] + [lp for lp, _ in want["logprobs"]]
    kwargs = dict(model="style", prompt=PROMPTS[1], max_tokens=1, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0]
    streamed = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert whole.text == "".join(c.text for c in streamed) == PROMPTS[1] + want["text"]
    for got in (whole.logprobs.model_dump(), {key: [v for c in streamed if c.logprobs for v in getattr(c.logprobs, key)]
                                              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}):
        assert got["tokens"] == texts
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert got["token_logprobs"][1:] == pytest.approx(chosen[1:], abs=1e-4)
        assert got["text_offset"] == [sum(map(len, texts[:i])) for i in range(len(texts))]
    plain = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(PROMPTS[1]) and plain.choices[0].logprobs is None
    # vLLM's truncate_prompt_tokens: the model reads the prompt's last 3 tokens, and echo gives those back
    last = oracle.engine.tokenizer(PROMPTS[1])["input_ids"][-3:]
    cut = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=2, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": 3})
    want = oracle.complete(last, 2, adapters["acme"], "acme/style")["text"]
    assert cut.choices[0].text == oracle.engine.tokenizer.decode(last) + want and cut.usage.prompt_tokens == 3


def test_lm_eval_harness_tokenized_loglikelihood_request_is_served(service, adapters, oracle):
    """lm-eval-harness's local-completions sends, by default, one prompt of token ids in a list
    of lists, with echo, logprobs=1 and one token, and sums token_logprobs past its context."""
    ids = oracle.engine.tokenizer.encode(PROMPTS[1])
    want = oracle.complete(ids, 1, adapters["acme"], "acme/style", logprobs=1, prompt_logprobs=1)
    body = {"model": "style", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    response = httpx.post(f"{service}/v1/completions", json=body, headers=auth("acme"), timeout=120)
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    expected = [lp for _, lp, _ in want["prompt_logprobs"][1:]] + [want["logprobs"][0][0]]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    # lm-eval's batch_size > 1: a batch of prompts, a choice each, in their order (index)
    other = oracle.engine.tokenizer.encode(PROMPTS[0])
    batch = httpx.post(f"{service}/v1/completions", json={**body, "prompt": [other, ids]}, headers=auth("acme"),
                       timeout=120)
    assert batch.status_code == 200, batch.text
    choices = sorted(batch.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[1]["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert len(choices[0]["logprobs"]["token_logprobs"]) == len(other) + 1
    assert batch.json()["usage"]["prompt_tokens"] == len(ids) + len(other)


def test_a_batch_of_prompts_gets_n_choices_each_numbered_prompt_major_streamed_or_not(service, adapters, oracle):
    client = _client(service, "acme")
    kwargs = dict(model="style", prompt=PROMPTS, max_tokens=4, temperature=0, n=2)
    wants = [oracle.complete(p, 4, adapters["acme"], "acme/style")["text"] for p in PROMPTS]
    whole = client.completions.create(**kwargs)
    assert sorted((c.index, c.text) for c in whole.choices) == [(0, wants[0]), (1, wants[0]), (2, wants[1]),
                                                                  (3, wants[1])]
    streamed = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in whole.choices}
    prompt_tokens = sum(len(oracle.engine.tokenizer.encode(p)) for p in PROMPTS)
    assert whole.usage.prompt_tokens == prompt_tokens


def test_several_choices_in_one_request_streamed_or_whole(service, adapters, oracle):
    client = _client(service, "acme")
    want = oracle.complete(PROMPTS[0], 6, adapters["acme"], "acme/style")
    greedy = client.completions.create(model="style", prompt=PROMPTS[0], max_tokens=6, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.text for c in greedy.choices] == [want["text"]] * 3
    assert greedy.usage.prompt_tokens == want_prompt_tokens(client, PROMPTS[0])
    assert greedy.usage.completion_tokens == 3 * len(want["token_ids"])

    seeded = dict(model="style", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=3)
    texts = [c.text for c in client.completions.create(**seeded).choices]
    assert len(set(texts)) > 1  # choice i draws with seed + i
    assert [c.text for c in client.completions.create(**seeded).choices] == texts
    assert texts[0] == client.completions.create(**{**seeded, "n": 1}).choices[0].text

    streamed, usage = {}, None
    for chunk in client.chat.completions.create(model="style", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0, n=2, stream=True,
                                                stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    whole = client.chat.completions.create(model="style", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0, n=2)
    assert streamed == {c.index: c.message.content for c in whole.choices} and len(streamed) == 2
    assert usage.completion_tokens == whole.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="style", prompt=PROMPTS[0], max_tokens=2, n=17)


def test_a_repeated_prompt_finds_its_replica_and_its_cached_tokens_for_its_own_tenant_only(service, adapters, oracle):
    """Prefix caching through Serve (two engine replicas): the base model's requests go to the
    replica their tenant and prompt opening point to (deployments/prefix_router.py), so the
    second and third of three equal requests report the prompt's full blocks cached, with the
    oracle's text all the same; another tenant's first such request finds none (the cache is
    per tenant)."""
    acme = _client(service, "acme")
    for topic in ("Disk caches", "The adapter store", "S3"):  # 3 openings, no block in common: by chance 1/64
        prompt = " ".join([f"{topic} is where replicas pull adapters from"] * 6)
        want = oracle.complete(prompt, 4)["text"]
        runs = [acme.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0) for _ in range(3)]
        assert [r.choices[0].text for r in runs] == [want] * 3
        full_blocks = (runs[0].usage.prompt_tokens - 1) // 16 * 16
        assert [r.usage.prompt_tokens_details.cached_tokens for r in runs] == [0, full_blocks, full_blocks] != [0, 0, 0]
    other = _client(service, "globex").completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0)
    assert other.choices[0].text == want and other.usage.prompt_tokens_details.cached_tokens == 0


def test_tokenize_counts_the_ids_completions_and_chats_give_the_model_and_detokenize_inverts_them(
        service, adapters, oracle):
    client, tok = _client(service, "acme"), oracle.engine.tokenizer
    answer = httpx.post(f"{service}/tokenize", headers=auth("acme"), timeout=60,
                        json={"model": "style", "prompt": PROMPTS[0], "return_token_strs": True})
    assert answer.status_code == 200, answer.text
    ids = tok(PROMPTS[0])["input_ids"]  # a completion's text gets the tokenizer's special tokens, as in vLLM
    assert answer.json() == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                             "token_strs": tok.convert_ids_to_tokens(ids)}
    assert len(ids) == client.completions.create(model="style", prompt=PROMPTS[0], max_tokens=1).usage.prompt_tokens
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "The quick"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    chat = httpx.post(f"{service}/tokenize", headers=auth("acme"), json={"messages": messages, **options}, timeout=60)
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert chat.status_code == 200 and chat.json()["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    used = client.chat.completions.create(model="style", messages=messages, max_tokens=1, extra_body=options)
    assert chat.json()["count"] == used.usage.prompt_tokens
    back = httpx.post(f"{service}/detokenize", headers=auth("acme"), json={"model": BASE, "tokens": ids}, timeout=60)
    assert back.status_code == 200 and back.json() == {"prompt": tok.decode(ids)}
    too_long = "x " * (4 * MAX_MODEL_LEN)
    assert len(tok(too_long)["input_ids"]) >= 4 * MAX_MODEL_LEN
    refusals = [
        ("/tokenize", {}, {"prompt": "hi"}, 401, None),
        ("/tokenize", auth("acme"), {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/tokenize", auth("acme"), {"prompt": "hi", "messages": messages}, 400, "messages"),
        ("/tokenize", auth("acme"), {"prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ("/tokenize", auth("acme"), {"prompt": too_long}, 400, "prompt"),  # counted up to 4 contexts
        ("/detokenize", auth("acme"), {"tokens": [10 ** 6]}, 400, "tokens"),
        ("/detokenize", auth("acme"), {"tokens": "1 2"}, 400, "tokens"),
    ]
    for path, headers, body, status, param in refusals:
        refused = httpx.post(f"{service}{path}", headers=headers, json=body, timeout=60)
        assert refused.status_code == status, (path, body, refused.text)
        assert refused.json()["error"]["message"] and refused.json()["error"]["param"] == param, refused.text


def want_prompt_tokens(client, prompt: str) -> int:
    return client.completions.create(model="style", prompt=prompt, max_tokens=1).usage.prompt_tokens


def test_stop_sequences_and_seeded_sampling(service, adapters, oracle):
    client = _client(service, "acme")
    full = oracle.complete(PROMPTS[1], 16, adapters["acme"], "acme/style")["text"]
    if len(full) > 3:
        stop = full[2:4]
        done = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=16,
                                         temperature=0, stop=[stop])
        assert stop not in done.choices[0].text and done.choices[0].finish_reason == "stop"
        assert full.startswith(done.choices[0].text)
        kept = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                         stop=[stop], extra_body={"include_stop_str_in_output": True})
        assert kept.choices[0].text == done.choices[0].text + stop
    sampled = [client.completions.create(model="style", prompt=PROMPTS[0], max_tokens=8,
                                         temperature=1.0, top_p=0.9, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_penalties_and_top_k_reach_the_engine(service, adapters, oracle):
    """OpenAI's presence / frequency penalties, logit_bias and vLLM's repetition_penalty, top_k,
    ignore_eos, stop_token_ids, min_tokens and min_p (extra_body) give what the engine gives for
    the same SamplingParams."""
    client = _client(service, "acme")
    sampling = dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3, top_k=5)
    want = oracle.complete(PROMPTS[1], 12, adapters["acme"], "acme/style", **sampling)["text"]
    got = client.completions.create(
        model="style", prompt=PROMPTS[1], max_tokens=12, temperature=0, frequency_penalty=1.5,
        presence_penalty=0.5, extra_body={"repetition_penalty": 1.3, "top_k": 5}).choices[0].text
    assert got == want
    assert want != oracle.complete(PROMPTS[1], 12, adapters["acme"], "acme/style")["text"]
    # vLLM's ignore_eos and stop_token_ids: the oracle's third token ends the completion
    ids = oracle.complete(PROMPTS[1], 12, adapters["acme"], "acme/style", ignore_eos=True)["token_ids"]
    stopped = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]})
    cut = ids.index(ids[2]) + 1
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == cut
    assert stopped.choices[0].model_extra["stop_reason"] == ids[2]  # vLLM's: the stop token that matched
    full = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    forced = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                       logit_bias={str(ids[0] + 1): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == oracle.complete(PROMPTS[1], 4, adapters["acme"], "acme/style", ignore_eos=True,
                                                     logit_bias={ids[0] + 1: 100.0})["text"]
    # vLLM's min_tokens holds the stop token back; min_p = 1 samples what greedy picks
    held = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                     extra_body={"stop_token_ids": [ids[0]], "min_tokens": 5})
    want = oracle.complete(PROMPTS[1], 12, adapters["acme"], "acme/style", stop_token_ids=(ids[0],), min_tokens=5)
    assert held.usage.completion_tokens == len(want["token_ids"]) >= 5 and held.choices[0].text == want["text"]
    sharp = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=6, temperature=1.8, seed=3,
                                      extra_body={"min_p": 1.0, "ignore_eos": True})
    assert sharp.choices[0].text == oracle.complete(PROMPTS[1], 6, adapters["acme"], "acme/style",
                                                    ignore_eos=True)["text"]
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=4, extra_body={"min_tokens": 5})
    # vLLM's skip_special_tokens=false: the special token the model is made to say stays in the text
    end = oracle.engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    said = {skip: client.completions.create(
        model="style", prompt=PROMPTS[1], max_tokens=2, temperature=0, logit_bias={str(end): 100},
        extra_body={"ignore_eos": True, "skip_special_tokens": skip}).choices[0].text for skip in (True, False)}
    assert said == {True: "", False: "<|im_end|><|im_end|>"}
    # vLLM's allowed_token_ids: what the engine samples with the same ids
    allowed = sorted(set(ids[3:8]))
    narrowed = client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                         extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    want = oracle.complete(PROMPTS[1], 6, adapters["acme"], "acme/style", ignore_eos=True, allowed_token_ids=allowed)
    assert narrowed.choices[0].text == want["text"] and set(want["token_ids"]) <= set(allowed)
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):  # past the vocabulary
        client.completions.create(model="style", prompt=PROMPTS[1], max_tokens=2, extra_body={"allowed_token_ids": [10 ** 7]})


def test_structured_outputs_hold_their_constraint_and_equal_the_engines(service, adapters, oracle):
    """OpenAI's response_format (json_schema, json_object) and vLLM's guided_choice / guided_regex /
    structured_outputs, streamed or whole, give what the engine gives for the same constraint; the
    text is checked with Python's json and re as well."""
    client = _client(service, "acme")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    choices = ["red", "green", "blue"]
    cases = [  # (extra request fields, the engine's constraint, check of a completed text)
        ({"extra_body": {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}},
         ("json_schema", json.dumps(schema)), lambda t: type(json.loads(t)["n"]) is int),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, ("json_object", ""),
         lambda t: isinstance(json.loads(t), dict)),
        ({"extra_body": {"guided_choice": choices}}, ("choice", json.dumps(choices)), lambda t: t in choices),
        ({"extra_body": {"guided_regex": "[0-9]{2}-[a-z]{3}"}}, ("regex", "[0-9]{2}-[a-z]{3}"),
         lambda t: re.fullmatch("[0-9]{2}-[a-z]{3}", t)),
        ({"extra_body": {"structured_outputs": {"choice": choices}}}, ("choice", json.dumps(choices)), lambda t: t in choices),
    ]
    for fields, constraint, holds in cases:
        want = oracle.complete(PROMPTS[0], 60, adapters["acme"], "acme/style", structured=constraint)
        for stream in (False, True):
            kwargs = dict(model="style", prompt=PROMPTS[0], max_tokens=60, temperature=0, **fields)
            if stream:
                chunks = list(client.completions.create(**kwargs, stream=True))
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices and c.choices[0].finish_reason)
            else:
                done = client.completions.create(**kwargs)
                text, finish = done.choices[0].text, done.choices[0].finish_reason
            assert (text, finish) == (want["text"], want["finish_reason"]), (fields, stream)
            assert finish == "length" or holds(text), (fields, text)
    messages = [{"role": "user", "content": "Pick a colour"}]
    chat = client.chat.completions.create(model="style", messages=messages, max_tokens=20, temperature=0,
                                          extra_body={"guided_choice": choices})
    assert chat.choices[0].message.content in choices and chat.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model="style", messages=messages, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}})
    want = oracle.complete(oracle.chat_prompt(messages), 60, adapters["acme"], "acme/style",
                           structured=("json_schema", json.dumps(schema)))
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (want["text"], want["finish_reason"])


def _tool_answer(client, stream: bool, **kwargs) -> tuple:
    """(finish_reason, tool_calls, content) of one chat completion, whole or streamed."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.finish_reason, choice.message.tool_calls or [], choice.message.content
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    return (chunks[-1].choices[0].finish_reason, [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])],
            "".join(c.choices[0].delta.content or "" for c in chunks))


def test_tool_calls_come_back_as_openai_tool_calls(service, adapters, oracle):
    """A named tool and tool_choice "required" constrain the output to a call of an offered tool;
    the openai client reads it as tool_calls, whole and streamed, and its arguments hold the tool's
    schema; the text equals the engine's for the same prompt (tools rendered by the chat
    template) and constraint. Under "auto" a call the model writes comes back the same way. A
    conversation that carries a call and its result is accepted, and a forced choice beside
    response_format is a 400 naming tool_choice."""
    client = _client(service, "acme")
    unit = {"type": "object", "properties": {"u": {"enum": ["c", "f"]}}, "required": ["u"],
            "additionalProperties": False}  # short: the tiny model's context is 256 tokens
    tools = [{"type": "function", "function": {"name": "temp", "parameters": unit}}]  # several: test_tool_calls.py
    messages = [{"role": "user", "content": "How warm?"}]
    prompt = oracle.chat_prompt(messages, tools)
    assert '"temp"' in prompt  # the template rendered the tools
    made = 0
    for tool_choice in ({"type": "function", "function": {"name": "temp"}}, "required"):
        # one call at most: a list of calls could run on in the tiny model's output
        constraint = ChatCompletionRequest(model="m", messages=messages, tools=tools, tool_choice=tool_choice,
                                           parallel_tool_calls=False).sampling()["structured"]
        want = oracle.complete(prompt, 64, adapters["acme"], "acme/style", structured=constraint)
        for stream in (False, True):
            finish, calls, content = _tool_answer(client, stream, model="style", messages=messages, tools=tools,
                                                  tool_choice=tool_choice, max_tokens=64, temperature=0,
                                                  parallel_tool_calls=False)
            assert want["finish_reason"] == "stop", want  # one layout of whitespace: the call closes
            named = tool_choice != "required"  # OpenAI says "stop" under a named tool_choice
            assert finish == ("stop" if named else "tool_calls") and not content, (tool_choice, stream, content)
            args = [json.loads(c.function.arguments) for c in calls]
            if tool_choice == "required":
                assert [{"name": c.function.name, "arguments": a} for c, a in zip(calls, args)] == json.loads(want["text"])
            else:
                assert [c.function.name for c in calls] == ["temp"] and args == [json.loads(want["text"])]
                jsonschema.validate(args[0], unit)
            made += 1
    assert made == 4
    # "auto" (the default): a Hermes block the model writes itself becomes tool_calls. The tiny
    # model never writes one on its own, so a regex constraint (beside "auto": allowed) makes it
    block = '<tool_call>{"name": "temp", "arguments": {"u": "c"}}</tool_call>'
    pattern = r'<tool_call>\{"name": "temp", "arguments": \{"u": "c"\}\}</tool_call>'
    want = oracle.complete(prompt, 64, adapters["acme"], "acme/style", structured=("regex", pattern))
    assert want["text"] == block and want["finish_reason"] == "stop", want
    for stream in (False, True):
        finish, calls, content = _tool_answer(client, stream, model="style", messages=messages, tools=tools,
                                              max_tokens=64, temperature=0, extra_body={"guided_regex": pattern})
        assert finish == "tool_calls" and not content, (stream, finish, content)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("temp", {"u": "c"})]
        assert all(c.id and c.type == "function" for c in calls)
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "temp", "arguments": '{"u": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    answer = client.chat.completions.create(model="style", messages=history, tools=tools, max_tokens=8, temperature=0)
    as_text = [{**m, "content": m["content"] or ""} for m in history]  # a call's null content is empty text
    assert '<tool_call>{"name": "temp", "arguments": {"u": "c"}}</tool_call>' in oracle.chat_prompt(as_text, tools)
    want = oracle.complete(oracle.chat_prompt(as_text, tools), 8, adapters["acme"], "acme/style")
    assert answer.choices[0].message.content == want["text"]
    with pytest.raises(openai.BadRequestError, match="constrains the output") as refused:
        client.chat.completions.create(model="style", messages=messages, tools=tools, tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=8)
    assert refused.value.body["param"] == "tool_choice"  # a check across fields still names one


def test_tenants_cannot_see_use_or_delete_others_adapters(service, adapters, tiny_adapter):
    response = upload(service, auth("acme"), "private", tiny_adapter(seed=3))
    assert response.status_code == 201, response.text
    globex = _client(service, "globex")
    assert "private" not in [m.id for m in globex.models.list()]
    listed = httpx.get(f"{service}/v1/adapters", headers=auth("globex")).json()["data"]
    assert [a["owner"] for a in listed] == ["globex"]
    for call in (lambda: httpx.get(f"{service}/v1/adapters/private", headers=auth("globex")),
                 lambda: httpx.delete(f"{service}/v1/adapters/private", headers=auth("globex")),
                 lambda: httpx.get(f"{service}/v1/adapters/acme%2Fprivate",
                                   headers=auth("globex"))):
        response = call()
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["type"] == "not_found_error" and error["param"] is None  # the path names it
        assert "GET /v1/adapters lists yours" in error["message"]
    with pytest.raises(openai.NotFoundError):
        globex.completions.create(model="private", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        globex.completions.create(model="acme/private", prompt="hi", max_tokens=2)
    # still there for its owner, who can delete it
    assert httpx.get(f"{service}/v1/adapters/private", headers=auth("acme")).status_code == 200
    assert httpx.delete(f"{service}/v1/adapters/private", headers=auth("acme")).status_code == 200
    # at once, although the ingress resolved "private" for acme just before (resolve cache)
    assert httpx.get(f"{service}/v1/adapters/private", headers=auth("acme")).status_code == 404
    with pytest.raises(openai.NotFoundError):
        _client(service, "acme").completions.create(model="private", prompt="hi", max_tokens=2)


def test_bad_keys_401_and_tenant_header_mismatch_refused(service, adapters):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{service}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(f"{service}/v1/models").status_code == 401
    # dev-mode header alone does not authenticate when a key file is configured
    assert httpx.get(f"{service}/v1/models", headers={"X-Tenant-Id": "acme"}).status_code == 401
    mismatch = httpx.get(f"{service}/v1/models", headers={**auth("acme"), "X-Tenant-Id": "globex"})
    assert mismatch.status_code == 403 and mismatch.json()["error"]["code"] == "tenant_mismatch"


def test_new_version_is_used_at_once(service, adapters, tiny_adapter, oracle):
    """Uploading a new version of a used adapter: the next request uses the new weights."""
    client = _client(service, "acme")
    first = tiny_adapter(seed=5)
    second = tiny_adapter(seed=6)
    assert upload(service, auth("acme"), "rolling", first).status_code == 201
    got = [_served_text(client, "rolling", PROMPTS[0], False)[0] for _ in range(2)]
    assert got == [oracle.complete(PROMPTS[0], 12, first, "v1")["text"]] * 2
    info = upload(service, auth("acme"), "rolling", second).json()
    want = oracle.complete(PROMPTS[0], 12, second, "v2")["text"]
    # Several requests so both replicas are likely to be asked; every answer uses version 2.
    for _ in range(4):
        assert _served_text(client, "rolling", PROMPTS[0], False)[0] == want
    pinned = _served_text(client, f"rolling@{info['version']}", PROMPTS[0], False)[0]
    assert pinned == want


def test_bad_requests_get_clean_4xx_and_service_keeps_serving(service, adapters):
    url, headers = f"{service}/v1/completions", {**auth("acme"), "Content-Type": "application/json"}
    cases = [
        (b'{"model": "style", "prompt": ', 400),
        (json.dumps({"model": "style", "prompt": "hi", "max_tokens": "lots"}), 400),
        (json.dumps({"model": "style", "prompt": 5}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "max_tokens": 10 ** 9}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "temperature": -1}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "presence_penalty": 2.5}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "repetition_penalty": 0}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "logprobs": 21}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "logprobs": True}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "stop_token_ids": [-1]}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "logit_bias": {"5": 101}}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "response_format": {"type": "yaml"}}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "response_format": {"type": "json_schema"}}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "response_format": {}}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "guided_json": {"type": "object"},
                     "guided_whitespace_pattern": " "}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "guided_regex": "a(b"}), 400, "guided_regex"),
        (json.dumps({"model": "style", "prompt": "hi", "guided_json": "{not json"}), 400, "guided_json"),
        (json.dumps({"model": "style", "prompt": "hi", "structured_outputs": {"regex": "a(b"}}), 400,
         "structured_outputs.regex"),
        (json.dumps({"model": "style", "prompt": "hi", "guided_choice": []}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "guided_regex": "a", "guided_choice": ["b"]}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "structured_outputs": {"structural_tag": "x"}}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "guided_choice": ["a"], "min_tokens": 2}), 400),
        (json.dumps({"model": "style", "prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}),
         400),  # tools are chat's (test_tool_calls.py: its malformed fields)
        (json.dumps({"model": "nope", "prompt": "hi"}), 404),
        (json.dumps({"model": "style", "prompt": "x " * (2 * MAX_MODEL_LEN)}), 400),
    ]
    for body, status, *param in cases:
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        assert response.status_code == status, (body[:60], response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"]
        assert not param or error["param"] == param[0], (body[:60], error)  # a constraint the engine refused
    big = upload_bytes(service, "huge", os.urandom(MAX_ADAPTER_BYTES + (256 << 10)))
    assert big.status_code == 413, big.text
    garbage = upload_bytes(service, "garbage", b"not safetensors")
    assert garbage.status_code == 422, garbage.text
    bad_files = httpx.post(f"{service}/v1/adapters", headers=auth("acme"), data={"name": "x"},
                           files=[("files", ("adapter_model.bin", b"pickle"))])
    assert bad_files.status_code == 400 and "safetensors" in bad_files.json()["error"]["message"]
    text, finish, _ = _served_text(_client(service, "acme"), "style", PROMPTS[0], True)
    assert finish in ("stop", "length")


def upload_bytes(service: str, name: str, weights: bytes) -> httpx.Response:
    files = [("files", ("adapter_config.json", b"{}")),
             ("files", ("adapter_model.safetensors", weights))]
    return httpx.post(f"{service}/v1/adapters", headers=auth("acme"), data={"name": name},
                      files=files, timeout=60)


def test_tenant_concurrency_and_adapter_count_limits(service, tiny_adapter):
    """`solo` may hold 1 request; each of the 4 ingress replicas (2 per engine replica) allows
    ceil(1 / 4) = 1, so of 5 requests sent at once at most 4 are accepted and at least one is
    refused with a 429."""
    headers = auth("solo")
    # as long as the context allows and past EOS, so the three overlap in time
    body = {"model": BASE, "prompt": PROMPTS[0], "max_tokens": MAX_MODEL_LEN - 16,
            "temperature": 0, "ignore_eos": True}
    start, responses = threading.Barrier(5), []

    def send():
        start.wait()
        responses.append(httpx.post(f"{service}/v1/completions", json=body, headers=headers,
                                    timeout=120))
    senders = [threading.Thread(target=send) for _ in range(5)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=150)
    codes = sorted(r.status_code for r in responses)
    assert len(codes) == 5 and 429 in codes and codes.count(200) <= 4, codes
    refusal = next(r for r in responses if r.status_code == 429)
    assert refusal.json()["error"]["code"] == "too_many_concurrent_requests"
    assert refusal.headers["retry-after"] == "1"  # the SDKs wait that long before their retry
    # finished requests give their slots back
    wait_for(lambda: httpx.post(f"{service}/v1/completions", headers=headers, timeout=60,
                                json={"model": BASE, "prompt": "hi", "max_tokens": 2}
                                ).status_code == 200, timeout_s=60, what="the slot released")
    for index in range(MAX_ADAPTERS_PER_TENANT):
        assert upload(service, headers, f"a{index}", tiny_adapter(seed=1)).status_code == 201
    over = upload(service, headers, "one-too-many", tiny_adapter(seed=1))
    assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_adapters"


def test_logs_carry_request_ids_never_prompts(service, adapters):
    canary = "zebra canary prompt 7f3a"
    done = _client(service, "acme").completions.create(model="style", prompt=canary,
                                                       max_tokens=3, temperature=0)
    log_dir = service.ray_dir / "session_latest" / "logs"

    def logs_text() -> str:
        return "".join(p.read_text(errors="replace") for p in log_dir.rglob("*")
                       if p.is_file() and p.suffix in (".log", ".out", ".err"))

    wait_for(lambda: done.id in logs_text(), timeout_s=60, what="the request id in the logs")
    assert canary not in logs_text()


def test_client_leaving_mid_stream_cancels_the_request_at_the_engine_replica(service, adapters):
    client = _client(service, "acme")
    stream = client.completions.create(model="style", prompt=PROMPTS[0], max_tokens=200,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    rid = next(iter(stream)).id
    stream.close()  # the HTTP connection goes; 200 tokens would take the tiny model seconds
    log_dir = service.ray_dir / "session_latest" / "logs"

    def replica_saw_cancel() -> bool:
        return any(f"request {rid} cancelled by the caller" in p.read_text(errors="replace")
                   for p in log_dir.rglob("*LLMServer*") if p.is_file())

    wait_for(replica_saw_cancel, timeout_s=60, what="the engine replica's cancel of the request")


def test_client_leaving_a_whole_response_cancels_the_request_at_the_engine_replica(service, adapters):
    """Without stream the ingress awaits the whole output: a client gone meanwhile must not
    leave its request decoding (and holding a seat and the tenant's place) to the end."""
    log_dir = service.ray_dir / "session_latest" / "logs"

    def cancels() -> int:
        return sum(p.read_text(errors="replace").count("cancelled by the caller")
                   for p in log_dir.rglob("*LLMServer*") if p.is_file())

    body = {"model": "style", "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True}
    started = time.perf_counter()
    assert httpx.post(f"{service}/v1/completions", headers=auth("acme"), json=body,
                      timeout=60).status_code == 200
    whole_s = time.perf_counter() - started  # the client leaves a quarter of the way in
    before = cancels()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{service}/v1/completions", headers=auth("acme"), json=body, timeout=whole_s / 4)
    wait_for(lambda: cancels() > before, timeout_s=60, what="the engine replica's cancel of the request")


def test_prometheus_metrics_per_tenant_and_engine(service, adapters):
    _served_text(_client(service, "globex"), "style", PROMPTS[0], True)
    wanted = ["ray_moeplex_output_tokens_total", "ray_moeplex_time_to_first_token_seconds_count",
              "ray_moeplex_time_per_output_token_seconds_count",
              "ray_moeplex_adapter_loads_total", "ray_moeplex_adapter_load_seconds_count",
              "ray_moeplex_engine_batch_size", "ray_moeplex_engine_distinct_adapters_per_step",
              "ray_moeplex_engine_adapter_slot_loads_total"]

    def globex_requests() -> list[str] | None:
        text = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines()
                 if line.startswith("ray_moeplex_requests_total{")
                 and 'tenant="globex"' in line and 'status="200"' in line]
        return lines if lines and all(w in text for w in wanted) else None

    lines = wait_for(globex_requests, timeout_s=90, period_s=3, what="moeplex metrics exported")
    assert float(lines[0].rsplit(" ", 1)[1]) >= 1


def _scrape(service: str) -> dict:
    """GET /metrics on the API's port, parsed as Prometheus text: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{service}/metrics", timeout=10)  # no tenant key: as vLLM's
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def test_metrics_endpoint_for_the_inference_gateway(service, adapters, tiny_adapter):
    """vLLM's series at {service}/metrics over both engine replicas; an adapter with a running
    request is named in vllm:lora_requests_info; this node's ray_moeplex_* series beside."""
    assert upload(service, auth("globex"), "gauge-probe", tiny_adapter(seed=7)).status_code == 201
    families = _scrape(service)
    assert families["vllm:num_requests_waiting"].type == "gauge"
    assert families["vllm:num_requests_waiting"].samples[0].labels == {"model_name": BASE}
    assert "vllm:num_requests_running" in families
    assert 0 <= families["vllm:kv_cache_usage_perc"].samples[0].value <= 1
    assert families["vllm:prefix_cache_hits"].type == "counter"  # earlier tests here had hits
    assert 0 < families["vllm:prefix_cache_hits"].samples[0].value <= families["vllm:prefix_cache_queries"].samples[0].value
    labels = families["vllm:lora_requests_info"].samples[0].labels
    assert int(labels["max_lora"]) >= 1
    body = {"model": "gauge-probe", "prompt": PROMPTS[0], "max_tokens": MAX_MODEL_LEN - 16,
            "temperature": 0, "ignore_eos": True, "stream": True}
    stop, failures = threading.Event(), []

    def keep_streaming():  # one long request after another until the scrape saw one
        while not stop.is_set():
            with httpx.stream("POST", f"{service}/v1/completions", json=body,
                              headers=auth("globex"), timeout=120) as response:
                if response.status_code != 200:
                    failures.append(response.read())
                    return
                for _ in response.iter_lines():
                    if stop.is_set():
                        break

    def running_adapters() -> list[str] | None:
        assert not failures, failures
        info = _scrape(service)["vllm:lora_requests_info"].samples[0]
        running = info.labels["running_lora_adapters"].split(",")
        return running if "gauge-probe" in running else None

    streamer = threading.Thread(target=keep_streaming, daemon=True)
    streamer.start()
    try:
        wait_for(running_adapters, timeout_s=60, period_s=0.3, what="gauge-probe running")
    finally:
        stop.set()
        streamer.join(timeout=120)
    wait_for(lambda: any(name.startswith("ray_moeplex_requests") for name in _scrape(service)),
             timeout_s=90, period_s=3, what="this node's ray_moeplex_* series at /metrics")


def test_a_hot_adapter_is_served_by_both_engine_replicas(service, tiny_adapter, oracle):
    """An adapter on one replica takes all the traffic: past its share (hot_adapter_share, 0.25 by
    default) the ingress stops pinning it to that replica, and both engine replicas serve it (Serve
    alone would keep it on the one that has it: 8 streams are far below max_ongoing_requests)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    path = tiny_adapter(seed=7)
    assert upload(service, auth("globex"), "hot", path).status_code == 201
    client = _client(service, "globex")
    llm = serve.get_deployment_handle("LLMServer", APP)

    def holders() -> int:
        return sum("hot" in snap["resident_adapters"] for snap in llm.broadcast("metrics_snapshot").results())

    def one(k: int) -> str:
        return client.completions.create(model="hot", prompt=PROMPTS[k % 2], max_tokens=2,
                                         temperature=0).choices[0].text

    try:
        one(0)
        time.sleep(2)  # the replica's engine stats (resident adapters) refresh every ~0.2 s
        assert holders() == 1  # affinity: one replica has it
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(one, range(240)))
        want = [oracle.complete(p, 2, path)["text"] for p in PROMPTS]
        assert all(text == want[k % 2] for k, text in enumerate(texts))
        assert wait_for(lambda: holders() == 2, timeout_s=10, period_s=0.5, what="both replicas")
    finally:
        httpx.delete(f"{service}/v1/adapters/hot", headers=auth("globex"), timeout=60)


def test_replica_killed_mid_stream_later_requests_succeed(service, adapters):
    """Kill every engine replica while a stream is open; Serve replaces them and we recover."""
    import ray

    client = _client(service, "globex")
    stream = client.completions.create(model="style", prompt=PROMPTS[0], max_tokens=200,
                                       temperature=0, stream=True)
    next(iter(stream))  # the stream is open and producing
    for actor in llm_replica_actors(APP):
        ray.kill(actor, no_restart=True)
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for _ in stream:
            pass

    def served():
        try:
            return _served_text(client, "style", PROMPTS[1], False, max_tokens=4)
        except openai.APIError:
            return None

    text, finish, usage = wait_for(served, timeout_s=240, period_s=2, what="a replacement replica")
    assert usage.completion_tokens >= 1
    assert _served_text(client, "style", PROMPTS[1], True, max_tokens=4)[0] == text
