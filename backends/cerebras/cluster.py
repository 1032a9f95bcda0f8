"""Our `cluster` node as cstorch's `ClusterConfig`, with the path the appliance's input workers import from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import modelzoo
from modelzoo.backends.cerebras.environment import import_cstorch
from modelzoo.cluster import ClusterConfig


def worker_python_path() -> Path:
    """The directory holding the `modelzoo` package, which the input workers need on their `sys.path`.

    The workers import what the input function was pickled against by module name (`modelzoo.data.csx_input`),
    from `python_paths` and the worker image (which leaves out editable installs). `modelzoo/` is a plain
    directory there, so this path is enough; `modelzoo.backends` is not (it exists only through the install's
    package-dir mapping of `backends/`), which is why the input functions live in `modelzoo.data`.
    """
    return Path(modelzoo.__file__).resolve().parent.parent


def cluster_config(cluster: ClusterConfig) -> Any:
    """`cluster` as `cstorch.distributed.ClusterConfig`; `worker_python_path()` is added to its `python_paths`."""
    cstorch = import_cstorch()
    return cstorch.distributed.ClusterConfig(
        mgmt_address=cluster.mgmt_address,
        mgmt_namespace=cluster.mgmt_namespace,
        credentials_path=cluster.credentials_path,
        num_csx=cluster.num_csx,
        max_wgt_servers=cluster.max_wgt_servers,
        max_act_per_csx=cluster.max_act_per_csx,
        num_workers_per_csx=cluster.num_workers_per_csx,
        job_labels=list(cluster.job_labels),
        job_priority=cluster.job_priority,
        job_time_sec=cluster.job_time_sec,
        mount_dirs=list(cluster.mount_dirs),
        python_paths=[*cluster.python_paths, str(worker_python_path())],
        disable_version_check=cluster.disable_version_check,
    )
