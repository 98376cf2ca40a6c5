"""Prefix caching (engine.prefix_cache, engine.block_manager): which blocks a sequence finds
cached and shares, who shares them, which free block is handed out, and the engine's outputs
with cache hits against transformers + PEFT and against an engine without the cache."""
import pytest
import torch

from engine import SamplingParams
from engine.block_manager import BlockManager
from engine.prefix_cache import PrefixCache
from engine.scheduler import Scheduler
from engine.sequence import LoRARequest, Sequence
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import assert_close, lora, make_engine
from tests.engine.test_scheduler import FakeLoRAManager

BLOCK = 4


def seq(i, tokens, tenant="t", adapter=None, max_tokens=4):
    lora_request = LoRARequest(adapter, "/x") if adapter else None
    return Sequence(i, f"r{i}", list(tokens), SamplingParams(max_tokens=max_tokens), lora_request, tenant)


def scheduler(num_blocks=32, scope="tenant"):
    return Scheduler(8, 64, BlockManager(num_blocks, BLOCK, prefix_cache=PrefixCache(BLOCK, scope)),
                     FakeLoRAManager(4))


def run_prefill(sched, *seqs):
    """Admit and launch `seqs` (whole prompts in one step); returns how many tokens each got."""
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    sched.launched(out, [True] * len(out.scheduled))
    return {s.request_id: n for s, n in out.scheduled}


def test_a_prompt_that_starts_like_a_finished_one_takes_its_blocks_and_computes_only_the_rest():
    sched = scheduler()
    first = seq(0, range(1, 11))  # 10 tokens: two full blocks, then two tokens
    run_prefill(sched, first)
    cached = first.block_table[:2]
    sched.finish(first, "stop")
    second = seq(1, [*range(1, 9), 50, 51, 52])
    assert run_prefill(sched, second) == {"r1": 3}
    assert second.block_table[:2] == cached and second.num_cached_tokens == 8
    assert (sched.block_manager.cache.queried_tokens, sched.block_manager.cache.hit_tokens) == (10 + 11, 8)


def test_a_prompt_equal_to_a_cached_one_still_computes_its_last_token():
    sched = scheduler()
    first = seq(0, range(1, 9))  # exactly two blocks
    run_prefill(sched, first)
    sched.finish(first, "stop")
    again = seq(1, range(1, 9))
    assert run_prefill(sched, again) == {"r1": 4}  # one block found: its last block holds the token to sample from
    assert again.num_cached_tokens == 4


@pytest.mark.parametrize("scope, shared_across_tenants", [("tenant", False), ("all", True)])
def test_prefixes_are_shared_within_an_adapter_and_across_tenants_only_under_the_all_scope(
        scope, shared_across_tenants):
    sched = scheduler(scope=scope)
    first = seq(0, range(1, 10), tenant="acme", adapter="acme/style@v1")
    run_prefill(sched, first)
    sched.finish(first, "stop")
    same = seq(1, range(1, 10), tenant="acme", adapter="acme/style@v1")
    other_tenant = seq(2, range(1, 10), tenant="globex", adapter="acme/style@v1")
    base_model = seq(3, range(1, 10), tenant="acme")
    other_adapter = seq(4, range(1, 10), tenant="acme", adapter="acme/style@v2")
    got = run_prefill(sched, same, other_tenant, base_model, other_adapter)
    assert got == {"r1": 1, "r2": 1 if shared_across_tenants else 9, "r3": 9, "r4": 9}


def test_blocks_shared_by_two_running_sequences_are_free_only_once_both_end():
    sched = scheduler(num_blocks=16)
    first = seq(0, range(1, 10))
    run_prefill(sched, first)
    second = seq(1, [*range(1, 9), 70])
    run_prefill(sched, second)
    shared = first.block_table[:2]
    assert second.block_table[:2] == shared
    blocks = sched.block_manager
    sched.finish(first, "stop")
    assert not set(shared) & set(blocks.free_block_ids)
    sched.finish(second, "stop")
    assert set(shared) <= set(blocks.free_block_ids) and blocks.num_free_blocks == 16


