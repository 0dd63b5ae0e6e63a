"""Helpers for the TRL parity tests (tests/test_losses_trl.py, tests/test_losses_family_trl.py).

Import after `pytest.importorskip("torch")` / `pytest.importorskip("trl")`: this module imports torch.
"""

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch


def close(a, b, tol=1e-5):
  a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def t(x):
  return torch.tensor(np.asarray(x))


def stub_trainer(**attrs):
  """A minimal stand-in `self` for calling a TRL trainer's loss method: a model in training mode, a
  single-process accelerator (gather/reduce are the identity) and empty metric stores."""
  identity = lambda x, **kw: x
  base = dict(model=SimpleNamespace(training=True),
              accelerator=SimpleNamespace(gather_for_metrics=identity, gather=identity, reduce=identity, device="cpu",
                                          num_processes=1),
              _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0)
  base.update(attrs)
  return SimpleNamespace(**base)
