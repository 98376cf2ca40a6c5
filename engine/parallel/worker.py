"""Ranks 1..N-1 of a multi-GPU replica: a ModelRunner that follows rank 0's steps.

`python -m engine.parallel.worker` reads (EngineConfig, rank, parent pid) pickled on stdin: how
rank 0 starts the ranks as local processes (parallel_workers="processes"); it ends when rank 0
says so or when the parent process is gone. `run_worker(config, rank)` is the same loop for a
caller that starts ranks itself (the Ray replica's actors, parallel_workers="external").
"""
import logging
import os
import pickle
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import replace

import torch

from engine.config import EngineConfig
from engine.parallel.group import RankGroup, rank_device

log = logging.getLogger("engine.parallel.worker")
PARENT_CHECK_S = 0.5


def run_worker(config: EngineConfig, rank: int) -> None:
    """Join the replica as `rank`, build this rank's part of the model, follow rank 0 until it stops."""
    from engine.model_runner import ModelRunner
    from engine.models.spec import load_spec, spec_from_hf_config

    config = replace(config, device=rank_device(config, rank))
    if config.torch_device.type == "cuda":
        torch.cuda.set_device(config.torch_device)
    group = RankGroup.join(config, rank)
    try:
        spec = spec_from_hf_config(config.hf_config) if config.hf_config is not None else load_spec(config.model)
        runner = ModelRunner(config, spec, group=group)
        Follower(runner, group).run()
    finally:
        group.close()


class Follower:
    """The loop of a rank that is not rank 0."""

    def __init__(self, runner, group: RankGroup):
        self.runner, self.group = runner, group
        self.host: OrderedDict[str, object] = OrderedDict()  # packed adapters by name, LRU

    def run(self) -> None:
        while True:
            kind, *args = self.group.receive()
            if kind == "stop":
                return
            plan, writes = args
            for slot, start, name, path in writes:
                self.write(slot, start, name, path)
            self.runner.follow(plan)

    def write(self, slot: int, start: int, name: str, path: str) -> None:
        """Load (or reuse) this rank's part of the adapter and copy it into `slot` (heap element
        `start`) before the next step reads it. Rank 0 validated the same files moments ago."""
        from engine.lora.adapter import load_adapter

        runner = self.runner
        adapter = self.host.get(name)
        if adapter is None:
            adapter = load_adapter(name, path, runner.spec, runner.slot_pools.dtype, runner.config.max_lora_rank)
            runner.slot_pools.pack(adapter)
            self.host[name] = adapter
            while len(self.host) > max(runner.max_cpu_loras, 1):
                self.host.popitem(last=False)
        self.host.move_to_end(name)
        event = runner.slot_pools.write(slot, start, adapter)
        if event is not None:
            torch.cuda.current_stream(runner.device).wait_event(event)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_CHECK_S)
        try:
            os.kill(parent, 0)
        except OSError:
            os._exit(1)  # rank 0's process is gone: nothing will drive this rank any more
        if os.getppid() != parent:
            os._exit(1)


def main() -> int:
    config, rank, parent = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        run_worker(config, rank)
    except Exception:
        log.exception("rank %d failed", rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
