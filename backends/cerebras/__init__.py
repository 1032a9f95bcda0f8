"""The cerebras.pytorch (cstorch) backend, one job per module:

- `environment`: whether cstorch can run here (Python, torch, cstorch versions) and the one place importing it;
- `cluster`: our `cluster` node as cstorch's `ClusterConfig`, and the path the appliance's input workers import from;
- `sparsity`: our `sparsity` node as a `cstorch.sparse.Group` (same parameters and initial masks as masked_dense);
- `lowering`: compile_only / validate_only and the report read from the lowered program (`cirh.mlir`);
- `stages`: the staged run: executors, step closures that only log, the checkpoint closure, evaluation;
- `backend`: `CerebrasBackend`, which joins them.

Checkpoint conversion to and from `cstorch.save` files is in `modelzoo.export.cerebras_checkpoint`.
"""

from modelzoo.backends.cerebras.backend import CerebrasBackend
from modelzoo.backends.cerebras.environment import CSTORCH_VERSION, CerebrasError

__all__ = ["CSTORCH_VERSION", "CerebrasBackend", "CerebrasError"]
