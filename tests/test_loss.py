import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longcontrast.loss import BatchLabels, LossSettings, contrastive_loss, distillation_loss, training_loss


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


def test_kl_distillation_matches_scipy_entropy_over_each_querys_candidates():
    """KL(teacher || student) per query with scipy (softmax, entropy), pads left out, then the mean."""
    from scipy.special import softmax
    from scipy.stats import entropy

    q, p = unit(3, seed=1), unit(8, seed=2)
    candidates = torch.tensor([[0, 3, 4], [1, 5, -1], [2, 6, 7]])
    teacher = torch.tensor([[2.0, 1.0, 0.5], [0.3, 1.2, 99.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    got = distillation_loss(q, p, candidates, teacher, temperature=0.05, teacher_temperature=0.5)
    expected = []
    for i, row in enumerate(candidates.tolist()):
        keep = [k for k, c in enumerate(row) if c >= 0]
        student = softmax([float(q[i] @ p[row[k]]) / 0.05 for k in keep])
        expected.append(entropy(softmax([teacher[i, k].item() / 0.5 for k in keep]), student))
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-9)


def test_margin_mse_matches_hand_computation():
    q, p = unit(2, seed=3), unit(5, seed=4)
    candidates = torch.tensor([[0, 2, 3], [1, 4, -1]])
    teacher = torch.tensor([[3.0, 1.0, 2.5], [0.0, -1.0, 7.0]], dtype=torch.float64)
    got = distillation_loss(q, p, candidates, teacher, temperature=0.1, teacher_temperature=2.0, kind="margin_mse")
    squares = []
    for i, row in enumerate(candidates.tolist()):
        for k in (1, 2):
            if row[k] >= 0:
                student = (float(q[i] @ p[row[0]]) - float(q[i] @ p[row[k]])) / 0.1
                squares.append((student - (teacher[i, 0].item() - teacher[i, k].item()) / 2.0) ** 2)
    assert got.item() == pytest.approx(sum(squares) / len(squares), rel=1e-9)


def test_kl_is_zero_when_the_student_ranks_as_the_teacher_and_positive_otherwise():
    q, p = unit(2, seed=5), unit(6, seed=6)
    candidates = torch.tensor([[0, 2, 3], [1, 4, 5]])
    cosines = torch.stack([p[candidates[i]] @ q[i] for i in range(2)])  # (2, 3)
    same = distillation_loss(q, p, candidates, cosines * 7, temperature=0.05, teacher_temperature=7 * 0.05)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    assert distillation_loss(q, p, candidates, -cosines, temperature=0.05, teacher_temperature=0.05).item() > 0.1


def test_matryoshka_sums_the_loss_of_each_renormalised_prefix():
    """training_loss over dims (6, 3) == weight 1 x the whole-vector loss + weight 0.5 x the loss of
    vectors cut to 3 coordinates and re-normalised with numpy."""
    q, p = unit(3, seed=7), unit(5, seed=8)
    settings = LossSettings(0.05, matryoshka_dims=(6, 3), matryoshka_weights=(1.0, 0.5))
    got = training_loss(q, p, BatchLabels(), settings)
    cut = [torch.from_numpy(x[:, :3] / np.linalg.norm(x[:, :3], axis=1, keepdims=True)) for x in (q.numpy(), p.numpy())]
    whole, _ = hand_loss(q, p, 0.05, [0, 1, 2], [set()] * 3)
    prefix, _ = hand_loss(*cut, 0.05, [0, 1, 2], [set()] * 3)
    assert got.loss.item() == pytest.approx(whole + 0.5 * prefix, rel=1e-12)
    assert training_loss(q, p, BatchLabels(), LossSettings(0.05)).loss.item() == pytest.approx(whole, rel=1e-12)


def test_distillation_without_teacher_scores_is_refused():
    with pytest.raises(ValueError, match="teacher scores"):
        training_loss(unit(2), unit(2), BatchLabels(), LossSettings(distill_weight=1.0))
