"""Hydra config tree, shipped inside the package as `modelzoo.conf` (see pyproject's package-dir)."""
