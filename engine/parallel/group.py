"""The ranks of one replica: how they meet, agree at start-up, and how rank 0 drives the others.

Rank 0 runs the LLMEngine (scheduler, adapter manager, sampling); ranks 1..N-1 run only a
ModelRunner (engine.parallel.worker) and follow rank 0's messages in order:

    ("step", StepPlan, writes)   run the step's forward (collectives inside the model); before
                                 it, receive and write the adapter parts of `writes` (slot, heap
                                 start, sizes) into their slots, in the order rank 0 wrote them
    ("stop",)                    leave the loop

An adapter part's bytes follow the step message point to point, rank 0 to each rank (only its
own part), over the same gloo group.

Messages go over a gloo group (host memory, whatever the device); the model's collectives over
the default group (NCCL on CUDA, gloo on CPU). Input ids a step takes from the previous step's
samples exist on rank 0's device only, so rank 0 broadcasts them over the model group.

Start-up: rank 0 hosts a TCPStore at the init address; every rank says it joined there before
the process group forms, and after each phase that can fail on one rank alone (reading its part
of the checkpoint) writes "ok" or its error. Rank 0 waits for all of them, watching the worker
processes it started, so a rank that fails, or dies, fails the replica's start with that rank's
error instead of leaving the others waiting in a collective.
"""
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch import Tensor

from engine.config import EngineConfig
from engine.errors import EngineError, EngineUnavailableError
from engine.parallel.shard import Shard

log = logging.getLogger(__name__)
_POLL_S = 0.05
_IDLE_TIMEOUT = timedelta(days=3650)  # a worker waits for rank 0's next message for as long as it idles
OK = "ok"


def init_address(init_method: str) -> tuple[str, int]:
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise EngineError(f"distributed_init_method must be tcp://host:port, got {init_method!r}")
    return url.hostname, url.port


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_device(config: EngineConfig, rank: int) -> str:
    """The device of `rank`: its own GPU (cuda:r when rank 0 started the ranks as processes on
    one node; the one GPU Ray gives the actor otherwise), or the CPU."""
    if config.torch_device.type != "cuda":
        return config.device
    return f"cuda:{rank}" if config.parallel_workers == "processes" else "cuda:0"


