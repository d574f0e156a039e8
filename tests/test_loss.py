import math

import pytest
import torch
import torch.nn.functional as F

from longcontrast.loss import contrastive_loss


def hand_loss(q, p, temperature, targets, excluded):
    """Per-query cross-entropy written out with Python loops; ``excluded[i]`` = passages not scored."""
    losses, correct = [], 0
    for i in range(len(q)):
        logits = {j: float(q[i] @ p[j]) / temperature for j in range(len(p)) if j not in excluded[i]}
        log_sum = math.log(sum(math.exp(v) for v in logits.values()))
        losses.append(log_sum - logits[targets[i]])
        correct += max(logits, key=logits.get) == targets[i]
    return sum(losses) / len(losses), correct / len(q)


def unit(rows, dim=6, seed=0):
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_loss_matches_hand_computation():
    q, p = unit(3, seed=1), unit(7, seed=2)
    out = contrastive_loss(q, p, temperature=0.05)
    expected, accuracy = hand_loss(q, p, 0.05, [0, 1, 2], [set(), set(), set()])
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.accuracy.item() == pytest.approx(accuracy)


def test_explicit_targets():
    q, p = unit(2, seed=3), unit(5, seed=4)
    out = contrastive_loss(q, p, temperature=0.1, targets=torch.tensor([3, 1]))
    assert out.loss.item() == pytest.approx(hand_loss(q, p, 0.1, [3, 1], [set(), set()])[0], rel=1e-12)


def test_duplicate_of_own_positive_is_masked():
    q, p = unit(3, seed=5), unit(6, seed=6)
    # passage 4 has the same text as query 0's positive (passage 0); passage 1 is query 1's positive.
    text_ids = torch.tensor([0, 1, 2, 3, 0, 4])
    out = contrastive_loss(q, p, temperature=0.05, passage_text_ids=text_ids)
    expected, _ = hand_loss(q, p, 0.05, [0, 1, 2], [{4}, set(), set()])
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # negative control: without the ids the duplicate counts as a negative and the loss changes
    unmasked = contrastive_loss(q, p, temperature=0.05)
    assert abs(unmasked.loss.item() - expected) > 1e-3


def test_identical_positives_of_two_queries_mask_each_other():
    q, p = unit(2, seed=7), unit(3, seed=8)
    text_ids = torch.tensor([5, 5, 6])  # both queries share the same positive text
    out = contrastive_loss(q, p, temperature=0.05, passage_text_ids=text_ids)
    expected, _ = hand_loss(q, p, 0.05, [0, 1], [{1}, {0}])
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(out.loss)


def test_gradient_is_finite_with_masking():
    q, p = unit(2, seed=9).requires_grad_(), unit(3, seed=10).requires_grad_()
    contrastive_loss(q, p, 0.05, passage_text_ids=torch.tensor([1, 1, 2])).loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()


def test_temperature_must_be_positive():
    with pytest.raises(ValueError):
        contrastive_loss(unit(1), unit(2), temperature=0)
