"""How the app's deployments ask Ray for replicas: GPUs, CPUs, counts and Serve options, derived
from the operator's `AppArgs` (a mixin of it: the methods read its fields).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# LLMServer.check_health is a poll of the engine core's process: cheap. Serve replaces a replica
# after 3 failed checks, so at its default period (10 s) a dead core failed requests for ~30 s.
HEALTH_CHECK_PERIOD_S = 2.0
# Serve runs a replica's methods on a loop of their own in a second thread unless told not to;
# every stream message then crosses between the two threads.
_ON_SERVE_LOOP = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}


def machine_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's share, as Ray counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_memory_bytes() -> int:
    """This machine's memory, or its container's limit where lower (cgroup v2's memory.max)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def joins_cluster() -> bool:
    """Whether `serve run` here will join a running Ray cluster (RAY_ADDRESS, or a `ray start` of
    this machine) rather than start an instance of this machine alone."""
    return bool(os.environ.get("RAY_ADDRESS")) or Path("/tmp/ray/ray_current_cluster").exists()


class ReplicaPlacement:
    def gpus_per_replica(self, cluster_gpus: float) -> float:
        """GPUs a replica asks Ray for; device=auto asks for one when the cluster has any."""
        if self.replica_num_gpus is not None:
            return self.replica_num_gpus
        if self.device == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return 1.0 if self.device == "cuda" else 0.0

    def adapters_per_replica(self, num_lora_slots: int) -> int:
        """Adapters a replica keeps fetched (Serve's multiplexing LRU), given the GPU slots its
        engine has: 2 x the slots unless max_adapters_per_replica says."""
        return self.max_adapters_per_replica or 2 * max(1, num_lora_slots)

    def scales_to_zero(self) -> bool:
        """Whether autoscaling may stop every engine replica (min_replicas 0; Serve's default is 1)."""
        return (self.autoscaling_config or {}).get("min_replicas", 1) == 0

    def max_engine_replicas(self) -> int:
        """Engine replicas the app may run at most (num_replicas, or autoscaling's max_replicas)."""
        if self.autoscaling_config:
            return int(self.autoscaling_config.get("max_replicas") or self.autoscaling_config.get("min_replicas") or 1)
        return self.num_replicas or 1

    def cpus_at_start(self, on_gpu: bool = False) -> float:
        """CPUs Ray reserves for the app's replicas as it starts (min_replicas engines when
        autoscaled): a Ray instance with fewer leaves replicas waiting for CPUs, without end."""
        scaling = self.autoscaling_config or {}
        engines = scaling.get("initial_replicas", scaling.get("min_replicas", 1)) if scaling else (self.num_replicas or 1)
        return int(engines) * self.replica_num_cpus + self.num_ingress_replicas(on_gpu) * self.ingress_num_cpus

    def cpu_shortfall(self, on_gpu: bool = False) -> str | None:
        """What is wrong where the replicas reserve more CPUs as they start than this machine has
        (a Ray instance of this machine alone leaves some waiting forever); None where they fit."""
        cpus, have = self.cpus_at_start(on_gpu), machine_cpus()
        if cpus <= have:
            return None
        return (f"the replicas reserve {cpus:g} CPUs as they start and this machine has {have}: on a Ray "
                "instance of this machine alone some would wait forever; lower ingress_replicas, "
                "ingress_num_cpus or replica_num_cpus (or join a cluster with more)")

    def num_ingress_replicas(self, on_gpu: bool = False) -> int:
        """ingress_replicas, or its default for engine replicas on a GPU (on_gpu) or on CPU.

        A GPU engine streams ~10x the tokens of a CPU one: at 64 streams on an H200, 4 ingress
        replicas served 1.03x of the engine alone's tok/s and 2 served 0.95x (HAProxy mode;
        benchmarks/RESULTS.md); 2 and a CPU engine fit a 2-core machine."""
        if self.ingress_replicas is not None:
            return self.ingress_replicas
        # an autoscaled app starts with min_replicas engines: its ingress replicas (ingress_num_cpus each)
        # stay fixed, so they are sized for that, not for a peak that may never come
        engines = (self.autoscaling_config or {}).get("min_replicas") or self.num_replicas or 1
        return (4 if on_gpu else 2) * int(engines)

    def ranks_per_replica(self) -> int:
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    def rank_bundles(self, gpus: float) -> dict:
        """Serve options of a replica over several GPUs: a placement group of one bundle per rank
        on one node (STRICT_PACK: the ranks talk over NVLink / shared memory, and rank 0 hosts
        their rendezvous). Bundle 0 holds the replica (rank 0, its engine core), bundles 1..N-1
        one rank actor each (deployments.ranks); replica_num_cpus is split over the bundles, so
        a replica reserves the CPUs it does on one GPU. Ray schedules and autoscales the group as
        one replica. Empty for one rank."""
        n = self.ranks_per_replica()
        if n == 1:
            return {}
        bundle: dict[str, float] = {"CPU": self.replica_num_cpus / n} if self.replica_num_cpus else {}
        if gpus:
            bundle["GPU"] = gpus
        bundle = bundle or {"CPU": 0.001}  # a bundle must ask for something
        rank0 = {**bundle, **(self.replica_resources or {})}
        return {"placement_group_bundles": [rank0] + [dict(bundle) for _ in range(n - 1)],
                "placement_group_strategy": "STRICT_PACK"}

    def ingress_options(self) -> dict:
        """Keyword arguments for `Ingress.options(...)`."""
        replicas = self.num_ingress_replicas()
        # The ingress only awaits I/O: let it hold many requests (Serve's default is 5).
        actor: dict[str, Any] = {"num_cpus": self.ingress_num_cpus}
        if self.ingress_on_serve_loop:
            actor["runtime_env"] = _ON_SERVE_LOOP
        return {"num_replicas": replicas, "max_ongoing_requests": self.ingress_max_ongoing_requests,
                "ray_actor_options": actor}

    def replica_options(self, cluster_gpus: float) -> dict:
        """Keyword arguments for `LLMServer.options(...)`: scaling and resources.

        `cluster_gpus`: the GPUs Ray knows of (`deployments.app.cluster_gpus()`).
        """
        gpus = self.gpus_per_replica(cluster_gpus)
        bundles = self.rank_bundles(gpus)
        # over several GPUs the replica's actor takes its share of bundle 0
        cpus = bundles["placement_group_bundles"][0].get("CPU", 0) if bundles else self.replica_num_cpus
        actor = {"num_cpus": cpus, "num_gpus": gpus}
        if self.replica_resources:
            actor["resources"] = dict(self.replica_resources)
        if self.replica_on_serve_loop:
            actor["runtime_env"] = _ON_SERVE_LOOP
        # the ingress logs each request; a second access line per request here is noise
        options: dict[str, Any] = {"ray_actor_options": actor,
                                   "health_check_period_s": HEALTH_CHECK_PERIOD_S,
                                   "max_ongoing_requests": self.max_ongoing_requests,
                                   "logging_config": {"enable_access_log": False}}
        options.update(bundles)
        if self.prefix_affinity_routing:  # deployments/prefix_router.py
            options["request_router_config"] = {
                "request_router_class": "deployments.prefix_router:PrefixAffinityRouter",
                "request_router_kwargs": {"max_imbalance": self.prefix_affinity_max_imbalance,
                                          "per_tenant": self.prefix_cache_scope == "tenant"}}
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options
