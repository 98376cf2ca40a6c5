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
from dataclasses import replace

import torch

from engine.config import EngineConfig
from engine.parallel.group import RankGroup, rank_device

log = logging.getLogger("engine.parallel.worker")
PARENT_CHECK_S = 0.5


def run_worker(config: EngineConfig, rank: int) -> None:
    """Join the replica as `rank`, build this rank's part of the model, follow rank 0 until it stops."""
    from engine.model_runner import ModelRunner
    from engine.models.spec import spec_of

    config = replace(config, device=rank_device(config, rank))
    if config.torch_device.type == "cuda":
        torch.cuda.set_device(config.torch_device)
    group = RankGroup.join(config, rank)
    try:
        runner = ModelRunner(config, spec_of(config), group=group)
        Follower(runner, group).run()
    finally:
        group.close()


class Follower:
    """The loop of a rank that is not rank 0."""

    def __init__(self, runner, group: RankGroup):
        self.runner, self.group = runner, group

    def run(self) -> None:
        while True:
            kind, *args = self.group.receive()
            if kind == "stop":
                return
            plan, writes = args
            for slot, start, sizes in writes:
                self.write(slot, start, sizes)
            self.runner.follow(plan)

    def write(self, slot: int, start: int, sizes: tuple[int, int, int]) -> None:
        """Receive this rank's part of an adapter from rank 0 and copy it into `slot` (heap
        element `start`); the step after it waits for the copy."""
        runner = self.runner
        pools = runner.slot_pools
        image, ranks, offsets = self.group.receive_part(sizes, pools.dtype, runner.device.type == "cuda")
        event = pools.write_received(slot, start, image, ranks, offsets)
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
