"""Parameter counting."""

from __future__ import annotations

import jax
import numpy as np


def count_params(params, *, exclude: tuple[str, ...] = ()) -> int:
    """Total number of scalars in a params pytree; leaves whose path contains a name in
    `exclude` (e.g. `("embed",)` for the non-embedding count) are skipped."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        if names & set(exclude):
            continue
        total += int(np.prod(getattr(leaf, "shape", np.shape(leaf))))
    return total
