"""What a CS-2 run needs of the config, checked before any compute (`CerebrasBackend.check_config`)."""

from __future__ import annotations

from pathlib import Path

from modelzoo.config import Config
from modelzoo.config.train import resolved_precision
from modelzoo.errors import ConfigError


def check_cerebras_config(cfg: Config, device: str) -> None:
    """The CS-2 modes need a CSX target; a CS-2 run needs its submission settings, its data where the input workers
    can read it, and whole batches (it splits them itself)."""
    target = cfg.cluster.resolved_target(device)
    lowering = cfg.cluster.mode != "train"
    if lowering and target != "CSX":
        raise ConfigError(
            "cluster.mode", f"{cfg.cluster.mode} lowers for a CS-2: it needs backend=cerebras cluster=cs2"
        )
    if target != "CSX":
        return
    missing = cfg.cluster.missing_for_submission()
    if not lowering and missing:
        raise ConfigError(
            missing[0].split("=")[0],
            f"a CS-2 run needs {' and '.join(missing)}; cluster.mode=compile_only or cluster.mode=validate_only "
            "lower the model offline without them",
        )
    if resolved_precision(cfg.task.precision, target) == "fp32":
        raise ConfigError(
            "task.precision",
            "fp32 on a CS-2 would run as float16 without loss scaling (cstorch's CSX backend always enables mixed "
            "precision): use task.precision=bf16 (the default there, as the Model Zoo's) or cbf16",
        )
    check_cs2_data(cfg)
    if cfg.task.micro_batch_size != cfg.task.batch_size:
        raise ConfigError(
            "task.micro_batch_size",
            f"a CS-2 splits batches itself: set task.micro_batch_size={cfg.task.batch_size} (= task.batch_size)",
        )


def check_cs2_data(cfg: Config) -> None:
    """What a CS-2's input workers need: a global batch that splits evenly over `cluster.num_csx` systems, and the
    corpus cache (which they read) on a volume in `cluster.mount_dirs` (for a training run; given mount dirs,
    always)."""
    num_csx = cfg.cluster.num_csx
    if cfg.task.batch_size % num_csx:
        raise ConfigError(
            "task.batch_size",
            f"{cfg.task.batch_size} does not split over cluster.num_csx={num_csx} CS-2s: use a multiple of {num_csx}",
        )
    mounts = [Path(m).resolve() for m in cfg.cluster.mount_dirs]
    if cfg.cluster.mode != "train" and not mounts:
        return
    cache = Path(cfg.data.cache_dir).resolve()
    if not any(cache.is_relative_to(m) for m in mounts):
        raise ConfigError(
            "data.cache_dir",
            f"{cache} is not under cluster.mount_dirs={[str(m) for m in mounts]}, so the CS-2's input workers cannot "
            f"read the corpus: add its volume to cluster.mount_dirs or set data.cache_dir=<a dir on a mounted volume>",
        )
