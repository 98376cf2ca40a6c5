"""A step larger than the largest prefill graph bucket runs eagerly, and the generations equal an
engine without prefill graphs (their padded static-buffer path runs eagerly here, on the Triton
interpreter).

Runs in a subprocess because MOEPLEX_TRITON / TRITON_INTERPRET must be set before triton loads.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
from engine import LoRARequest, SamplingParams
from engine.prefill_graphs import PrefillGraphs
from tests.engine.helpers import make_engine
ckpt, path_a = sys.argv[1:3]
kw = dict(max_loras=2, max_num_batched_tokens=40, max_num_seqs=4, triton_prefill_attention=True)
prompts = [list(range(5, 12)), list(range(40, 73)), list(range(80, 99))]
loras = [None, LoRARequest("t/a", path_a), None]
params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
expected = [o["token_ids"] for o in make_engine(ckpt, **kw).generate(prompts, params, loras)]
engine = make_engine(ckpt, **kw)
r, c = engine.runner, engine.config
# buckets up to 16 tokens while a step may hold 40
r.prefill_graphs = PrefillGraphs(r.model, 16, c.max_num_seqs, c.max_model_len, c.block_size,
                                 r.num_kv_blocks * c.block_size, True, r.device, use_graphs=False)
r.prefill_graphs.capture_all()
graph_steps, eager_steps = [], []
run, eager = r.prefill_graphs.run, r.eager_inputs
r.prefill_graphs.run = lambda inputs, feed=None: graph_steps.append(len(inputs.input_ids)) or run(inputs, feed)
r.eager_inputs = lambda inputs: eager_steps.append(len(inputs.input_ids)) or eager(inputs)
got = [o["token_ids"] for o in engine.generate(prompts, params, loras)]
print(json.dumps({"expected": expected, "got": got, "graph": graph_steps, "eager": eager_steps}))
"""


def test_steps_past_the_largest_bucket_run_eagerly_with_equal_tokens(checkpoints, adapters):
    env = {**os.environ, "MOEPLEX_TRITON": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    fam = "qwen3_moe"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoints[fam]), str(adapters[fam]["a"])],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["got"] == res["expected"] and all(len(t) == 3 for t in res["got"])
    assert res["graph"] and max(res["graph"]) <= 16
    assert res["eager"] and min(res["eager"]) > 16
