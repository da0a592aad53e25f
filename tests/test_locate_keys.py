"""placement.locate_keys: which partitions hold each key, with few queries (partition storage
upserts delete the old copy only where it was found, so concurrent writers never erase
each other's new rows)."""
import numpy as np

from milvus_ltr_router.placement import locate_keys


def make_store(n_parts=64, n_keys=200, seed=0):
    rng = np.random.default_rng(seed)
    parts = [f"p{i:02d}" for i in range(n_parts)]
    where = {k: {parts[rng.integers(n_parts)]} for k in range(n_keys)}
    return parts, where


def counting(where):
    calls = []

    def keys_in(keys, partitions):
        calls.append((len(keys), len(partitions)))
        ps = set(partitions)
        return {k for k in keys if where.get(k, set()) & ps}
    return keys_in, calls


def test_right_guesses_cost_two_queries_per_distinct_guess():
    parts, where = make_store()
    keys = list(range(50))
    guesses = [next(iter(where[k])) for k in keys]
    keys_in, calls = counting(where)
    assert locate_keys(keys_in, keys, guesses, parts) == {k: where[k] for k in keys}
    assert len(calls) == 2 * len(set(guesses))


def test_wrong_guesses_stale_copies_and_absent_keys_are_located_exactly():
    parts, where = make_store()
    where[3] = {"p01", "p40"}                  # a stale second copy
    where[7] = {"p63"}
    keys = [3, 7, 9, 999]                      # 999 is stored nowhere
    guesses = ["p01", "p00", "p10", "p05"]     # 7's and 9's guesses are wrong
    keys_in, calls = counting(where)
    got = locate_keys(keys_in, keys, guesses, parts)
    assert got == {3: {"p01", "p40"}, 7: {"p63"}, 9: where[9]}
    # halving: ~log2(64) = 6 levels for each key found away from its guess, not 64 queries
    assert len(calls) <= 2 * len(keys) + 3 * 2 * 6

