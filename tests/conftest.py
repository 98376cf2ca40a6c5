"""Shared pytest configuration and session fixtures.

- The `gpu` marker skips a test when CUDA is absent.
- `tiny_checkpoint(family)` and `tiny_adapter(family, fmt, **options)` build real HF
  checkpoints and PEFT adapters once per test session and hand out their paths; every
  package's tests (the engine's `checkpoints` / `adapters` too) share these builds.
"""
import pytest
import torch

CHECKPOINT_SEED = 1  # one seed for every suite, so each family is built once a session


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: family -> path of a tiny random checkpoint (built once per session)."""
    from engine.testing import make_tiny_checkpoint

    built = {}

    def get(family: str = "qwen3_moe"):
        if family not in built:
            built[family] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{family}"), family,
                                                 seed=CHECKPOINT_SEED)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_checkpoint):
    """Factory: (family, fmt, **options) -> path of a PEFT adapter (built once per session)."""
    from engine.testing import make_peft_adapter

    built = {}

    def get(family: str = "qwen3_moe", fmt: str = "per_expert", **options):
        key = (family, fmt, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"adapter-{family}-{fmt}")
            built[key] = make_peft_adapter(tiny_checkpoint(family), out, fmt=fmt, **options)
        return built[key]

    return get
