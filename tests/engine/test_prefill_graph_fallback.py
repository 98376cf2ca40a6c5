"""A step larger than the largest prefill graph bucket runs eagerly, and the generations equal an
engine without prefill graphs (their padded static-buffer path runs eagerly here, on the Triton
interpreter).

The two engines run in subprocesses, at once (tests.engine.helpers.interpreter_scripts).
"""
from tests.engine.helpers import interpreter_scripts

SCRIPT = """
import json, sys
from engine import LoRARequest, SamplingParams
from engine.prefill_graphs import PrefillGraphs
from tests.engine.helpers import make_engine
ckpt, path_a, graphs = sys.argv[1:4]
kw = dict(max_loras=2, max_num_batched_tokens=40, max_num_seqs=4, triton_prefill_attention=True)
prompts = [list(range(5, 12)), list(range(40, 73)), list(range(80, 99))]
loras = [None, LoRARequest("t/a", path_a), None]
params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
engine = make_engine(ckpt, **kw)
graph_steps, eager_steps = [], []
if graphs == "1":
    r, c = engine.runner, engine.config
    # buckets up to 16 tokens while a step may hold 40
    r.prefill_graphs = PrefillGraphs(r.model, 16, c.max_num_seqs, c.max_model_len, c.block_size,
                                     r.num_kv_blocks * c.block_size, True, r.device, use_graphs=False)
    r.prefill_graphs.capture_all()
    run, eager = r.prefill_graphs.run, r.eager_inputs
    r.prefill_graphs.run = lambda inputs, feed=None: graph_steps.append(len(inputs.input_ids)) or run(inputs, feed)
    r.eager_inputs = lambda inputs: eager_steps.append(len(inputs.input_ids)) or eager(inputs)
got = [o["token_ids"] for o in engine.generate(prompts, params, loras)]
print(json.dumps({"got": got, "graph": graph_steps, "eager": eager_steps}))
"""


def test_steps_past_the_largest_bucket_run_eagerly_with_equal_tokens(checkpoints, adapters):
    fam = "qwen3_moe"
    args = [str(checkpoints[fam]), str(adapters[fam]["a"])]
    plain, res = interpreter_scripts(SCRIPT, [args + ["0"], args + ["1"]])
    assert res["got"] == plain["got"] and all(len(t) == 3 for t in res["got"])
    assert res["graph"] and max(res["graph"]) <= 16
    assert res["eager"] and min(res["eager"]) > 16
