"""torch.sparse kernels for forward-only use: CSR/BSR on CPU and 2:4 semi-structured on CUDA, chosen per layer.

`TorchSparseConverter.convert(model, tokens)` (an inference converter, `modelzoo.backends.converters`)
replaces every masked `nn.Linear` (one carrying the sparsity plug-in's `weight_mask` buffer) by a
`SparseLinear` running the kernel that measured fastest for that layer's shape and density at `tokens` tokens
per call:

- `dense`: `F.linear` on the masked weight, where no sparse kernel pays (large token counts, low sparsity);
- `csr` (CPU): CSR with int32 indices, computed as `(W_csr @ x.T).T`, several times faster on CPU than
  `F.linear(x, W_csr)` and than int64 indices, and for a single token as `torch.addmv(b, W_csr, x)`;
- `bsr` (CPU): block CSR, a candidate only where the mask is constant on square blocks (a random mask
  occupies every block);
- `semi_structured` (CUDA): `torch.sparse.to_sparse_semi_structured` for weights whose mask keeps at most 2
  of every 4 consecutive inputs (N:M 2:4).

Sparse patterns are built from the mask, never from the weight's zeros, so a kept weight that happens to be
exactly 0.0 stays in the pattern. Timings are cached per (device, dtype, shape, density, tokens, pattern) for
the life of the process, so a 24-layer model times each of its four shapes once, over its 24 layers. Training
is not offered (CSR training kernels are slower than dense below ~90% sparsity on CPU); use `masked_dense`.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelzoo.errors import ConfigError
from modelzoo.sparsity.masks import MASK_SUFFIX

log = logging.getLogger(__name__)
KERNELS = ("dense", "csr", "bsr", "semi_structured")
DEVICE_KERNELS = {"cpu": ("dense", "csr", "bsr"), "cuda": ("dense", "semi_structured")}
BLOCK_SIZES = (32, 16, 8, 4)  # tried largest first for BSR
TIMING_ROUNDS = 5
MIN_SAMPLE_S = 2e-3  # each timing sample repeats a call until it lasts about this long
STREAM_BYTES = 256 << 20  # weights cycled through per timed call: more than a CPU's last-level cache

# (device type, dtype, out, in, density, tokens, BSR block, *candidates) -> ms per call of each candidate
_MEASURED: dict[tuple, dict[str, float]] = {}


def _compressed(
    constructor: Callable[..., torch.Tensor], kept: torch.Tensor, values: torch.Tensor, size: torch.Size
) -> torch.Tensor:
    """A CSR or BSR tensor with int32 indices of the True entries of `kept` (rows, cols), row by row."""
    crow = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=kept.device)
    crow[1:] = kept.sum(dim=1).cumsum(0)
    col = kept.nonzero()[:, 1]  # row-major, like the boolean indexing that gathered `values`
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse (CSR|BSR) tensor support is in beta", UserWarning)
        return constructor(crow.int(), col.int(), values, size, device=values.device, check_invariants=False)


def csr_from_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CSR (int32 indices) holding exactly the positions where `mask` is True, kept zeros included."""
    return _compressed(torch.sparse_csr_tensor, mask, weight.detach()[mask], mask.shape)


