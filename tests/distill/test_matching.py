import pytest
import torch

from dqwhisper.distill.matching import (
    FeatureAdapter,
    choose,
    distance_matrix,
    match_loss,
    position_distance,
    static_choice,
)

# rows: student layers, columns: teacher layers
DIST = torch.tensor(
    [
        [5.0, 1.0, 3.0, 0.5, 9.0, 9.0],  # global argmin 3
        [0.1, 4.0, 2.0, 7.0, 6.0, 8.0],  # global argmin 0 (behind the previous choice)
        [9.0, 9.0, 9.0, 9.0, 2.0, 1.0],  # argmin 5
    ]
)


def test_static_is_2i_plus_1_clipped():
    assert static_choice(3, 12) == [1, 3, 5]
    assert static_choice(4, 6) == [1, 3, 5, 5]
    assert choose(DIST, "static") == [1, 3, 5]
    assert choose(None, "static", 2, 2) == [1, 1]


def test_dynamic_nolimit_takes_global_argmin():
    assert choose(DIST, "dynamic_nolimit") == [3, 0, 5]


def test_dynamic_limit_is_greedy_from_previous_choice_inclusive():
    # row 1 may not go back to 0: it searches columns 3..5 -> 7, 6, 8 -> column 4
    assert choose(DIST, "dynamic_limit") == [3, 4, 5]
    # inclusive: a later student layer may take the same teacher layer
    d = torch.tensor([[3.0, 0.0, 5.0], [9.0, 1.0, 2.0], [0.0, 4.0, 4.0]])
    assert choose(d, "dynamic_limit") == [1, 1, 1]


def test_dynamic_limit_monotonic_on_random_matrices():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        s, t = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        d = torch.rand(s, t, generator=g)
        c = choose(d, "dynamic_limit")
        assert all(a <= b for a, b in zip(c, c[1:]))
        # greedy: each choice is the argmin of its row from the previous choice on
        pre = 0
        for i, j in enumerate(c):
            assert d[i, j] == d[i, pre:].min()
            pre = j
        # never better than unconstrained
        assert d[range(s), c].sum() >= d[range(s), choose(d, "dynamic_nolimit")].sum()


def test_unknown_mode_raises():
    with pytest.raises(ValueError):
        choose(DIST, "dynamic")


def test_softmax_mse_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])
    ps, pt = torch.softmax(s / 2.0, -1), torch.softmax(t / 2.0, -1)
    want = ((ps - pt) ** 2).sum()
    assert torch.allclose(position_distance(s, t, "softmax_mse", 2.0), want.reshape(1))
    assert torch.allclose(position_distance(s, t, "mse"), torch.tensor([8.0 / 3]))
    assert torch.allclose(position_distance(s, s, "cosine"), torch.zeros(1), atol=1e-6)


def _features(n, seed, B=2, L=5, D=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, D, generator=g) for _ in range(n)]


def test_match_picks_planted_teacher_layers_and_gradient_only_through_chosen():
    teacher = _features(6, 1)
    student = [
        (teacher[4] + 0.01 * torch.randn_like(teacher[4])).requires_grad_(),
        (teacher[2] + 0.01 * torch.randn_like(teacher[2])).requires_grad_(),
    ]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss, chosen, dist = match_loss(student, teacher, mask, mode="dynamic_nolimit", kind="mse")
    assert chosen == [4, 2]
    loss, chosen, dist = match_loss(student, teacher, mask, mode="dynamic_limit", kind="mse")
    assert chosen[0] == 4 and chosen[1] >= 4  # monotonic: may not go back to 2
    # the loss equals the mean over student layers of the chosen pairs' masked mean distance
    m = mask.float()
    want = sum(((student[i] - teacher[j]) ** 2).mean(-1).mul(m).sum() / m.sum() for i, j in enumerate(chosen)) / 2
    assert torch.allclose(loss, want)
    assert torch.allclose(dist[0, chosen[0]], ((student[0] - teacher[chosen[0]]) ** 2).mean(-1).mul(m).sum() / m.sum())
    # padding does not count
    student2 = [s.detach().clone() for s in student]
    student2[0][1, 4] += 100.0
    loss2, _, _ = match_loss(student2, teacher, mask, mode="dynamic_limit", kind="mse")
    assert torch.allclose(loss2, loss.detach())
    teacher_p = [t.clone().requires_grad_() for t in teacher]
    loss, chosen, _ = match_loss(student, teacher_p, mask, mode="dynamic_limit")
    loss.backward()
    assert all(s.grad is not None for s in student)
    assert all(t.grad is None for t in teacher_p)  # teacher features are targets


def test_adapter_maps_teacher_width_and_trains():
    teacher = _features(4, 2, D=12)
    student = [s.requires_grad_() for s in _features(2, 3, D=8)]
    adapter = FeatureAdapter(2, 12, 8)
    loss, chosen, dist = match_loss(student, teacher, None, mode="dynamic_limit", adapter=adapter)
    assert dist.shape == (2, 4)
    loss.backward()
    assert adapter.maps[0].weight.grad is not None and adapter.maps[0].weight.grad.abs().sum() > 0
    assert FeatureAdapter(2, 8, 8).identity


def test_distance_matrix_sums_over_mask():
    teacher, student = _features(3, 4), _features(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 0] = True
    d = distance_matrix(student, teacher, mask, "cosine")
    for i in range(2):
        for j in range(3):
            assert torch.allclose(d[i, j], position_distance(student[i][0, 0], teacher[j][0, 0], "cosine"))
