"""The cerebras.pytorch (cstorch) backend, one job per module.

- `environment`: whether cstorch can run here (Python, torch, cstorch versions) and the one place importing it;
- `cluster`: our `cluster` node as cstorch's `ClusterConfig`, and the path the appliance's input workers import from;
- `sparsity`: our `sparsity` node as a `cstorch.sparse.Group` (same parameters and initial masks as masked_dense);
- `lowering`: compile_only / validate_only and the report read from the lowered program (`cirh.mlir`);
- `stages`: the staged run: executors, step closures that only log, the checkpoint closure, evaluation;
- `checks`: what a CS-2 run needs of the config, checked before any compute;
- `backend`: `CerebrasBackend`, which joins them;
- `checkpoint`: conversion to and from `cstorch.save` files and Model Zoo checkpoints (`import-cerebras`,
  `export-cerebras`, and each staged run's checkpoints);
- `params`: Model Zoo `params.yaml` files as our config options and back.
"""

from modelzoo.backends.cerebras.backend import CerebrasBackend
from modelzoo.backends.cerebras.environment import CSTORCH_VERSION, CerebrasError

__all__ = ["CSTORCH_VERSION", "CerebrasBackend", "CerebrasError"]
