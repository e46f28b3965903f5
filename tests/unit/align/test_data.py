"""The split by sentence id and the batches training draws."""

import pytest

from toolkit import align
from toolkit.errors import UserError


def test_split_is_seeded_disjoint_and_complete():
    ids = [f"s{i:03d}" for i in range(100)]
    split = align.split_ids(ids, 0.2, 0.1, seed=0)
    assert (len(split.heldout), len(split.val), len(split.train)) == (20, 8, 72)
    assert not set(split.train) & set(split.val) and not set(split.train) & set(split.heldout)
    assert not set(split.val) & set(split.heldout)
    assert sorted(split.train + split.val + split.heldout) == ids
    assert align.split_ids(ids, 0.2, 0.1, seed=0) == split
    assert align.split_ids(ids, 0.2, 0.1, seed=1).heldout != split.heldout
    assert split.train == sorted(split.train)  # corpus order kept
    with pytest.raises(UserError, match="no training sentences"):
        align.split_ids([], 0.5, 0.5, 0)
    assert align.split_ids(["a", "b"], 0.5, 0.5, 0).train  # small corpora keep a training sentence


def test_batches_are_a_pure_function_of_the_index_and_cover_each_epoch():
    ids = [f"s{i}" for i in range(10)]
    epoch = [sid for k in range(5) for sid in align.batch_ids(ids, k, 2, seed=3, salt="hi")]
    assert sorted(epoch) == ids
    assert align.batch_ids(ids, 7, 4, 3, "hi") == align.batch_ids(ids, 7, 4, 3, "hi")
    assert epoch != [sid for k in range(5) for sid in align.batch_ids(ids, k, 2, seed=4, salt="hi")]