def block_size(mask: torch.Tensor) -> int | None:
    """The largest of `BLOCK_SIZES` whose square blocks of `mask` are each all True or all False, else None."""
    rows, cols = mask.shape
    for b in BLOCK_SIZES:
        if rows % b or cols % b:
            continue
        blocks = mask.view(rows // b, b, cols // b, b)
        if torch.equal(blocks.all(dim=(1, 3)), blocks.any(dim=(1, 3))):
            return b
    return None


def bsr_from_mask(weight: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """BSR (int32 indices, `b` x `b` blocks) holding exactly the blocks where the block-shaped `mask` is True."""
    rows, cols = mask.shape
    kept = mask.view(rows // b, b, cols // b, b).any(dim=(1, 3))  # (rows/b, cols/b)
    blocks = weight.detach().reshape(rows // b, b, cols // b, b).transpose(1, 2)  # (rows/b, cols/b, b, b)
    return _compressed(torch.sparse_bsr_tensor, kept, blocks[kept], mask.shape)


def is_2_4(mask: torch.Tensor) -> bool:
    """Whether `mask` keeps at most 2 of every 4 consecutive entries along the input dimension."""
    return mask.shape[1] % 4 == 0 and bool(mask.view(mask.shape[0], -1, 4).sum(dim=-1).le(2).all())


def semi_structured(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (2:4 pattern, pruned entries exactly 0) compressed for CUDA's semi-structured sparse kernels.

    Raises:
        RuntimeError: torch refuses the device, dtype or shape (cuSPARSELt has no fp32; both dimensions must be
            multiples of 16-64 depending on the dtype); the layer then keeps a dense kernel.
    """
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight.detach().contiguous())


class SparseLinear(nn.Module):
    """`y = x W^T + b` with `W` stored for one kernel (`dense`, `csr`, `bsr` or `semi_structured`).

    Built on the model's final device and dtype: `W` is a plain attribute, which `.to()` does not move and
    `state_dict` does not hold (checkpoints keep the masked-dense weights and masks).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}; allowed: {KERNELS}")
        self.kernel = kernel
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel in ("dense", "semi_structured"):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if x2.shape[0] == 1:  # sparse matrix-vector product: ~2.5x faster on CPU than the (in, 1) matrix case
            y = torch.mv(self.weight, x2[0]) if self.bias is None else torch.addmv(self.bias, self.weight, x2[0])
        else:
            y = (self.weight @ x2.T).T  # sparse (out, in) @ dense (in, M), transposed back to (M, out)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel a layer got, and the timings (ms per call, by candidate) it was chosen on."""

    layer: str
    kernel: str
    shape: tuple[int, int]  # (out, in)
    density: float
    tokens: int
    ms: dict[str, float]


def _time_ms(fns: dict[str, Callable[[], object]], sync: Callable[[], None]) -> dict[str, float]:
    """Median ms per call of each function, timed in interleaved rounds after a warm-up."""
    numbers = {}
    for name, fn in fns.items():
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        numbers[name] = max(1, round(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(TIMING_ROUNDS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3 / numbers[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def _candidates(
    weight: torch.Tensor, mask: torch.Tensor, allowed: tuple[str, ...], block: int | None
) -> dict[str, Callable[[], torch.Tensor]]:
    """Builders of the kernels among `allowed` that apply to this layer; `dense` also where none applies."""
    builders: dict[str, Callable[[], torch.Tensor]] = {}
    if "dense" in allowed:
        builders["dense"] = weight.detach
    if "csr" in allowed:
        builders["csr"] = lambda: csr_from_mask(weight, mask)
    if "bsr" in allowed and block is not None:
        builders["bsr"] = lambda: bsr_from_mask(weight, mask, block)
    if "semi_structured" in allowed and is_2_4(mask):
        try:
            compressed = semi_structured(weight)
        except RuntimeError as e:
            warnings.warn(f"2:4 weight {tuple(weight.shape)} {weight.dtype} stays dense: {e}", stacklevel=2)
        else:
            builders["semi_structured"] = lambda: compressed
    return builders or {"dense": weight.detach}


class TorchSparseConverter:
    """Forward-only sparse kernels from `torch.sparse` for a loaded model; training stays with `masked_dense`.

    The final masks of any sparsity algorithm convert."""

    name = "torch_sparse"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({"fp32", "bf16"})  # bf16 on cuda only: see `convert`

    def __init__(self, kernels: Iterable[str] = KERNELS) -> None:
        """`kernels`: the kernels a layer may get (e.g. `("csr",)` to force CSR); `dense` is the fallback."""
        self.kernels = tuple(kernels)
        unknown = sorted(set(self.kernels) - set(KERNELS))
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; allowed: {KERNELS}")
        self.choices: list[KernelChoice] = []

    @torch.no_grad()
    def convert(self, model: nn.Module, tokens: int) -> nn.Module:
        """Swap each masked `nn.Linear` of `model` (in place) for a `SparseLinear`; record `self.choices`.

        Layers of one shape, density and pattern form a group that gets one kernel, timed by running each
        candidate over the group's layers in turn, so that weights stream from memory as in a forward pass
        (timing one small matrix again and again would measure it hot in cache).

        Args:
            model: on its final device and dtype, with `weight_mask` buffers on its sparse `nn.Linear`s.
            tokens: tokens per forward call the kernels are chosen for (1 for batch-1 decoding).

        Raises:
            ConfigError: a dtype other than fp32 on CPU (bf16 matmuls are several times slower there).
        """
        groups: dict[tuple, list[tuple[str, nn.Linear, dict[str, Callable[[], torch.Tensor]]]]] = {}
        for name, linear in model.named_modules():
            if not (isinstance(linear, nn.Linear) and hasattr(linear, "weight" + MASK_SUFFIX)):
                continue
            weight, mask = linear.weight, getattr(linear, "weight" + MASK_SUFFIX)
            device = weight.device.type
            if device == "cpu" and weight.dtype != torch.float32:
                raise ConfigError("task.precision", f"backend torch_sparse runs {weight.dtype} on cuda only", ["fp32"])
            weight.masked_fill_(~mask, 0)
            allowed = tuple(k for k in DEVICE_KERNELS.get(device, ()) if k in self.kernels)
            block = block_size(mask) if "bsr" in allowed else None
            builders = _candidates(weight, mask, allowed, block)
            density = round(mask.float().mean().item(), 2)
            key = (device, weight.dtype, *weight.shape, density, tokens, block, *builders)
            groups.setdefault(key, []).append((name, linear, builders))
        self.choices = []
        for key, layers in groups.items():
            if key not in _MEASURED:
                _MEASURED[key] = _measure([(linear, builders) for _, linear, builders in layers], tokens)
            ms = _MEASURED[key]
            for name, linear, builders in layers:
                kernel = min(ms, key=ms.__getitem__) if ms else next(iter(builders))
                parent, _, leaf = name.rpartition(".")
                model.get_submodule(parent).register_module(leaf, SparseLinear(builders[kernel](), linear.bias, kernel))
                self.choices.append(KernelChoice(name, kernel, tuple(linear.weight.shape), key[4], tokens, ms))
        log.info("torch_sparse: %s (kernels timed at M=%d tokens per call)", kernel_summary(self.choices), tokens)
        return model


def _measure(layers: list[tuple[nn.Linear, dict[str, Callable[[], torch.Tensor]]]], tokens: int) -> dict[str, float]:
    """ms per layer of each kernel, run over a group's (layer, kernel builders) in turn; {} when there is no choice.

    Only the first layers up to `STREAM_BYTES` of dense weights take part: enough to exceed any CPU cache.
    """
    kernels = list(layers[0][1])
    if len(kernels) == 1:
        return {}
    weight = layers[0][0].weight
    count = max(1, min(len(layers), STREAM_BYTES // (weight.numel() * weight.element_size())))
    built = {k: [SparseLinear(builders[k](), linear.bias, k) for linear, builders in layers[:count]] for k in kernels}
    x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
    sync = torch.cuda.synchronize if weight.is_cuda else lambda: None
    timings = _time_ms({k: lambda group=group: [layer(x) for layer in group] for k, group in built.items()}, sync)
    return {k: t / count for k, t in timings.items()}


def kernel_summary(choices: list[KernelChoice]) -> str:
    """One line: how many layers got each kernel, e.g. `96 masked layers: csr 72, dense 24`."""
    counts: dict[str, int] = {}
    for choice in choices:
        counts[choice.kernel] = counts.get(choice.kernel, 0) + 1
    return f"{len(choices)} masked layers: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
