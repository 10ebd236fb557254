"""Memory bank ring buffer (FNE_SPEC section 2) against a plain Python ring model."""

from __future__ import annotations

import pytest
import torch

from fne_lightning.fne.bank import MemoryBank


class RingModel:
    """One row at a time, as obviously as possible."""

    def __init__(self, size: int) -> None:
        self.slots: list[int | None] = [None] * size
        self.ptr = 0

    def enqueue(self, rows: list[int]) -> None:
        for row in rows:
            self.slots[self.ptr] = row
            self.ptr = (self.ptr + 1) % len(self.slots)


def batch(start: int, b: int, d: int) -> tuple[torch.Tensor, ...]:
    # Row r carries its number r everywhere, so slot contents identify the row.
    rows = torch.arange(start, start + b)
    image = rows.float().unsqueeze(1).expand(b, d).contiguous()
    return image, -image, rows // 5, rows


def assert_matches(bank: MemoryBank, model: RingModel, d: int) -> None:
    valid = bank.valid_mask()
    assert valid.tolist() == [row is not None for row in model.slots]
    assert bank.ptr.item() == model.ptr
    assert bank.filled.item() == sum(row is not None for row in model.slots)
    for slot, row in enumerate(model.slots):
        if row is None:
            assert bank.image_ids[slot] == -1 and bank.text_ids[slot] == -1
            continue
        assert torch.equal(bank.image_features[slot], torch.full((d,), float(row)))
        assert torch.equal(bank.text_features[slot], torch.full((d,), -float(row)))
        assert bank.image_ids[slot] == row // 5 and bank.text_ids[slot] == row


@pytest.mark.parametrize(
    ("size", "sizes"), [(10, [4, 4, 4, 4]), (10, [3, 10, 1, 7]), (5, [12, 2, 6]), (7, [0, 7, 7])]
)
def test_wrap_around_matches_ring_model(size, sizes):
    d = 3
    bank, model = MemoryBank(size, d), RingModel(size)
    assert not bank.valid_mask().any()
    start = 0
    for b in sizes:
        bank.enqueue(*batch(start, b, d))
        model.enqueue(list(range(start, start + b)))
        start += b
        assert_matches(bank, model, d)


def test_explicit_slots_k10_b4():
    bank = MemoryBank(10, 1)
    for step in range(4):
        bank.enqueue(*batch(4 * step, 4, 1))
    # Rows 0..15 written in order: slots 0-5 hold rows 10-15, slots 6-9 rows 6-9.
    assert bank.text_ids.tolist() == [10, 11, 12, 13, 14, 15, 6, 7, 8, 9]
    assert bank.ptr.item() == 6 and bank.filled.item() == 10 and bank.valid_mask().all()


def test_batch_larger_than_bank_keeps_last_rows():
    bank = MemoryBank(4, 2)
    bank.enqueue(*batch(0, 1, 2))
    bank.enqueue(*batch(100, 9, 2))  # rows 100..108 from slot 1: the last 4 survive
    assert bank.text_ids.tolist() == [107, 108, 105, 106]
    assert bank.ptr.item() == (1 + 9) % 4 and bank.filled.item() == 4


def test_no_gradient_and_dtype_cast():
    bank = MemoryBank(6, 4)
    image = torch.randn(3, 4, requires_grad=True)
    text = (torch.randn(3, 4, requires_grad=True) * 2).double()
    bank.enqueue(image * 1.0, text, torch.arange(3), torch.arange(3))
    for buf in bank.buffers():
        assert not buf.requires_grad and buf.grad_fn is None
    assert bank.text_features.dtype == torch.float32
    torch.testing.assert_close(bank.image_features[:3], image.detach())
    image.data.add_(1.0)  # a copy, not a view of the caller's tensor
    assert not torch.equal(bank.image_features[:3], image.detach())


def test_state_dict_round_trip():
    bank = MemoryBank(10, 3)
    bank.enqueue(*batch(0, 7, 3))
    bank.enqueue(*batch(7, 6, 3))
    state = bank.state_dict()
    assert set(state) == {"image_features", "text_features", "image_ids", "text_ids", "ptr", "filled"}
    fresh = MemoryBank(10, 3)
    fresh.load_state_dict(state)
    for name, value in bank.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert torch.equal(fresh.valid_mask(), bank.valid_mask())
    fresh.enqueue(*batch(13, 2, 3))  # resumes at the restored pointer
    assert fresh.text_ids.tolist()[3:5] == [13, 14]


def test_partially_filled_state_dict_keeps_invalid_slots():
    bank = MemoryBank(8, 2)
    bank.enqueue(*batch(0, 3, 2))
    fresh = MemoryBank(8, 2)
    fresh.load_state_dict(bank.state_dict())
    assert fresh.valid_mask().tolist() == [True] * 3 + [False] * 5


def test_size_zero():
    bank = MemoryBank(0, 4)
    bank.enqueue(*batch(0, 5, 4))
    assert len(bank) == 0 and bank.size == 0
    assert bank.valid_mask().shape == (0,)
    assert bank.image_features.shape == (0, 4) and bank.ptr.item() == 0 and bank.filled.item() == 0
    MemoryBank(0, 4).load_state_dict(bank.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError):
        MemoryBank(-1, 4)
    with pytest.raises(ValueError):
        MemoryBank(4, 0)