def step(sched, *added):
    """One scheduled and launched step (a sequence samples when its step reaches its last
    token); returns each one's new tokens."""
    for s in added:
        sched.add(s)
    out = sched.schedule()
    sched.launched(out, [s.num_computed_tokens + n == s.num_tokens for s, n in out.scheduled])
    return {s.request_id: n for s, n in out.scheduled}


@pytest.mark.parametrize("budget, steps", [
    (64, [{"r0": 9, "r2": 9}, {"r0": 1, "r1": 1, "r2": 1}]),
    # r1 rides behind r0's chunks, r2 (another prompt) is not held back
    (6, [{"r0": 6}, {"r0": 3, "r2": 3}, {"r0": 1, "r2": 5}, {"r0": 1, "r1": 1, "r2": 1}]),
])
def test_a_prompt_whose_next_block_another_fills_in_the_step_waits_a_step_and_finds_it_cached(budget, steps):
    sched = Scheduler(8, budget, BlockManager(32, BLOCK, prefix_cache=PrefixCache(BLOCK)))
    a, b, other = seq(0, range(1, 10)), seq(1, range(1, 10)), seq(2, range(40, 49))
    got = [step(sched, a, b, other)] + [step(sched) for _ in steps[1:]]
    assert got == steps
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]


def test_a_sequence_left_for_the_next_step_keeps_its_seat_from_those_behind_it():
    sched = Scheduler(2, 64, BlockManager(32, BLOCK, prefix_cache=PrefixCache(BLOCK)))
    first, rider = seq(0, range(1, 10), max_tokens=50), seq(1, range(1, 10), max_tokens=50)
    behind = seq(2, range(40, 44), max_tokens=50)
    assert step(sched, first, rider, behind) == {"r0": 9}  # two seats: the rider's is kept
    assert step(sched) == {"r0": 1, "r1": 1}
    assert [s.request_id for q in sched.waiting.values() for s in q] == ["r2"]


def test_a_tenants_many_riders_keep_one_seat_and_another_tenant_takes_the_next():
    sched = Scheduler(4, 64, BlockManager(64, BLOCK, prefix_cache=PrefixCache(BLOCK)))
    riders = [seq(i, range(1, 10), tenant="acme", max_tokens=50) for i in range(5)]
    other = seq(9, range(40, 44), tenant="globex", max_tokens=50)
    assert step(sched, *riders, other) == {"r0": 9, "r9": 4}  # seats: r0, r1's kept, r9, one free
    assert step(sched) == {"r0": 1, "r9": 1, "r1": 1, "r2": 1}


def test_a_block_filled_by_two_sequences_is_cached_once_and_the_later_one_chains_on_it():
    sched = scheduler()
    cache = sched.block_manager.cache
    a = seq(0, [1, 2, 3], max_tokens=8)
    step(sched, a)  # its first token is sampled, not read back: a's first block is not known yet
    b = seq(1, [1, 2, 3, 9, 5])  # a next turn, say, that starts with that token (9)
    assert step(sched, b) == {"r0": 1, "r1": 5}  # a's step fills the block, with a token the host lacks
    assert b.block_table[0] in cache and a.num_cached_blocks == 0
    a.output_token_ids, a.num_pending = [9], 1  # a's first token read back
    sched.block_manager.cache_computed(a)  # the block b cached first: a's stays uncached
    assert a.num_cached_blocks == 1 and a.block_table[0] not in cache
    a.output_token_ids, a.num_pending, a.num_computed_tokens = [9, 5, 6, 7, 8], 0, 8
    a.block_table.append(sched.block_manager._take_free())
    sched.block_manager._refs[a.block_table[-1]] = 1
    sched.block_manager.cache_computed(a)  # a's second block chains on b's first
    probe = seq(2, [1, 2, 3, 9, 5, 6, 7, 8, 0])
    assert sched.block_manager.cached_prefix(probe) == [b.block_table[0], a.block_table[1]]


