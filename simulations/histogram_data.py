"""Populations for histogram estimation: users drawing m samples from a real word-frequency distribution.

The distribution is the top-k English words of the ``wordfreq`` package (its lists ship inside the package;
nothing is downloaded), renormalized over those k words. Two ways to draw a population:

- :func:`sample_users` — an (n, k) count matrix, one row per user (what federated clients hold);
- :func:`sample_profile` — the :class:`~privacy.histogram.CountProfile` of n users, built in chunks, so 10⁵+
  users fit in memory and every release costs O(k·m) (the vectorized path; same mechanism code).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from privacy.histogram import CountProfile

HOW_TO_GET_WORDFREQ = "install it with `pip install wordfreq` (a fedpriv dependency; `make run` installs it)"


@lru_cache(maxsize=8)
def word_distribution(k: int, language: str = "en") -> tuple[tuple[str, ...], np.ndarray]:
    """The top-``k`` words of ``language`` and their frequencies renormalized to sum to 1."""
    try:
        import wordfreq
    except ImportError as exc:  # pragma: no cover - a dependency
        raise RuntimeError(f"the words-histogram population needs the wordfreq package: {HOW_TO_GET_WORDFREQ}") from exc
    words = tuple(wordfreq.top_n_list(language, k))
    if len(words) < k:
        raise ValueError(f"num-items: wordfreq lists {len(words)} {language!r} words, fewer than k={k}")
    freq = np.array([wordfreq.word_frequency(w, language) for w in words], dtype=np.float64)
    return words, freq / freq.sum()


def sample_users(p: np.ndarray, n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k) int64 counts: each of n users draws m items i.i.d. from ``p``."""
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    items = np.searchsorted(cdf, rng.random(n * m), side="right")
    users = np.repeat(np.arange(n), m)
    return np.bincount(users * len(p) + items, minlength=n * len(p)).reshape(n, len(p))


def sample_profile(p: np.ndarray, n: int, m: int, rng: np.random.Generator, chunk: int = 20_000) -> CountProfile:
    """The count profile of n users drawing m items each from ``p``, drawn ``chunk`` users at a time."""
    return CountProfile.from_user_counts(
        lambda: (sample_users(p, min(chunk, n - start), m, rng) for start in range(0, n, chunk)))


def node_users(cfg: Mapping[str, Any], partition_id: int) -> np.ndarray:
    """Counts (users × k) of the users simulated node ``partition_id`` holds (same draw in every process)."""
    _, p = word_distribution(int(cfg["num-items"]))
    rng = np.random.default_rng([int(cfg["seed"]), 7, partition_id])
    return sample_users(p, int(cfg["users-per-client"]), int(cfg["samples-per-user"]), rng)


def population_profile(cfg: Mapping[str, Any]) -> CountProfile:
    """The count profile of the whole simulated federation — exactly the users the Flower clients hold."""
    return CountProfile.from_user_counts(lambda: (node_users(cfg, node) for node in range(int(cfg["num-clients"]))))
