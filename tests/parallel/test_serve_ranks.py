"""A Serve engine replica over two ranks on the local Ray cluster (CPU, gloo): one placement
group of two bundles, rank 1 an actor in the second; through HTTP with the `openai` client it
answers as the single-process engine does, base model and adapter alike."""
import os

import pytest

from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from engine.testing import make_peft_adapter, make_tiny_checkpoint
from tests.deployments.fake_cluster import free_port
from tests.deployments.serve_helpers import ADAPTER_FILES

APP = "moeplex-ranks"
BASE = "tiny-ranks"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ranks")
    ckpt = make_tiny_checkpoint(root / "ckpt", "qwen3_moe", seed=5, num_key_value_heads=4, num_experts=8)
    return ckpt, make_peft_adapter(ckpt, root / "style", rank=8, fmt="fused", alpha=16, seed=21)


@pytest.fixture(scope="module")
def service(tmp_path_factory, model):
    import ray
    from ray import serve

    from deployments.app import build_app, set_ray_env_defaults
    from deployments.args import AppArgs

    workdir = tmp_path_factory.mktemp("r")  # short: Ray's socket paths must fit 107 bytes
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    set_ray_env_defaults()
    ray.init(num_cpus=6, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
             _temp_dir=str(workdir / "ray"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(model=str(model[0]), served_model_name=BASE, cache_dir=str(workdir / "cache"), device="cpu",
                   tensor_parallel_size=2, expert_parallel_size=2, max_model_len=128, ingress_replicas=1,
                   engine_warmup=False)
    serve.run(build_app(args), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _direct(ckpt, adapter) -> list[str]:
    engine = LLMEngine(EngineConfig(model=str(ckpt), device="cpu", max_loras=4, max_model_len=128))
    params = SamplingParams(max_tokens=8, temperature=0)
    try:
        return [r["text"] for r in engine.generate([PROMPT, PROMPT], params,
                                                   loras=[None, LoRARequest("style", str(adapter))])]
    finally:
        engine.shutdown()


def test_replica_over_two_ranks_answers_as_the_single_process_engine(service, model):
    import httpx
    from openai import OpenAI

    import ray

    ckpt, adapter = model
    files = [("files", (f, (adapter / f).read_bytes())) for f in ADAPTER_FILES]
    headers = {"X-Tenant-Id": "acme"}
    response = httpx.post(f"{service}/v1/adapters", headers=headers, data={"name": "style"}, files=files, timeout=60)
    assert response.status_code == 201, response.text
    client = OpenAI(base_url=f"{service}/v1", api_key="unused", default_headers=headers)
    served = [client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
              for name in (BASE, "style")]
    assert served == _direct(ckpt, adapter)
    # one replica: one placement group of a bundle per rank, on one node
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert [(len(g["bundles"]), g["strategy"]) for g in groups] == [(2, "STRICT_PACK")]