def test_a_preempted_sequence_finds_its_own_blocks_when_it_comes_back():
    sched = scheduler()
    s = seq(0, range(1, 14), max_tokens=8)
    run_prefill(sched, s)
    s.num_pending, s.output_token_ids = 0, [99]  # its first token read back: 14 tokens, 13 computed
    blocks = list(s.block_table[:3])
    sched.preempt(s)
    assert s.num_computed_tokens == 0 and s.block_table == []
    assert run_prefill(sched) == {"r0": 2}
    assert s.block_table[:3] == blocks and s.num_computed_tokens == 14


def test_tokens_whose_python_hashes_collide_do_not_share_a_block():
    # hash(-1) == hash(-2) in CPython: keys are compared whole, never by their hash alone
    assert hash((("root", "t", ""), (1, 2, 3, -1))) == hash((("root", "t", ""), (1, 2, 3, -2)))
    sched = scheduler()
    first = seq(0, [1, 2, 3, -1, 5])
    run_prefill(sched, first)
    sched.finish(first, "stop")
    assert run_prefill(sched, seq(1, [1, 2, 3, -2, 5])) == {"r1": 5}


def test_without_the_heap_a_new_block_is_one_holding_no_prefix_then_the_one_let_go_longest_ago():
    blocks = BlockManager(6, BLOCK, prefix_cache=PrefixCache(BLOCK))
    sched = Scheduler(8, 64, blocks)
    old, new = seq(0, range(1, 9)), seq(1, range(11, 19))
    run_prefill(sched, old)  # blocks 5, 4
    sched.finish(old, "stop")
    run_prefill(sched, new)  # 3, 2: the free blocks without a prefix go first
    sched.finish(new, "stop")
    assert (old.num_cached_blocks, sorted(blk for blk in range(6) if blk in blocks.cache)) == (0, [2, 3, 4, 5])
    taker = seq(2, range(21, 32))  # 3 blocks: 1, 0, then the oldest let go: old's last block (4)
    run_prefill(sched, taker)
    assert taker.block_table == [1, 0, 4]
    assert run_prefill(sched, seq(3, range(1, 9))) == {"r2": 1, "r3": 4}  # old's first block is still there


class Borrower:
    def give_back(self, count):
        return 0


def free_count_bound(blocks):
    """What the heap may borrow when the run of free blocks above it is not the bound."""
    return blocks.num_free_blocks - blocks.reserve_blocks - blocks.growth_blocks


def heap_scheduler(num_blocks, reserve=0, heap_wants=True, band=0):
    """A scheduler over blocks a heap borrows from: by default one that wants room (every spare
    block is kept lendable); with heap_wants=False only `band` blocks are."""
    blocks = BlockManager(num_blocks, BLOCK, reserve, prefix_cache=PrefixCache(BLOCK))
    blocks.borrower = Borrower()
    blocks.heap_wants, blocks.heap_band = heap_wants, band
    return Scheduler(8, 64, blocks), blocks


def test_a_heap_wanting_no_room_leaves_the_prefix_cache_every_block_past_its_band():
    sched, blocks = heap_scheduler(16, heap_wants=False, band=3)
    prompts = [list(range(100 * k, 100 * k + 8)) + [1] for k in range(4)]  # 2 full blocks each, 3 taken
    for k, prompt in enumerate(prompts):
        done = seq(k, prompt, max_tokens=1)
        run_prefill(sched, done)
        sched.finish(done, "stop")
    # 8 full blocks of prefixes cached, the 3 lowest blocks still free for the heap to borrow
    assert [len(blocks.cached_prefix(seq(10 + k, p))) for k, p in enumerate(prompts)] == [2, 2, 2, 2]
    assert blocks.lendable() >= 3
    blocks.heap_wants = True  # an adapter now wants room: the cache's oldest prefix goes first
    run_prefill(sched, seq(20, range(900, 909), max_tokens=1))
    assert len(blocks.cached_prefix(seq(21, prompts[0]))) < 2


