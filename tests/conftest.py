"""Shared tiny fixtures."""

import pytest
import torch


def random_batch(
    batch_size: int = 2, seq_len: int = 16, vocab_size: int = 64, with_mask: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch dict as the DataModules make it: ``input_ids``, ``targets`` (shifted by one), and for
    tool corpora a float ``loss_mask``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    batch = {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous()}
    if with_mask:
        batch["loss_mask"] = (torch.rand(batch_size, seq_len, generator=g) < 0.5).float()
    return batch


@pytest.fixture
def make_batch():
    """``make_batch(batch_size=2, seq_len=16, vocab_size=64, with_mask=False, seed=0)`` -> batch dict."""
    return random_batch
