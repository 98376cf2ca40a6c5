"""Decode steps through DecodeGraphs' padded static buffers (eager on CPU, CUDA graphs on GPU)."""
import pytest

from engine import LoRARequest, SamplingParams
from engine.cuda_graphs import DecodeGraphs, batch_buckets, context_buckets
from tests.engine.helpers import PROMPTS, make_engine, static_engine


def test_buckets_cover_every_size():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(3) == [1, 2, 3]
    assert context_buckets(1000, 16) == [256, 512, 1008]
    assert context_buckets(64, 4) == [64]


def test_padded_static_decode_equals_eager(checkpoints, adapters):
    ckpt = checkpoints["qwen3_moe"]
    prompts = PROMPTS + [[7, 8, 9, 10, 11, 12]]
    loras = [None, LoRARequest("t/b", str(adapters["qwen3_moe"]["b"])), None,
             LoRARequest("u/a", str(adapters["qwen3_moe"]["a"]))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eager = make_engine(ckpt, max_num_seqs=5, max_loras=2).generate(prompts, params, loras)
    static = static_engine(ckpt, max_loras=2)
    calls = []
    run = static.runner.graphs.run
    static.runner.graphs.run = lambda inputs, feed=None: calls.append(len(inputs.input_ids)) or run(inputs, feed)
    outs = static.generate(prompts, params, loras)
    assert calls and max(calls) == 4  # 4 sequences padded to the bucket of 4; 3 padded to 4 too
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in eager]


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_on_gpu(checkpoints, adapters):
    ckpt = checkpoints["qwen3_moe"]
    loras = [None, LoRARequest("t/b", str(adapters["qwen3_moe"]["b"])), None]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = []
    for eager in (True, False):
        engine = make_engine(ckpt, max_loras=2, device="cuda", dtype="bfloat16", enforce_eager=eager)
        assert (engine.runner.graphs is None) == eager
        outs.append([o["token_ids"] for o in engine.generate(PROMPTS, params, loras)])
    assert outs[0] == outs[1]


def test_loop_mode_decodes_with_adapters_eagerly(checkpoints, adapters):
    """lora_mode="loop" captures no LoRA graphs (the loop syncs with the host), so decode steps
    with adapters must run eagerly instead of asking for a graph that does not exist."""
    ckpt = checkpoints["qwen3_moe"]
    loras = [None, LoRARequest("t/b", str(adapters["qwen3_moe"]["b"]))]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eager = make_engine(ckpt, max_num_seqs=5, max_loras=2, lora_mode="loop").generate(PROMPTS[:2], params, loras)
    static = make_engine(ckpt, max_num_seqs=5, max_loras=2, lora_mode="loop")
    runner = static.runner
    runner.graphs = DecodeGraphs(runner.model, 5, static.config.max_model_len, static.config.block_size,
                                 runner.num_kv_blocks * static.config.block_size, False, runner.device,
                                 use_graphs=False)  # what ModelRunner captures in loop mode
    runner.graphs.capture_all()
    outs = static.generate(PROMPTS[:2], params, loras)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in eager]
    assert [o["finish_reason"] for o in outs] == ["length", "length"]