def test_where_the_heap_borrows_blocks_new_ones_stay_above_the_lowest_held_taking_the_oldest_prefix_there():
    sched, blocks = heap_scheduler(10)
    # one token each (max_tokens=1): no decode step asks for a block in between
    a, b = seq(0, range(1, 17), max_tokens=1), seq(1, range(31, 39), max_tokens=1)
    run_prefill(sched, a, b)  # a: 9, 8, 7, 6; b: 5, 4
    sched.finish(a, "stop")  # 9-6 cached, let go last block first
    lendable = blocks.lendable()
    c = seq(2, range(51, 59), max_tokens=1)
    run_prefill(sched, c)
    # the highest free blocks (9, 8) hold a's first tokens: c takes a's last two, the oldest
    assert c.block_table == [6, 7] and blocks.lendable() == lendable == 4
    assert blocks.cached_prefix(seq(3, [*range(1, 9), 70])) == [9, 8]


def test_where_the_heap_borrows_blocks_requests_one_at_a_time_keep_a_shared_prefix():
    # a step's reserve (4 blocks here) stays free for new tokens: the heap can never borrow the
    # top 4 blocks' worth, so a new block there costs it nothing
    sched, blocks = heap_scheduler(16, reserve=4)
    system = list(range(100, 112))  # 3 blocks
    a = seq(0, system + [1], max_tokens=1)
    run_prefill(sched, a)  # 15, 14, 13 and 12 (one token)
    sched.finish(a, "stop")
    other = seq(1, range(500, 508), max_tokens=1)
    run_prefill(sched, other)
    assert other.block_table == [12, 11] and blocks.lendable() == free_count_bound(blocks) == 9
    sched.finish(other, "stop")
    again = seq(2, system + [2, 3], max_tokens=1)
    assert run_prefill(sched, again) == {"r2": 2} and again.block_table[:3] == [15, 14, 13]


def test_where_the_heap_borrows_blocks_a_new_one_may_go_below_the_lowest_held_where_the_free_count_bounds_the_heap():
    sched, blocks = heap_scheduler(8)
    a = seq(0, range(1, 9), max_tokens=1)
    run_prefill(sched, a)  # 7, 6
    b = seq(1, range(11, 19), max_tokens=1)
    run_prefill(sched, b)  # 5, 4
    sched.finish(b, "stop")
    c = seq(2, range(21, 25), max_tokens=1)
    run_prefill(sched, c)
    # nothing free above a's blocks, and the free count lets the heap have 3 blocks (0-2) at most:
    # c takes the oldest cached block from 3 up, b's last one
    assert c.block_table == [4] and blocks.lendable() == free_count_bound(blocks) == 3
    assert blocks.cached_prefix(seq(3, range(11, 19))) == [5]


def test_a_cached_block_lent_to_the_adapter_heap_is_no_longer_found():
    blocks = BlockManager(10, BLOCK, prefix_cache=PrefixCache(BLOCK))
    blocks.borrower = Borrower()
    sched = Scheduler(8, 64, blocks)
    first = seq(0, range(1, 14))  # blocks 9, 8, 7, 6
    run_prefill(sched, first)
    sched.finish(first, "stop")
    probe = seq(1, range(1, 14))
    assert blocks.cached_prefix(probe) == [9, 8, 7]
    blocks.lend(8)  # blocks 0-7: the third cached block among them
    assert blocks.cached_prefix(probe) == [9, 8] and len(blocks.cache) == 2


# ---- the engine on the tiny checkpoints -------------------------------------------------

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_the_tokens_after_a_cached_prefix_get_the_reference_logits_with_an_adapter(checkpoints, adapters):
    ckpt, path = checkpoints["qwen3_moe"], adapters["qwen3_moe"]["c"]
    engine = make_engine(ckpt, max_loras=2, max_lora_rank=16)
    request = lora(adapters, "qwen3_moe", "c")
    first = list(range(40, 58))
    engine.generate([first], GREEDY, [request])
    second = first[:12] + [90, 91, 92, 93, 94]
    engine.add_request("second", second, SamplingParams(max_tokens=1, temperature=0), lora=request)
    sched = engine.scheduler.schedule()
    [(s, n)] = sched.scheduled
    assert (s.num_computed_tokens, n) == (12, 5)
    logits = engine.execute(sched, all_logits=True).logits
    assert_close(logits, reference_logits(load_reference_model(ckpt, path), second)[12:])
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 12 and stats["prefix_cache_queries"] == 18 + 17


