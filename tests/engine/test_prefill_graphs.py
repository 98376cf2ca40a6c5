"""Prefill and mixed steps through PrefillGraphs' padded static buffers (eager here, on the
Triton interpreter; CUDA graphs on the GPU) give the tokens of ordinary eager steps.

Runs in a subprocess because MOEPLEX_TRITON / TRITON_INTERPRET must be set before triton loads.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.prefill_graphs import token_buckets

SCRIPT = """
import json, sys
from engine import LoRARequest, SamplingParams
from engine.prefill_graphs import PrefillGraphs
from tests.engine.helpers import make_engine
ckpt, path_a, path_b = sys.argv[1:4]
kw = dict(max_loras=2, max_num_batched_tokens=40, max_num_seqs=4, triton_prefill_attention=True)
prompts = [list(range(5, 12)), list(range(40, 73)), [20, 21, 22], list(range(80, 99)), [3, 4]]
loras = [None, LoRARequest("t/a", path_a), LoRARequest("u/b", path_b), None, LoRARequest("t/a", path_a)]
params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
outs = {}
for graphs in (False, True):
    engine = make_engine(ckpt, **kw)
    runs = []
    if graphs:
        r, c = engine.runner, engine.config
        r.prefill_graphs = PrefillGraphs(r.model, c.max_num_batched_tokens, c.max_num_seqs, c.max_model_len,
                                         c.block_size, r.num_kv_blocks * c.block_size, True, r.device,
                                         use_graphs=False)
        r.prefill_graphs.capture_all()
        run = r.prefill_graphs.run
        r.prefill_graphs.run = lambda inputs, feed=None: runs.append(
            (len(inputs.input_ids), len(inputs.query_lens), inputs.lora_slots is not None)) or run(inputs, feed)
    outs[graphs] = [o["token_ids"] for o in engine.generate(prompts, params, loras)]
    # base-model steps too, whether or not the adapters above loaded before the first step
    outs[graphs] += [o["token_ids"] for o in engine.generate(prompts[3:4], params)]
    outs[f"runs{graphs}"] = runs
print(json.dumps({"eager": outs[False], "graphs": outs[True], "runs": outs["runsTrue"]}))
"""


def test_buckets():
    assert token_buckets(2048) == [32, 64, 128, 256, 512, 1024, 2048]
    assert token_buckets(40) == [32, 40] and token_buckets(16) == [16]


def test_prefill_graph_steps_equal_eager_steps(checkpoints, adapters):
    env = {**os.environ, "MOEPLEX_TRITON": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    fam = "qwen3_moe"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoints[fam]), str(adapters[fam]["a"]),
                           str(adapters[fam]["b"])], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["graphs"] == res["eager"] and len(res["eager"]) == 6 and all(len(t) == 4 for t in res["eager"])
    runs = res["runs"]
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
