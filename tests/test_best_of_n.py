"""Best-of-N estimator, KL and selection against brute-force enumeration of subsets."""
import itertools
import math

import numpy as np
import pytest

from rlhf_jax.rl import best_of_n as bon


def brute_force(proxy, values, N):
    """Mean over prompts of the mean over all N-subsets of v(proxy-best of the subset); ties -> later index."""
    P, n = proxy.shape
    out = []
    for p in range(P):
        vals = []
        for sub in itertools.combinations(range(n), N):
            best = max(sub, key=lambda j: (proxy[p, j], j))
            vals.append(values[p, best])
        out.append(np.mean(vals))
    return float(np.mean(out))


def test_weights_hand_computed_and_normalised():
    w = bon.bon_weights(4, [1, 2, 4])
    np.testing.assert_allclose(w[0], [0.25, 0.25, 0.25, 0.25])
    # N=2 of n=4: C(i-1,1)/C(4,2) = (0,1,2,3)/6
    np.testing.assert_allclose(w[1], [0, 1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(w[2], [0, 0, 0, 1])
    w = bon.bon_weights(200, [1, 7, 64, 200])
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_estimator_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    P, n = 3, 6
    proxy = rng.normal(size=(P, n)).astype(np.float32)
    gold = rng.normal(size=(P, n)).astype(np.float32)
    ns = list(range(1, n + 1))
    est = bon.best_of_n_estimates(proxy, {"gold": gold, "proxy": proxy}, ns)
    for j, N in enumerate(ns):
        assert est["gold"][j] == pytest.approx(brute_force(proxy, gold, N), abs=1e-5)
        assert est["proxy"][j] == pytest.approx(brute_force(proxy, proxy, N), abs=1e-5)
    # best-of-n proxy is the max; best-of-1 is the plain mean
    assert est["proxy"][-1] == pytest.approx(proxy.max(1).mean(), abs=1e-5)
    assert est["gold"][0] == pytest.approx(gold.mean(), abs=1e-5)


def test_ties_broken_like_argmax_proxy():
    proxy = np.array([[1.0, 2.0, 2.0, 0.0, 2.0]], np.float32)
    gold = np.array([[5.0, 1.0, 2.0, 3.0, 4.0]], np.float32)
    est = bon.best_of_n_estimates(proxy, {"gold": gold}, [1, 2, 3, 5])
    for j, N in enumerate([1, 2, 3, 5]):
        assert est["gold"][j] == pytest.approx(brute_force(proxy, gold, N), abs=1e-5)
    assert int(bon.argmax_proxy(proxy)[0]) == 4


def test_kl_and_bad_n():
    np.testing.assert_allclose(bon.best_of_n_kl([1, 2, 4]), [0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    with pytest.raises(ValueError, match="1 <= N <= n=4"):
        bon.bon_weights(4, [5])
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        bon.best_of_n_estimates(np.zeros(3), {}, [1])
