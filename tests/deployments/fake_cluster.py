"""A local autoscaling Ray cluster (fake multi-node provider) for the autoscaling test.

`ray.cluster_utils.AutoscalingCluster` cannot be used with ray 2.60 (its base config is
missing from the wheel and its start runs `ray stop --force`, which would kill every Ray
process on the machine). This starts a head with `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...` on a free port and its own temp dir; worker "nodes" are raylets
the autoscaler starts on this machine. Teardown kills only the processes whose command
line carries this cluster's temp dir, and their children; never `ray stop`.
"""
from __future__ import annotations

import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

WORKER_TYPE = "ray.worker.gpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def autoscaler_config(gcs_address: str, worker_resources: dict, max_workers: int,
                      idle_timeout_minutes: float) -> dict:
    """A complete fake_multinode config (the wheel has no defaults file to fill it from)."""
    empty_lists = ("cluster_synced_files", "rsync_exclude", "rsync_filter",
                   "initialization_commands", "setup_commands", "head_setup_commands",
                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": "moeplex-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": dict(worker_resources), "node_config": {},
                          "min_workers": 0, "max_workers": max_workers},
        },
        **{key: [] for key in empty_lists},
    }


class FakeAutoscalingCluster:
    def __init__(self, workdir: Path, worker_resources: dict, max_workers: int = 2,
                 idle_timeout_minutes: float = 0.2, head_cpus: int = 2):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short: Ray's unix socket paths under it must stay below ~107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="mxray-", dir="/tmp"))
        self.config_path = self.workdir / "autoscaler.yaml"
        self.config_path.write_text(yaml.safe_dump(autoscaler_config(
            self.address, worker_resources, max_workers, idle_timeout_minutes)))
        self.head_cpus = head_cpus
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}

    def start(self) -> None:
        ray_cli = Path(sys.executable).with_name("ray")
        done = subprocess.run(
            [str(ray_cli), "start", "--head", f"--port={self.port}",
             f"--autoscaling-config={self.config_path}", f"--num-cpus={self.head_cpus}",
             f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
             "--disable-usage-stats", f"--ray-client-server-port={free_port()}"],
            env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"ray start failed ({done.returncode}):\n{done.stdout[-3000:]}"
                               f"\n{done.stderr[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its temp dir, and their descendants."""
        marker = str(self.temp_dir)
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or ()):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found = {p.pid: p for p in roots}
        for root in roots:
            try:
                found.update({c.pid: c for c in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def shutdown(self, grace_s: float = 10.0) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for(predicate, timeout_s: float, period_s: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
