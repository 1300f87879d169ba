"""Parameter and MAC counts of the zoo, precomputed in ``zoo_stats.json`` so that ``mf-edge models``
and ``mf-edge info`` need no PyTorch. ``tests/test_cli_models.py`` checks the file against
``factory.model_stats``; after a zoo change regenerate it with ``python -m mf_edge.models.stats``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import NamedTuple

TABLE = Path(__file__).with_name("zoo_stats.json")


class ModelStats(NamedTuple):
    """Sizes of one registered model at its native input size."""

    params: int
    frozen_params: int
    macs: int | None


@cache
def _table() -> dict[str, list[int]]:
    return json.loads(TABLE.read_text()) if TABLE.is_file() else {}


def zoo_stats(name: str) -> ModelStats:
    """``name``'s parameters and counted MACs: from the table, else counted now (``model_stats``)."""
    entry = _table().get(name)
    if entry is not None:
        return ModelStats(*entry)
    from mf_edge.models.factory import model_stats

    return model_stats(name, macs=True)


def compute_table() -> dict[str, list[int]]:
    """Every registered model's counts, from ``meta``-device builds (about 30 s of CPU)."""
    from mf_edge.models.factory import model_stats
    from mf_edge.models.zoo import list_models

    return {name: list(model_stats(name, macs=True)) for name in list_models()}


if __name__ == "__main__":
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(compute_table().items()))
    TABLE.write_text("{\n" + rows + "\n}\n")
