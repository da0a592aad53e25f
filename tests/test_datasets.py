"""Dataset sources parse real formats; nothing here downloads anything."""
import numpy as np

from benchmarks.datasets import dictd_number, parse_gcide_entry
from milvus_ltr_router.fixture import EmbeddingDataset

NUMBERED = """Allocate \\Al"lo*cate\\, v. t. [LL. allocatus, p. p. of allocare,
   fr. L. ad + locare to place. See {Allow}.]
   1. To distribute or assign; to allot. --Burke.
      [1913 Webster]

   2. To localize. [R.]
      [1913 Webster]

            The allocation of the particular portions of
            Palestine to its successive inhabitants. --A. R.
                                                  Stanley.
      [1913 Webster]
"""

UNNUMBERED = """Allnight \\All"night`\\, n.
   Light, fuel, or food for the whole night. [Obs.] --Bacon.
   [1913 Webster]
"""


def test_gcide_numbered_senses_are_split_and_cleaned():
    word, senses = parse_gcide_entry(NUMBERED)
    assert word == "Allocate"
    assert senses == ["To distribute or assign; to allot.", "To localize."]


def test_gcide_unnumbered_definition_skips_the_header():
    word, senses = parse_gcide_entry(UNNUMBERED)
    assert (word, senses) == ("Allnight", ["Light, fuel, or food for the whole night."])


def test_dictd_base64_numbers():
    assert dictd_number("A") == 0
    assert dictd_number("Fz") == 5 * 64 + 51
    assert dictd_number("BNy") == 1 * 64 * 64 + 13 * 64 + 50


def test_exact_neighbours_are_computed_once_and_saved(tmp_path):
    rng = np.random.default_rng(0)
    data = EmbeddingDataset("t", rng.normal(size=(300, 8)).astype(np.float32),
                            rng.normal(size=(20, 8)).astype(np.float32))
    ids = data.exact_neighbours(5)
    brute = np.argsort(-(data.queries @ data.docs.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, brute)
    data.save(tmp_path / "t.npz", dtype=np.float32)
    again = EmbeddingDataset.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(again.neighbour_ids, ids)
    np.testing.assert_array_equal(again.exact_neighbours(3), ids[:, :3])
