"""The replay buffer with sequence rows: per-row storage, samples padded to the longest row with each key's pad
value, the original rows recovered exactly, memory it reports, checkpoints bit for bit, and DDP shards."""

import io

import pytest
import torch
from harness import assert_same_state

from lightning_incremental.buffers import ReplayBuffer, concat_padded, pad_values_for
from lightning_incremental.core import batch_leaves

PAD_ID = 1  # a pad id that is not 0 (as RoBERTa's): the buffer must read it from the data


def _hf_batch(lengths: list[int], offset: int, token_labels: bool = False) -> dict[str, torch.Tensor]:
    """A Hugging Face-style batch padded to its longest row: row ``i`` holds tokens ``offset + i + 2 ...``."""
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), PAD_ID)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    labels = torch.full((len(lengths), longest), -100) if token_labels else torch.arange(len(lengths)) % 3
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.arange(length) + 10 * (offset + row) + 2
        mask[row, :length] = 1
        if token_labels:
            labels[row, :length] = (torch.arange(length) + row) % 5
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rows_of(batches: list[dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Every row of the batches without its padding, keyed by its first token."""
    rows = {}
    for batch in batches:
        for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            rows[int(batch["input_ids"][i, 0])] = {k: v[i, :length] if v.ndim > 1 else v[i] for k, v in batch.items()}
    return rows


def _fill(batches: list[dict[str, torch.Tensor]], capacity: int, seed: int = 0) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, seed=seed)
    for batch in batches:
        buffer.add(batch_leaves(batch), groups=None, pad_values=pad_values_for(batch))
    return buffer


@pytest.mark.parametrize("token_labels", [False, True])
def test_sequence_rows_are_rebuilt_padded_to_the_longest_row_drawn_with_each_keys_pad(token_labels):
    batches = [
        _hf_batch([3, 5, 2], 0, token_labels),
        _hf_batch([7, 1], 3, token_labels),
        _hf_batch([4], 5, token_labels),
    ]
    originals = _rows_of(batches)
    buffer = _fill(batches, capacity=6)
    assert buffer.storage[0].shape == (6, 7)  # padded to the longest row seen
    assert buffer.lengths[0].tolist() == [5, 5, 5, 7, 7, 4]  # a row is as long as the batch it came in
    assert buffer.pad_values == [PAD_ID, 0, -100]
    for _ in range(20):
        rows, _, index, _ = buffer.sample(3)
        replayed = dict(zip(("input_ids", "attention_mask", "labels"), rows, strict=True))
        longest = int(buffer.lengths[0][index].max())
        assert replayed["input_ids"].shape == (3, longest)  # padded to the longest row drawn, not the storage
        for i in range(3):
            original = originals[int(replayed["input_ids"][i, 0])]
            length = len(original["input_ids"])
            for key, pad in (("input_ids", PAD_ID), ("attention_mask", 0), ("labels", -100)):
                if key == "labels" and not token_labels:
                    assert replayed[key][i] == original[key]
                    continue
                assert replayed[key][i, :length].tolist() == original[key].tolist()
                assert replayed[key][i, length:].tolist() == [pad] * (longest - length)


def test_variable_length_extras_are_padded_with_zeros_and_come_with_a_mask_of_their_positions():
    buffer = ReplayBuffer(4, seed=0)
    for length in (2, 5):
        logits = torch.arange(2 * length * 3, dtype=torch.float32).reshape(2, length, 3) + 100 * length
        buffer.add([torch.zeros(2, length, dtype=torch.long)], groups=None, extras={"logits": logits})
    assert buffer.extras["logits"].shape == (4, 5, 3)
    _, extras, index, masks = buffer.sample(8)
    lengths = torch.tensor([2, 2, 5, 5])[index]
    assert masks["logits"].tolist() == [[t < n for t in range(extras["logits"].shape[1])] for n in lengths.tolist()]
    assert bool((extras["logits"][~masks["logits"]] == 0).all())
    assert bool((extras["logits"][masks["logits"]] >= 200).all())  # every stored position is a stored logit


def test_a_fixed_shape_buffer_has_no_lengths_and_no_masks():
    buffer = ReplayBuffer(4, seed=0)
    buffer.add([torch.randn(3, 5)], groups=None, extras={"logits": torch.randn(3, 2)})
    buffer.add([torch.randn(3, 5)], groups=None, extras={"logits": torch.randn(3, 2)})
    sample = buffer.sample(6)
    assert buffer.lengths == [None] and sample.extra_masks == {} and sample.rows[0].shape == (6, 5)


def test_a_shorter_row_overwrites_the_tail_of_a_longer_one_with_padding():
    buffer = ReplayBuffer(1, seed=0)
    buffer.add([torch.tensor([[5, 6, 7, 8]])], groups=None, pad_values=[-1])
    for _ in range(200):  # the reservoir replaces the single slot sooner or later
        buffer.add([torch.tensor([[9, 9]])], groups=None)
        if buffer.storage[0][0, 0] == 9:
            break
    assert buffer.storage[0].tolist() == [[9, 9, -1, -1]] and buffer.lengths[0].tolist() == [2]
    assert buffer.sample(2).rows[0].tolist() == [[9, 9], [9, 9]]


def test_pad_values_follow_the_keys_the_targets_and_the_users_choice():
    batch = _hf_batch([3, 1], 0, token_labels=True)
    assert pad_values_for(batch) == [PAD_ID, 0, -100]
    assert pad_values_for(batch, given={"input_ids": 0, "labels": -1}) == [0, 0, -1]
    unpadded = _hf_batch([2, 2], 0)
    assert pad_values_for(unpadded) == [0, 0, -100]  # no padding to read the pad id from: 0
    tokens, tags = torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    assert pad_values_for((tokens, tags), targets=tags) == [0, -100]  # a tuple's targets found by the interface
    scores = tags.float()
    assert pad_values_for((tokens, scores), targets=scores) == [0, 0]  # real-valued targets pad with 0
    assert pad_values_for({"x": torch.ones(2, 3, dtype=torch.bool)}) == [False]
    with pytest.raises(ValueError, match=r"`pad_values` names \['input_idz'\]"):
        pad_values_for(batch, given={"input_idz": 0})


def test_concat_pads_the_current_batch_and_the_replayed_rows_to_their_common_length():
    current, replayed = _hf_batch([2, 3], 0, token_labels=True), _hf_batch([5], 4, token_labels=True)
    for first, second in ((current, replayed), (replayed, current)):
        joined = concat_padded(first, second, [PAD_ID, 0, -100])
        assert list(joined) == ["input_ids", "attention_mask", "labels"]
        assert joined["input_ids"].shape == (3, 5)
        assert joined["attention_mask"].sum(1).tolist() == (
            [2, 3, 5] if first is current else [5, 2, 3]
        )  # every row keeps its own tokens
        padding = joined["attention_mask"] == 0
        assert set(joined["input_ids"][padding].tolist()) == {PAD_ID}
        assert set(joined["labels"][padding].tolist()) == {-100}


def test_a_row_shape_that_changes_beyond_the_length_is_refused():
    buffer = ReplayBuffer(4, seed=0)
    buffer.add([torch.zeros(2, 3, 8)], groups=None)
    with pytest.raises(ValueError, match="only the second dimension"):
        buffer.add([torch.zeros(2, 3, 9)], groups=None)


def test_nbytes_is_the_storage_the_buffer_allocated_not_the_rows_it_filled():
    buffer = ReplayBuffer(10, seed=0)
    buffer.add(batch_leaves(_hf_batch([3], 0)), groups=None)
    one_row = buffer.nbytes
    assert one_row == 10 * 3 * 8 * 2 + 10 * 8 + 10 * 8  # ids and mask [10, 3] int64, labels, groups
    buffer.add(batch_leaves(_hf_batch([3, 1, 2], 1)), groups=None)
    assert buffer.nbytes == one_row  # filled rows change nothing
    buffer.add(batch_leaves(_hf_batch([6], 4)), groups=None)  # a longer row grows the storage to 6 tokens
    assert buffer.storage[0].shape == (10, 6)
    expected = 10 * 6 * 8 * 2 + 10 * 8 + 10 * 8 + 2 * 10 * 8  # plus the lengths of the two sequence leaves
    assert buffer.nbytes == expected
    held = [*buffer.storage, buffer.groups, *(t for t in buffer.lengths if t is not None)]
    assert expected == sum(t.untyped_storage().nbytes() for t in held)


def test_a_sequence_buffer_round_trips_through_a_checkpoint_bit_for_bit():
    batches = [_hf_batch([3, 5, 2], 0, True), _hf_batch([7, 1], 3, True), _hf_batch([4, 2, 2], 5, True)]
    buffer = ReplayBuffer(5, seed=3)
    for batch in batches:
        extras = {"logits": torch.randn(*batch["input_ids"].shape, 4)}
        buffer.add(batch_leaves(batch), groups=None, extras=extras, pad_values=pad_values_for(batch))
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = ReplayBuffer(5, seed=99)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert_same_state(restored.state_dict(), buffer.state_dict())
    assert restored.nbytes == buffer.nbytes
    for buffers in ((buffer, restored), (buffer, restored)):  # the same draws, the same padded rows
        assert_same_state(*(tuple(b.sample(7)) for b in buffers))
    longer = _hf_batch([9, 3], 8, True)  # and the same growth afterwards
    for b in (buffer, restored):
        b.add(batch_leaves(longer), groups=None, extras={"logits": torch.ones(2, 9, 4)})
    assert_same_state(restored.state_dict(), buffer.state_dict())


def test_ddp_shards_of_different_lengths_pool_and_share_every_row_exactly():
    shards = [_fill([_hf_batch([2, 3], 0, True)], 4), _fill([_hf_batch([6, 1, 4], 2, True)], 4)]
    originals = _rows_of([_hf_batch([2, 3], 0, True), _hf_batch([6, 1, 4], 2, True)])
    pooled = ReplayBuffer.pooled([s.state_dict() for s in shards], capacity=8)
    assert len(pooled) == 5 and pooled.storage[0].shape == (8, 6) and pooled.lengths[0][:5].tolist() == [3, 3, 6, 6, 6]
    shares = [pooled.share(rank, 2, seed=0) for rank in range(2)]
    held = {}
    for share in shares:
        for slot in range(len(share)):
            length = int(share.storage[1][slot].sum())
            held[int(share.storage[0][slot, 0])] = [t[slot, :length].tolist() for t in share.storage]
    assert held == {first: [row[k].tolist() for k in row] for first, row in originals.items()}
