"""Prefill and mixed steps through PrefillGraphs' padded static buffers (eager here, on the
Triton interpreter; CUDA graphs on the GPU) give the tokens of ordinary eager steps.

The two engines run in subprocesses, at once (tests.engine.helpers.interpreter_scripts).
"""
import pytest

from engine.prefill_graphs import token_buckets
from tests.engine.helpers import interpreter_scripts

SCRIPT = """
import json, sys
from engine import LoRARequest, SamplingParams
from engine.prefill_graphs import PrefillGraphs
from tests.engine.helpers import make_engine
ckpt, path_a, path_b, graphs = sys.argv[1:5]
kw = dict(max_loras=2, max_num_batched_tokens=40, max_num_seqs=4, triton_prefill_attention=True)
prompts = [list(range(5, 12)), list(range(40, 73)), [20, 21, 22], list(range(80, 99)), [3, 4]]
loras = [None, LoRARequest("t/a", path_a), LoRARequest("u/b", path_b), None, LoRARequest("t/a", path_a)]
params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
engine = make_engine(ckpt, **kw)
runs = []
if graphs == "1":
    r, c = engine.runner, engine.config
    r.prefill_graphs = PrefillGraphs(r.model, c.max_num_batched_tokens, c.max_num_seqs, c.max_model_len,
                                     c.block_size, r.num_kv_blocks * c.block_size, True, r.device,
                                     use_graphs=False)
    r.prefill_graphs.capture_all()
    run = r.prefill_graphs.run
    r.prefill_graphs.run = lambda inputs, feed=None: runs.append(
        (len(inputs.input_ids), len(inputs.query_lens), inputs.lora_slots is not None)) or run(inputs, feed)
outs = [o["token_ids"] for o in engine.generate(prompts, params, loras)]
# base-model steps too, whether or not the adapters above loaded before the first step
outs += [o["token_ids"] for o in engine.generate(prompts[3:4], params)]
print(json.dumps({"outs": outs, "runs": runs}))
"""


def test_buckets():
    assert token_buckets(2048) == [32, 64, 128, 256, 512, 1024, 2048]
    assert token_buckets(40) == [32, 40] and token_buckets(16) == [16]


def test_prefill_graph_steps_equal_eager_steps(checkpoints, adapters):
    fam = "qwen3_moe"
    args = [str(checkpoints[fam]), str(adapters[fam]["a"]), str(adapters[fam]["b"])]
    eager, graphs = interpreter_scripts(SCRIPT, [args + ["0"], args + ["1"]])
    assert graphs["outs"] == eager["outs"] and len(eager["outs"]) == 6 and all(len(t) == 4 for t in eager["outs"])
    runs = graphs["runs"]
    # prefill chunks padded to a bucket, mixed with decodes, with and without adapters
    assert any(n > 1 for n, _, _ in runs) and {True, False} <= {lora for _, _, lora in runs}
    assert any(seqs > 1 and n > seqs for n, seqs, _ in runs)


@pytest.mark.gpu
def test_prefill_graphs_on_gpu_equal_eager(checkpoints, adapters):
    from engine import LoRARequest, SamplingParams
    from tests.engine.helpers import make_engine
    fam = "qwen3_moe"
    prompts = [list(range(5, 12)), list(range(40, 73)), [20, 21, 22], list(range(80, 99))]
    loras = [None, LoRARequest("t/a", str(adapters[fam]["a"])), LoRARequest("u/b", str(adapters[fam]["b"])), None]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        engine = make_engine(checkpoints[fam], max_loras=2, device="cuda", dtype="float32",
                             max_num_batched_tokens=40, triton_prefill_attention=True, prefill_graphs=graphs)
        assert (engine.runner.prefill_graphs is not None) == graphs
        outs.append([o["token_ids"] for o in engine.generate(prompts, params, loras)])
    assert outs[0] == outs[1]
