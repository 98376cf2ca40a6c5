"""Ranks 1..N-1 of an engine replica over N GPUs, as Ray actors in the replica's placement group.

Serve gives the replica a placement group of N bundles (`ReplicaPlacement.rank_bundles`); the
replica itself is rank 0 (its engine core hosts the ranks' rendezvous) and starts one actor per
other bundle, each on that bundle's GPU. The actors run `engine.parallel.worker.run_worker`, a
ModelRunner that follows rank 0's steps, until rank 0 stops them or the replica is gone (Ray
ends the actors a replica owns with it).

A rank actor that ends (its start-up failed, or it died) ends the replica: during start-up the
replica writes that rank's failure where rank 0 waits for it, so the engine's start fails with
it at once; later, `failure` fails the replica's health check and Serve replaces the replica.
"""
from __future__ import annotations

import logging
import threading
from datetime import timedelta

import ray

logger = logging.getLogger("ray.serve")


@ray.remote
class EngineRank:
    """One rank of a replica over several GPUs (Ray sets CUDA_VISIBLE_DEVICES to its GPU)."""

    def run(self, config, rank: int) -> None:
        from engine.parallel.worker import run_worker

        run_worker(config, rank)


class RankActors:
    """The replica's rank actors: started before its engine, watched while it lives."""

    def __init__(self, config):
        """Point `config` at this node's rendezvous and start ranks 1..N-1 in this replica's
        placement group (config.parallel_workers becomes "external")."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engine.parallel.group import free_port

        group = ray.util.get_current_placement_group()
        if group is None:
            raise RuntimeError(f"an engine replica over {config.world_size} ranks needs its placement group "
                               "(Serve's placement_group_bundles: AppArgs sets them from tensor_parallel_size)")
        host = ray.util.get_node_ip_address()
        config.parallel_workers = "external"
        config.distributed_init_method = f"tcp://{host}:{free_port('0.0.0.0')}"
        on_gpu = config.torch_device.type == "cuda"
        self.config, self.failure, self.closing = config, None, False
        self.actors = [EngineRank.options(
            num_cpus=0, num_gpus=1 if on_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank))
            .remote() for rank in range(1, config.world_size)]
        self.runs = [actor.run.remote(config, rank) for rank, actor in enumerate(self.actors, start=1)]
        threading.Thread(target=self._watch, name="rank-watch", daemon=True).start()

    def _watch(self) -> None:
        done, _ = ray.wait(self.runs, num_returns=1, timeout=None)
        if self.closing:
            return
        rank = self.runs.index(done[0]) + 1
        try:
            ray.get(done[0])
            message = f"rank {rank} ended"
        except Exception as exc:  # noqa: BLE001 - what ended it, for the replica's log and health check
            message = f"rank {rank} failed: {exc}"
        self.failure = message
        logger.error("engine replica: %s", message)
        self._tell_rank0(rank, message)

    def _tell_rank0(self, rank: int, message: str) -> None:
        """Rank 0 may still wait at start-up for this rank's word: give it the failure instead."""
        import torch.distributed as dist

        from engine.parallel.group import init_address

        try:
            host, port = init_address(self.config.distributed_init_method)
            store = dist.TCPStore(host, port, self.config.world_size, is_master=False, timeout=timedelta(seconds=10))
            for phase in ("joined", "weights"):
                if not store.check([f"{phase}/{rank}"]):
                    store.set(f"{phase}/{rank}", message)
        except Exception:  # noqa: BLE001 - rank 0 is gone too, or past start-up: the health check fails
            logger.exception("could not tell rank 0 that rank %d ended", rank)

    def close(self) -> None:
        self.closing = True
        for actor in self.actors:
            ray.kill(actor)
