"""The torch_sparse backend: masked-dense parity, kernel patterns built from masks, per-layer choice, capabilities."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from modelzoo.backends import torch_sparse
from modelzoo.backends.torch_sparse import (
    SparseLinear,
    TorchSparseConverter,
    block_size,
    bsr_from_mask,
    csr_from_mask,
    is_2_4,
)
from modelzoo.errors import ConfigError
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.plugin import MaskedSparsity
from tests.conftest import make_config


def sparse_model(config: GPTConfig, sparsity: float = 0.75) -> GPT:
    """A masked-dense model with every weight random (std 0.3, so logits are far from uniform)."""
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    MaskedSparsity(SparsityConfig(sparsity=sparsity), seed=0).apply(model)
    return model.eval()


def set_masks(model: GPT, make_mask) -> None:
    """Replace every mask by `make_mask(shape)` and re-prune the weights to match."""
    with torch.no_grad():
        for module in model.modules():
            mask = getattr(module, "weight" + MASK_SUFFIX, None)
            if mask is not None:
                mask.copy_(make_mask(mask.shape))
                module.weight.mul_(mask)


def block_mask(shape: torch.Size, b: int = 16) -> torch.Tensor:
    """Random 75%-sparse mask made of `b` x `b` blocks."""
    blocks = torch.rand(shape[0] // b, shape[1] // b, generator=torch.Generator().manual_seed(1)) < 0.25
    return blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)


def two_four_mask(shape: torch.Size) -> torch.Tensor:
    """Keep 2 random entries of every 4 consecutive inputs."""
    score = torch.rand(shape[0], shape[1] // 4, 4, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros_like(score, dtype=torch.bool).scatter(2, score.topk(2, dim=2).indices, True)
    return keep.view(shape)


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


@pytest.fixture
def idx(tiny_config: GPTConfig) -> torch.Tensor:
    return torch.randint(0, tiny_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kernels", [("csr",), torch_sparse.KERNELS], ids=["csr", "measured"])
def test_logits_equal_masked_dense(tiny_config: GPTConfig, idx: torch.Tensor, kernels: tuple[str, ...]) -> None:
    model = sparse_model(tiny_config)
    expected = logits(model, idx)
    backend = TorchSparseConverter(kernels)
    converted = backend.convert(copy.deepcopy(model), tokens=1)
    if kernels == ("csr",):
        assert {c.kernel for c in backend.choices} == {"csr"}
    assert expected.abs().max() > 1.0
    assert (logits(converted, idx) - expected).abs().max().item() <= 1e-4


def test_bsr_for_block_masks_equals_masked_dense(tiny_config: GPTConfig, idx: torch.Tensor) -> None:
    model = sparse_model(tiny_config)
    set_masks(model, block_mask)
    backend = TorchSparseConverter(("bsr",))
    converted = backend.convert(copy.deepcopy(model), tokens=1)
    assert {c.kernel for c in backend.choices} == {"bsr"}
    assert (logits(converted, idx) - logits(model, idx)).abs().max().item() <= 1e-4


def test_kernel_choice_follows_timings_measured_once_per_group(
    tiny_config: GPTConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed: list[tuple[tuple[int, int], int]] = []

    def fake_measure(layers: list, tokens: int) -> dict[str, float]:
        out, inp = layers[0][0].weight.shape
        timed.append(((out, inp), len(layers)))
        return {"dense": 1.0, "csr": 0.5 if out == 4 * inp else 2.0}

    monkeypatch.setattr(torch_sparse, "_MEASURED", {})
    monkeypatch.setattr(torch_sparse, "_measure", fake_measure)
    backend = TorchSparseConverter()
    model = backend.convert(sparse_model(tiny_config), tokens=1)

    # 8 layers in 4 shape groups of 2 layers, each group timed once
    assert sorted(timed) == [((64, 64), 2), ((64, 256), 2), ((192, 64), 2), ((256, 64), 2)]
    assert len(backend.choices) == 8
    for choice in backend.choices:
        assert choice.kernel == ("csr" if choice.shape == (256, 64) else "dense")
        assert choice.ms["csr"] in (0.5, 2.0) and choice.density == 0.25 and choice.tokens == 1
        assert model.get_submodule(choice.layer).kernel == choice.kernel
    assert isinstance(model.transformer.h[1].mlp.c_fc, SparseLinear)
    assert "csr 2, dense 6" in torch_sparse.kernel_summary(backend.choices)


def test_timing_runs_every_candidate_over_the_group(tiny_config: GPTConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_sparse, "_MEASURED", {})
    backend = TorchSparseConverter()
    backend.convert(sparse_model(tiny_config), tokens=3)
    for choice in backend.choices:
        assert set(choice.ms) == {"dense", "csr"} and all(t > 0 for t in choice.ms.values())
        assert choice.kernel == min(choice.ms, key=choice.ms.__getitem__)


def test_csr_pattern_comes_from_the_mask_and_keeps_exact_zeros() -> None:
    weight = torch.randn(8, 12)
    mask = torch.rand(8, 12, generator=torch.Generator().manual_seed(0)) < 0.3
    row, col = mask.nonzero()[0].tolist()
    weight[row, col] = 0.0  # kept by the mask, but exactly zero
    csr = csr_from_mask(weight, mask)
    assert csr.crow_indices().dtype == csr.col_indices().dtype == torch.int32
    assert csr._nnz() == int(mask.sum())
    assert torch.equal(csr.to_dense(), weight * mask)
    assert (csr.values() == 0).sum().item() == 1
    x = torch.randn(12, 3)
    torch.testing.assert_close(csr @ x, (weight * mask) @ x)


def test_block_masks_are_detected_and_converted() -> None:
    """`block_size` is the largest size whose blocks are all kept or all pruned: a mask of 32 x 32 blocks is also
    one of 16 x 16 blocks and must say 32; the random 16 x 16 blocks below do not pair up into 32 x 32 ones."""
    assert block_size(block_mask(torch.Size([64, 128]), 32)) == 32
    mask = block_mask(torch.Size([64, 128]))
    assert block_size(mask) == 16
    assert block_size(torch.rand(64, 128, generator=torch.Generator().manual_seed(0)) < 0.25) is None
    weight = torch.randn(64, 128)
    bsr = bsr_from_mask(weight, mask, 16)
    assert torch.equal(bsr.to_dense(), weight * mask)
    assert bsr.values().shape[1:] == (16, 16) and bsr.col_indices().dtype == torch.int32


def test_2_4_detection() -> None:
    assert is_2_4(two_four_mask(torch.Size([8, 16])))
    assert not is_2_4(torch.ones(8, 16, dtype=torch.bool))


def test_pretrain_refuses_torch_sparse_naming_masked_dense(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"backend 'torch_sparse' does not support training.*masked_dense") as info:
        make_config(tmp_path / "run", cache_dir, "backend.name=torch_sparse")
    assert info.value.key == "backend.name"


def test_bf16_on_cpu_is_refused(tiny_config: GPTConfig) -> None:
    model = sparse_model(tiny_config).to(torch.bfloat16)
    with pytest.raises(ConfigError, match=r"task\.precision"):
        TorchSparseConverter().convert(model, tokens=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_2_4_semi_structured_on_cuda_equals_masked_dense(tiny_config: GPTConfig, idx: torch.Tensor) -> None:
    model = sparse_model(tiny_config)
    set_masks(model, two_four_mask)
    model = model.to("cuda", torch.bfloat16)
    idx = idx.cuda()
    backend = TorchSparseConverter(("semi_structured",))
    converted = backend.convert(copy.deepcopy(model), tokens=1)
    assert {c.kernel for c in backend.choices} == {"semi_structured"}
    expected = logits(model, idx).float()
    torch.testing.assert_close(
        logits(converted, idx).float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0
    )