def test_greedy_outputs_with_cache_hits_equal_an_engine_without_the_cache(checkpoints, adapters):
    """Prompts sharing prefixes, with and without adapters, chunked (6-token steps) and
    preempted (12 KV blocks): the same tokens as with the cache off."""
    ckpt = checkpoints["qwen3_moe"]
    shared = list(range(100, 116))
    prompts = [shared + [1, 2, 3], shared + [4, 5], shared[:9] + [6, 7, 8, 9], shared + [1, 2, 3]]
    requests = [lora(adapters, "qwen3_moe", "a"), None, lora(adapters, "qwen3_moe", "a"), None]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = {}
    for caching in (False, True):
        engine = make_engine(ckpt, max_loras=2, max_lora_rank=16, max_num_batched_tokens=6,
                             num_kv_blocks=12, max_model_len=32, enable_prefix_caching=caching)
        runs = [engine.generate(prompts[:2], params, requests[:2]),  # the second wave finds the first's blocks
                engine.generate(prompts[2:], params, requests[2:])]
        outs[caching] = [[o["token_ids"] for o in run] for run in runs]
        if caching:
            assert engine.stats()["prefix_cache_hits"] > 0 and engine.num_preemptions > 0
    assert outs[True] == outs[False]


def test_equal_prompts_sent_together_compute_their_prefix_once_and_decode_alike(checkpoints, adapters):
    ckpt = checkpoints["qwen3_moe"]
    prompt, request = list(range(60, 78)), lora(adapters, "qwen3_moe", "b")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = make_engine(ckpt, max_loras=2, max_lora_rank=16, enable_prefix_caching=False).generate(
        [prompt], params, [request])[0]["token_ids"]
    engine = make_engine(ckpt, max_loras=2, max_lora_rank=16)
    outs = engine.generate([prompt] * 3, params, [request] * 3)
    assert [o["token_ids"] for o in outs] == [alone] * 3
    assert engine.stats()["prefix_cache_hits"] == 2 * 16  # the two others found its 4 full blocks


def test_a_next_turn_finds_the_last_turns_answer_cached(checkpoints):
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, async_scheduling=False)
    prompt = list(range(200, 210))
    answer = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    turn = prompt + answer["token_ids"] + [300, 301]
    engine.add_request("turn2", turn, SamplingParams(max_tokens=1, temperature=0))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    # 19 tokens' KV were computed (the last answer token was never fed back): 4 full blocks
    assert outputs[-1].num_cached_tokens == 16
    expected = reference_logits(load_reference_model(ckpt), turn)[-1].argmax().item()
    assert outputs[-1].token_ids_delta == [expected]


def test_the_cache_off_finds_nothing_and_reports_no_cached_tokens(checkpoints):
    engine = make_engine(checkpoints["qwen3_moe"], enable_prefix_caching=False)
    prompt = list(range(10, 30))
    engine.generate([prompt, prompt], GREEDY)
    engine.add_request("again", prompt, SamplingParams(max_tokens=1, temperature=0))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].num_cached_tokens == 0 and engine.stats()["prefix_cache_queries"] == 0


@pytest.mark.gpu
def test_gpu_prefills_after_cached_prefixes_through_the_graphs_match_the_reference(checkpoints, adapters):
    """fp32 on the GPU with its defaults (prefill and decode graphs, async scheduling, the heap
    borrowing KV blocks): prompts after a cached prefix, with and without an adapter, get the
    reference's greedy tokens, and the cache found them."""
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, device="cuda", dtype="float32", max_loras=2, max_lora_rank=16)
    shared = list(range(100, 133))
    names = ["c", None]
    requests = [None if n is None else lora(adapters, "qwen3_moe", n) for n in names]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.generate([shared + [1], shared + [2]], params, requests)
    prompts = [shared + [3, 4, 5], shared[:20] + [6]]
    outs = engine.generate(prompts, params, requests)
    assert engine.stats()["prefix_cache_hits"] >= 32  # the first, admitted first, finds all its blocks
    for prompt, out, name in zip(prompts, outs, names):
        ref = load_reference_model(ckpt, None if name is None else adapters["qwen3_moe"][name])
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                                do_sample=False)[0, len(prompt):].tolist()
        assert out["token_ids"] == expected
