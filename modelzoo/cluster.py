"""Where a `backend=cerebras` run executes (the Hydra `cluster` group): this machine, or a CS-2 cluster.

`target` picks cstorch's backend: `auto` is `CPU` (or `GPU` with `task.device=cuda`) for `cluster=local`;
`CSX` submits to a Cerebras Wafer-Scale Cluster through its appliance, whose fields mirror
`cerebras.pytorch.distributed.ClusterConfig` one to one (`modelzoo.backends.cerebras.cluster.cluster_config` maps them).
Everything is checked here, before any compute, without cerebras.pytorch or a network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from modelzoo.errors import ConfigError

TARGETS = ("auto", "CPU", "GPU", "CSX")
JOB_PRIORITIES = ("p1", "p2", "p3")
# cstorch's rules: `<host>:<port>`, and labels `key=value` of DNS-label-like tokens.
MODES = ("train", "compile_only", "validate_only")  # the last two lower for a CS-2 and stop
PROGRAMS = ("training", "evaluation")  # what compile_only / validate_only lower, in this order
MGMT_ADDRESS = re.compile(r".+:[0-9]+")
LABEL_TOKEN = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]")


@dataclass
class ClusterConfig:
    """A Cerebras run's target and, for `CSX`, the appliance job (see `cstorch.distributed.ClusterConfig`).

    `mgmt_address` (`host:port`) and `credentials_path` (the cluster's TLS certificate) are needed to reach
    the appliance; `mode` `compile_only` / `validate_only` lowers the training step locally without them and
    stops at the remote compile (`train`, the default, trains). `mount_dirs` and `python_paths` are local
    directories the appliance's workers mount (this checkout is added to `python_paths` automatically);
    `job_labels` are `key=value` strings. `programs` are the steps a lowering mode lowers (each of them in a
    process of its own under compile_only, where cstorch 2.10 allows one remote compile per process).
    """

    name: str = "local"
    target: str = "auto"
    mode: str = "train"
    programs: list[str] = field(default_factory=lambda: list(PROGRAMS))
    mgmt_address: str | None = None
    mgmt_namespace: str | None = None
    credentials_path: str | None = None
    num_csx: int = 1
    num_workers_per_csx: int = 1
    max_wgt_servers: int = 0
    max_act_per_csx: int = 0
    mount_dirs: list[str] = field(default_factory=list)
    python_paths: list[str] = field(default_factory=list)
    job_labels: list[str] = field(default_factory=list)
    job_priority: str = "p2"
    job_time_sec: int | None = None
    disable_version_check: bool = False

    def resolved_target(self, device: str) -> str:
        """The cstorch backend type: `target`, or for `auto` CPU / GPU after the resolved `device`."""
        if self.target != "auto":
            return self.target
        return "GPU" if device == "cuda" else "CPU"

    def validate(self, device: str) -> None:
        """Check every field that applies to the resolved target; errors name `cluster.<key>`."""
        if self.target not in TARGETS:
            raise ConfigError("cluster.target", f"unknown {self.target!r}", TARGETS)
        if self.mode not in MODES:
            raise ConfigError("cluster.mode", f"unknown {self.mode!r}", MODES)
        unknown = [p for p in self.programs if p not in PROGRAMS]
        if unknown or not self.programs:
            raise ConfigError("cluster.programs", f"unknown {unknown[0]!r}" if unknown else "is empty", PROGRAMS)
        target = self.resolved_target(device)
        if target == "GPU" and device != "cuda":
            raise ConfigError("cluster.target", "GPU needs task.device=cuda (or auto on a CUDA machine)")
        if target != "CSX":
            return
        if self.mgmt_address is not None and not MGMT_ADDRESS.fullmatch(self.mgmt_address):
            raise ConfigError("cluster.mgmt_address", f"{self.mgmt_address!r} is not of the form <host>:<port>")
        if self.credentials_path is not None and not Path(self.credentials_path).is_file():
            raise ConfigError(
                "cluster.credentials_path", f"{self.credentials_path} is not a file (the TLS certificate)"
            )
        for key in ("num_csx", "num_workers_per_csx"):
            if getattr(self, key) < 1:
                raise ConfigError(f"cluster.{key}", f"must be at least 1, got {getattr(self, key)}")
        for key in ("max_wgt_servers", "max_act_per_csx"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"cluster.{key}", f"must be >= 0 (0: the cluster's default), got {getattr(self, key)}"
                )
        if self.job_time_sec is not None and self.job_time_sec < 1:
            raise ConfigError("cluster.job_time_sec", f"must be positive or null, got {self.job_time_sec}")
        if self.job_priority not in JOB_PRIORITIES:
            raise ConfigError("cluster.job_priority", f"unknown {self.job_priority!r}", JOB_PRIORITIES)
        for i, label in enumerate(self.job_labels):
            parts = label.split("=")
            if len(parts) != 2 or not all(LABEL_TOKEN.fullmatch(p) for p in parts):
                raise ConfigError(f"cluster.job_labels[{i}]", f"{label!r} is not key=value (letters, digits, -_.)")
        for key in ("mount_dirs", "python_paths"):
            for i, path in enumerate(getattr(self, key)):
                if not Path(path).is_dir():
                    raise ConfigError(f"cluster.{key}[{i}]", f"{path} is not a directory on this machine")

    def missing_for_submission(self) -> list[str]:
        """What a real CS-2 submission still lacks, as `key=<what>` hints (empty when it can go)."""
        missing = []
        if self.mgmt_address is None:
            missing.append("cluster.mgmt_address=<host>:<port> (the appliance's management node)")
        if self.credentials_path is None:
            missing.append("cluster.credentials_path=<file> (the cluster's TLS certificate)")
        return missing
