import math

import pytest
import torch
import torch.nn.functional as F

from dqwhisper import losses


def test_ce_ignores_padding_and_prefix():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    targets = torch.tensor([[-100, 3, 5, -100], [1, 2, -100, -100]])
    want = (
        -(F.log_softmax(logits[0, 1], -1)[3])
        - F.log_softmax(logits[0, 2], -1)[5]
        - F.log_softmax(logits[1, 0], -1)[1]
        - F.log_softmax(logits[1, 1], -1)[2]
    ) / 4
    assert torch.allclose(losses.ce(logits, targets), want)
    # padding logits do not matter
    logits2 = logits.clone()
    logits2[0, 3] = 1e4
    assert torch.allclose(losses.ce(logits2, targets), want)
    assert torch.allclose(losses.ce(logits, targets, normalizer=2.0), want * 2)


def test_ce_label_smoothing_changes_loss():
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[0, 1, -100]])
    assert not torch.allclose(losses.ce(logits, targets), losses.ce(logits, targets, label_smoothing=0.1))


def test_kd_against_hand_computation():
    T = 2.0
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    ps = [math.exp(x / T) for x in (1.0, 0.0, -1.0)]
    pt = [math.exp(x / T) for x in (0.0, 2.0, 0.0)]
    ps = [x / sum(ps) for x in ps]
    pt = [x / sum(pt) for x in pt]
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    assert losses.kd_logits(s, t, mask, T).item() == pytest.approx(T * T * kl, rel=1e-6)
    both = torch.tensor([[True, True]])
    assert losses.kd_logits(t, t, both, T).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_topk_equals_full_when_k_is_vocab():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    vals, idx = t.topk(6, dim=-1)
    assert torch.allclose(losses.kd_logits(s, vals, mask, 1.5, teacher_index=idx), losses.kd_logits(s, t, mask, 1.5))
    vals, idx = t.topk(2, dim=-1)
    assert losses.kd_logits(s, vals, mask, 1.5, teacher_index=idx).item() > 0


def test_ctc_on_padded_batch_matches_per_utterance():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 10, 5, generator=g)
    enc_lengths = torch.tensor([10, 6])
    targets = torch.tensor([1, 2, 3, 4, 2])
    target_lengths = torch.tensor([3, 2])
    got = losses.ctc(logits, enc_lengths, targets, target_lengths)
    per = []
    for b, (n, tgt) in enumerate([(10, [1, 2, 3]), (6, [4, 2])]):
        lp = F.log_softmax(logits[b, :n], -1).unsqueeze(1)
        per.append(F.ctc_loss(lp, torch.tensor([tgt]), torch.tensor([n]), torch.tensor([len(tgt)]), reduction="sum"))
    assert torch.allclose(got, (per[0] + per[1]) / 5)
    # frames past enc_lengths do not matter
    logits2 = logits.clone()
    logits2[1, 6:] = 50.0
    assert torch.allclose(losses.ctc(logits2, enc_lengths, targets, target_lengths), got)
    # impossible alignment (more targets than frames) is zeroed, not inf
    bad = losses.ctc(logits[:1, :2], torch.tensor([2]), torch.tensor([1, 2, 3]), torch.tensor([3]))
    assert torch.isfinite(bad)


def test_combine_dict_and_weights():
    ce, ctc, kd, match = (torch.tensor(x) for x in (2.0, 3.0, 5.0, 7.0))
    out = losses.combine(ce, ctc, kd, match, alpha=0.25, beta=0.1, lambda_match=0.5)
    assert set(out) == {"loss", "loss_ce", "loss_ctc", "loss_kd", "loss_match"}
    assert out["loss"].item() == pytest.approx(0.1 * 3 + 0.75 * 2 + 0.25 * (5 + 0.5 * 7))
    out = losses.combine(ce=ce, alpha=0.0)
    assert out["loss"].item() == pytest.approx(2.0) and out["loss_kd"].item() == 0.0
    with pytest.raises(ValueError):
        losses.combine()
