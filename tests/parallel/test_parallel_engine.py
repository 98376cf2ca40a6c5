"""A replica over 2 and 4 ranks (torch.distributed, gloo, one process per rank) against the
single-process engine: the same logits for a mixed batch of three tenants' adapters, the same
greedy tokens, adapters evicted and reloaded on every rank, and start-up failures of one rank
failing the whole replica with that rank's error."""
import shutil

import psutil
import pytest
import torch

from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from engine.errors import EngineError, InvalidRequestError
from engine.testing import make_peft_adapter, make_tiny_checkpoint
from tests.engine.helpers import make_engine, step_logits, wait_for_adapters

# a head, KV head and expert count that 2 and 4 ranks divide (the shared tiny models have 2 KV
# heads and 6 experts)
_SPLITTABLE = {"qwen3_moe": dict(num_experts=8), "mixtral": dict(num_local_experts=8), "olmoe": dict(num_experts=8)}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], [40, 41, 42, 43, 44]]
# (family, tensor_parallel_size, expert_parallel_size): experts split by expert (ep) and by
# intermediate (ep = 1), attention split or whole (tp = 1), on 2 and 4 ranks
SPLITS = [("qwen3_moe", 2, 1), ("qwen3_moe", 4, 4), ("qwen3_moe", 1, 2),
          ("mixtral", 2, 2), ("mixtral", 4, 1), ("olmoe", 2, 2), ("olmoe", 4, 4)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: a checkpoint with 4 KV heads and 8 experts, and three tenants' adapters of
    different ranks and formats (per-expert keys, PEFT's fused experts with rsLoRA and a rank
    pattern, shared-outer experts)."""
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for fam, experts in _SPLITTABLE.items():
        ckpt = make_tiny_checkpoint(root / fam, fam, seed=3, num_key_value_heads=4, **experts)
        out[fam] = (ckpt, {
            "a": make_peft_adapter(ckpt, root / fam / "a", rank=4, fmt="per_expert", alpha=8, seed=11),
            "b": make_peft_adapter(ckpt, root / fam / "b", rank=8, fmt="fused", alpha=16, use_rslora=True,
                                   seed=12, rank_pattern={"v_proj": 6, "down_proj": 4}),
            "c": make_peft_adapter(ckpt, root / fam / "c", rank=16, fmt="shared_outer", alpha=32, seed=13),
        })
    return out


def _requests(adapters) -> list[LoRARequest | None]:
    return [None] + [LoRARequest(f"tenant-{k}/{k}@v1", str(adapters[k])) for k in "abc"]


def _logits(engine: LLMEngine, prompts, requests) -> list[torch.Tensor]:
    """step_logits of one whole-prompt step, its requests then aborted (they never sampled)."""
    logits = step_logits(engine, prompts, requests)
    for i in range(len(prompts)):
        engine.abort(f"s{i}")
    return logits


def _greedy(engine: LLMEngine, requests, max_tokens: int = 6) -> dict[str, list[int]]:
    for i, (prompt, lora) in enumerate(zip(PROMPTS, requests)):
        engine.add_request(f"g{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           lora=lora)
    tokens: dict[str, list[int]] = {f"g{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.token_ids_delta
    return tokens


def _reference(ckpt, adapters) -> tuple[list[torch.Tensor], dict[str, list[int]]]:
    engine = make_engine(ckpt, max_loras=4)
    try:
        requests = _requests(adapters)
        wait_for_adapters(engine, requests)
        return _logits(engine, PROMPTS, requests), _greedy(engine, requests)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def references(models):
    cache = {}

    def get(fam):
        if fam not in cache:
            cache[fam] = _reference(*models[fam])
        return cache[fam]
    return get


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE}


@pytest.mark.parametrize("fam,tp,ep", SPLITS, ids=[f"{f}-tp{t}-ep{e}" for f, t, e in SPLITS])
def test_ranks_give_the_single_process_logits_and_greedy_tokens(models, references, fam, tp, ep):
    ckpt, adapters = models[fam]
    ref_logits, ref_tokens = references(fam)
    before = _children()
    # eager steps launched ahead: a decode's input id is then the previous step's sample, on
    # rank 0's device only, which rank 0 broadcasts
    engine = make_engine(ckpt, max_loras=4, tensor_parallel_size=tp, expert_parallel_size=ep, async_eager_steps=True)
    try:
        assert len(_children() - before) == max(tp, ep) - 1  # ranks 1..N-1, one process each
        requests = _requests(adapters)
        wait_for_adapters(engine, requests)
        logits = _logits(engine, PROMPTS, requests)
        for mine, ref in zip(logits, ref_logits):
            assert (mine - ref).abs().max().item() <= 1e-5
        assert _greedy(engine, requests) == ref_tokens
    finally:
        engine.shutdown()
    assert _children() - before == set()


@pytest.mark.parametrize("layout", ["slots", "bytes"])
def test_adapters_evicted_and_reloaded_on_every_rank(models, references, layout, tmp_path):
    """Two slots (and, by bytes, a heap of two max-rank images), three adapters: each step's
    adapters push the least recently used one out, on rank 0 and on the others alike, at the
    same heap offsets; a reloaded adapter gives its first logits again. The adapters' files are
    gone once rank 0's host tier holds them: the other ranks get their parts from rank 0."""
    ckpt, adapters = models["olmoe"]
    ref_logits, _ = references("olmoe")
    copies = {k: shutil.copytree(adapters[k], tmp_path / k) for k in "abc"}
    requests = _requests(copies)
    engine = make_engine(ckpt, max_loras=2, tensor_parallel_size=2, expert_parallel_size=2, lora_layout=layout)
    try:
        for request in requests[1:]:  # into rank 0's host tier, one at a time
            wait_for_adapters(engine, [request])
        for path in copies.values():
            shutil.rmtree(path)
        for rounds in ([1, 2], [3], [1], [2, 3], [1]):  # indices into requests: a, b; c; a; b, c; a
            wait_for_adapters(engine, [requests[i] for i in rounds])
            logits = _logits(engine, [PROMPTS[i] for i in rounds], [requests[i] for i in rounds])
            for i, mine in zip(rounds, logits):
                assert (mine - ref_logits[i]).abs().max().item() <= 1e-5
        assert engine.lora_manager.stats.evictions >= 4
    finally:
        engine.shutdown()


def _without_experts(ckpt, out, experts: range):
    from safetensors.torch import load_file, save_file
    shutil.copytree(ckpt, out)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(str(shard))
        kept = {k: v for k, v in tensors.items() if not any(f".mlp.experts.{e}." in k for e in experts)}
        if len(kept) < len(tensors):
            save_file(kept, str(shard), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("missing,failing", [(range(4, 8), 1), (range(0, 4), 0)], ids=["rank1", "rank0"])
def test_a_rank_failing_at_start_up_fails_the_replica_with_its_error(models, tmp_path, missing, failing):
    """Experts 4-7 are rank 1's part under ep=2: only that rank finds them missing (and 0-3
    only rank 0). The engine raises that rank's error and no rank's process outlives it."""
    ckpt, _ = models["qwen3_moe"]
    broken = _without_experts(ckpt, tmp_path / "broken", missing)
    before = _children()
    with pytest.raises(EngineError, match=rf"rank {failing} failed at start-up \(weights\).*lacks weights"):
        LLMEngine(EngineConfig(model=broken, max_loras=0, block_size=4, max_model_len=64,
                               tensor_parallel_size=2, expert_parallel_size=2, distributed_timeout_s=60))
    assert _children() - before == set()
    # the group is gone with it: this process can start the next replicas, from one config
    config = EngineConfig(model=ckpt, max_loras=0, block_size=4, max_model_len=64, tensor_parallel_size=2)
    for _ in range(2):
        LLMEngine(config).shutdown()
    assert config.distributed_init_method is None


def test_dense_mlp_layers_split_over_the_ranks(tmp_path):
    """Qwen3-MoE with a dense-MLP layer (mlp_only_layers): its gate/up rows and down columns are
    cut by tensor parallelism and summed back; base-model logits equal the single process's."""
    ckpt = make_tiny_checkpoint(tmp_path / "dense", "qwen3_moe", seed=4, num_key_value_heads=4, num_experts=8,
                                mlp_only_layers=[0])
    ref = make_engine(ckpt)
    try:
        expected = _logits(ref, PROMPTS[:2], None)
    finally:
        ref.shutdown()
    engine = make_engine(ckpt, tensor_parallel_size=2)
    try:
        assert engine.spec.dense_layers == (0,)
        for mine, want in zip(_logits(engine, PROMPTS[:2], None), expected):
            assert (mine - want).abs().max().item() <= 1e-5
    finally:
        engine.shutdown()


def test_a_rank_process_that_exits_before_joining_fails_the_start_at_once(models, monkeypatch):
    """A rank that dies without a word (here: an interpreter that exits at once) is seen by its
    exit, not after the rendezvous time-out."""
    import sys
    import time

    ckpt, _ = models["mixtral"]
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"rank 1 exited with code 1 at start-up \(joined\)"):
        make_engine(ckpt, tensor_parallel_size=2, distributed_timeout_s=120)
    assert time.monotonic() - started < 30


def test_a_step_after_a_rank_died_fails_with_an_error_instead_of_waiting(models):
    ckpt, _ = models["qwen3_moe"]
    engine = make_engine(ckpt, tensor_parallel_size=2)
    try:
        [worker] = engine.runner.group.procs
        worker.kill()
        worker.wait()
        engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0))
        with pytest.raises(EngineError, match="rank 1 of this replica exited"):
            engine.runner.execute(engine.scheduler.schedule().scheduled)
    finally:
        engine.shutdown()


def test_splits_that_do_not_divide_the_model_are_refused(models):
    ckpt, _ = models["qwen3_moe"]
    with pytest.raises(InvalidRequestError, match="num_experts=8 is not divisible by 3"):
        make_engine(ckpt, expert_parallel_size=3)
    with pytest.raises(InvalidRequestError, match="each must be 1 or"):
        EngineConfig(model=ckpt, tensor_parallel_size=2, expert_parallel_size=4)