class RankGroup:
    """This process's membership in the replica's ranks (rank 0's, or a worker's)."""

    def __init__(self, config: EngineConfig, rank: int, store, procs: list | None = None):
        self.config, self.rank, self.store = config, rank, store
        self.world = config.world_size
        self.procs = procs or []  # rank 0 with parallel_workers="processes": ranks 1..N-1
        self.timeout = config.distributed_timeout_s
        self.control = None
        self._writes: list[tuple] = []
        self._writes_lock = threading.Lock()
        self._closed = False
        self.running = False  # set once every rank finished start-up: they then follow messages

    # ---- start-up -------------------------------------------------------------------
    @classmethod
    def start(cls, config: EngineConfig) -> "RankGroup":
        """Rank 0: host the store, start ranks 1..N-1 when it is to (as processes), form the group."""
        if config.distributed_init_method is None:
            if config.parallel_workers != "processes":
                raise EngineError("parallel_workers='external' needs distributed_init_method (tcp://host:port)")
            # a copy: the caller's config may start another replica, which needs a port of its own
            config = replace(config, distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        host, port = init_address(config.distributed_init_method)
        store = dist.TCPStore(host, port, config.world_size, is_master=True,
                              timeout=timedelta(seconds=config.distributed_timeout_s), wait_for_workers=False)
        group = cls(config, 0, store)
        try:
            if config.parallel_workers == "processes":
                group.procs = [_spawn_worker(config, rank) for rank in range(1, config.world_size)]
            group._wait_for("joined")
            group._form()
        except BaseException:
            group.close()
            raise
        return group

    @classmethod
    def join(cls, config: EngineConfig, rank: int) -> "RankGroup":
        """Rank 1..N-1: meet rank 0 at config.distributed_init_method and form the group."""
        host, port = init_address(config.distributed_init_method)
        store = dist.TCPStore(host, port, config.world_size, is_master=False,
                              timeout=timedelta(seconds=config.distributed_timeout_s))
        group = cls(config, rank, store)
        store.set(f"joined/{rank}", OK)
        group._form()
        return group

    def _form(self) -> None:
        backend = "nccl" if self.config.torch_device.type == "cuda" else "gloo"
        if dist.is_initialized():
            raise EngineError("this process already belongs to a torch.distributed group: one multi-GPU "
                              "engine per process")
        dist.init_process_group(backend, store=dist.PrefixStore("model", self.store), rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=self.timeout))
        self.control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
        # NCCL sets a communicator up at its first collective, which must not be inside a CUDA
        # graph capture: run one now (gloo: a check that every rank is in the group)
        device = torch.device(rank_device(self.config, self.rank)) if backend == "nccl" else torch.device("cpu")
        dist.all_reduce(torch.zeros(1, device=device))

    def shard(self) -> Shard:
        return Shard(self.rank, self.config.tensor_parallel_size, self.config.expert_parallel_size,
                     dist.group.WORLD)

    def phase(self, name: str, error: BaseException | None = None) -> None:
        """Every rank reports how phase `name` went; raises EngineError on every rank when one
        failed (rank 0's names the rank and its error). A failing rank passes its exception."""
        message = OK if error is None else f"{type(error).__name__}: {error}"
        if self.rank != 0:
            self.store.set(f"{name}/{self.rank}", message)
            verdict = self._get(f"{name}/0")
            if verdict != OK:
                raise EngineError(f"rank {self.rank}: the replica stops at start-up ({name}): {verdict}")
            return
        try:
            if error is not None:
                raise EngineError(f"rank 0 failed at start-up ({name}): {message}")
            self._wait_for(name)
        except BaseException as exc:
            self.store.set(f"{name}/0", str(exc))
            raise
        self.store.set(f"{name}/0", OK)

    def _wait_for(self, name: str) -> None:
        """Rank 0: until every other rank has written `name`/r; raises on an error it wrote, on a
        worker process that ended, or after the time-out."""
        keys = [f"{name}/{r}" for r in range(1, self.world)]
        deadline = time.monotonic() + self.timeout
        while not self.store.check(keys):
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None and not self.store.check([f"{name}/{rank}"]):
                    raise EngineError(f"rank {rank} exited with code {proc.returncode} at start-up ({name}); "
                                      "its log is above")
            if time.monotonic() > deadline:
                missing = [k for k in keys if not self.store.check([k])]
                raise EngineError(f"ranks did not report {name!r} within {self.timeout:.0f} s: {missing}")
            time.sleep(_POLL_S)
        for key in keys:
            verdict = self.store.get(key).decode()
            if verdict != OK:
                raise EngineError(f"rank {key.split('/')[1]} failed at start-up ({name}): {verdict}")

    def _get(self, key: str) -> str:
        deadline = time.monotonic() + self.timeout
        while not self.store.check([key]):
            if time.monotonic() > deadline:
                raise EngineError(f"rank 0 did not report {key!r} within {self.timeout:.0f} s")
            time.sleep(_POLL_S)
        return self.store.get(key).decode()

    def agree_min(self, values: list[int]) -> list[int]:
        """The element-wise minimum over the ranks (e.g. KV blocks and slots each can hold)."""
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return t.tolist()

    # ---- steps ----------------------------------------------------------------------
    def queue_write(self, slot: int, start: int, parts: list) -> None:
        """Rank 0 (any thread): ranks 1..N-1 write their parts (packed LoRAAdapters, parts[r - 1]
        rank r's) into `slot` at heap element `start` before the next step: every rank holds the
        same shapes, so a part's image has rank 0's size."""
        if len(parts) != self.world - 1:
            raise EngineError(f"an adapter for {self.world} ranks needs {self.world - 1} parts besides rank 0's, "
                              f"got {len(parts)}")
        with self._writes_lock:
            self._writes.append((slot, start, parts))

    def send_step(self, plan) -> None:
        """Rank 0: the step's plan and the slot writes queued since the last one. Raises
        EngineUnavailableError instead of waiting in a collective when a rank's process has ended."""
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                raise EngineUnavailableError(f"rank {rank} of this replica exited with code {proc.returncode}: "
                                  "the replica cannot run steps; restart it")
        with self._writes_lock:
            writes, self._writes = self._writes, []
        headers = [(slot, start, _sizes(parts[0])) for slot, start, parts in writes]
        self._send(("step", plan, headers))
        for _, _, parts in writes:
            for rank, part in enumerate(parts, start=1):
                for t in _part_tensors(part):
                    dist.send(t, dst=rank, group=self.control)

    def receive_part(self, sizes: tuple[int, int, int], dtype: torch.dtype, pin: bool) -> tuple:
        """Ranks 1..N-1: (image, ranks, offsets) of one adapter part rank 0 sends after a step message."""
        numel, num_ranks, num_offsets = sizes
        image = torch.empty(numel, dtype=dtype, pin_memory=pin)
        ranks = torch.empty(num_ranks, dtype=torch.int32)
        offsets = torch.empty(num_offsets, dtype=torch.int64)
        for t in _as_bytes(image, ranks, offsets):
            dist.recv(t, src=0, group=self.control)
        return image, ranks, offsets

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> tuple:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """Rank 0's tensor into every rank's (same shape), over the model group."""
        dist.broadcast(tensor, src=0)
        return tensor

    # ---- end ------------------------------------------------------------------------
    def close(self) -> None:
        """Rank 0: tell the ranks to stop and wait for the processes it started; every rank:
        leave the process group."""
        if self._closed:
            return
        self._closed = True
        # ranks still starting up end on their own verdict; with one gone, the stop cannot be broadcast
        if self.rank == 0 and self.running and all(proc.poll() is None for proc in self.procs):
            try:
                self._send(("stop",))
            except Exception:  # a rank already gone: the processes are ended below
                log.exception("telling the other ranks to stop failed")
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def _sizes(part) -> tuple[int, int, int]:
    return part.packed.numel(), part.packed_ranks.numel(), part.packed_offsets.numel()


def _as_bytes(*tensors: Tensor) -> list[Tensor]:
    """Non-empty tensors as byte views: gloo moves bytes whatever the dtype (bf16 included)."""
    return [t.reshape(-1).view(torch.uint8) for t in tensors if t.numel()]


def _part_tensors(part) -> list[Tensor]:
    return _as_bytes(part.packed, part.packed_ranks, part.packed_offsets)


def _spawn_worker(config: EngineConfig, rank: int) -> subprocess.Popen:
    """`python -m engine.parallel.worker` for `rank`, given (config, rank, this pid) on stdin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.Popen([sys.executable, "-m", "engine.parallel.worker"], stdin=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(pickle.dumps((config, rank, os.getpid())))
        proc.stdin.close()
    except BrokenPipeError:  # it exited already: RankGroup._wait_for reports its exit code
        pass
    return proc
