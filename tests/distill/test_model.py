"""DistillModel: one forward -> the named losses; teacher targets from the live provider; the teacher stays out."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dqwhisper.config import LossConfig, MatchConfig, OnPolicyConfig
from dqwhisper.distill.model import DistillModel, feature_adapter
from dqwhisper.distill.teacher import CachedTargets, LiveTargets
from dqwhisper.models.student import from_whisper
from tests.conftest import random_tiny_whisper


def tiny_batch(n_mels: int = 80, n_audio_ctx: int = 100) -> dict:
    torch.manual_seed(0)
    tokens = torch.tensor(
        [[50258, 50259, 50359, 50363, 11, 12, 13, 50257], [50258, 50260, 50359, 50363, 21, 22, 50257, 50257]]
    )
    targets = tokens[:, 1:].clone()
    targets[:, :3] = -100  # the prefix
    targets[1, -1] = -100  # padding
    return {
        "mel": torch.randn(2, n_mels, 2 * n_audio_ctx),
        "tokens_in": tokens[:, :-1],
        "targets": targets,
        "ctc_targets": torch.tensor([1, 2, 3, 4, 5]),
        "ctc_target_lengths": torch.tensor([3, 2]),
        "enc_lengths": torch.tensor([100, 80]),
    }


def recording_teacher(teacher, record) -> LiveTargets:
    """A live teacher that calls record(batch, tokens_in, xa) with what it is given, then answers as usual."""

    class Recording(LiveTargets):
        def __call__(self, batch, tokens_in, xa, want_match, at=None, cross=None):
            record(batch, tokens_in, xa)
            return super().__call__(batch, tokens_in, xa, want_match, at, cross)

    return Recording(teacher, None)


@pytest.fixture
def pair():
    teacher = from_whisper(random_tiny_whisper(0)).eval().requires_grad_(False)
    student = from_whisper(teacher, ctc_units=10, decoder_layers=[0, 3])
    return student, teacher


def test_forward_returns_the_named_losses_and_their_sum(pair):
    student, teacher = pair
    loss = OmegaConf.structured(LossConfig(alpha=0.9, beta=0.1, match=MatchConfig(enabled=True)))
    model = DistillModel(
        student, loss, LiveTargets(teacher, None, match_feature="ffn"), feature_adapter(student, teacher, "ffn")
    )
    named, info = model.train()(tiny_batch())
    assert set(named) == {"loss", "loss_ce", "loss_ctc", "loss_kd", "loss_match"}
    assert all(bool(torch.isfinite(v)) and float(v) > 0 for v in named.values())
    expect = 0.1 * named["loss_ctc"] + 0.1 * named["loss_ce"] + 0.9 * (named["loss_kd"] + named["loss_match"])
    torch.testing.assert_close(named["loss"], expect)
    assert len(info["chosen"]) == 2 and info["n_tokens"] == 7
    named["loss"].backward()
    assert student.decoder.blocks[0].mlp[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())  # the teacher is not a submodule
    assert not student.encoder.training  # frozen encoder stays in eval mode


def test_without_teacher_or_alpha_zero_only_ce_and_ctc(pair):
    student, teacher = pair
    model = DistillModel(student, OmegaConf.structured(LossConfig(alpha=0.9, beta=0.1)), LiveTargets(teacher, None))
    named, _ = model.eval()(tiny_batch(), with_teacher=False)
    assert float(named["loss_kd"]) == 0 and float(named["loss_match"]) == 0
    torch.testing.assert_close(named["loss"], 0.1 * named["loss_ctc"] + named["loss_ce"])


def test_cached_targets_read_the_batch(pair):
    student, teacher = pair
    live = LiveTargets(teacher, None, match_feature="block")
    batch = tiny_batch()
    xa = teacher.encoder(batch["mel"])
    out = live.outputs(batch["tokens_in"], xa)
    batch.update(t_logits=out["t_logits"], t_feats=list(out["t_feats"]))
    cached = CachedTargets(teacher, None, match_feature="block")(batch, batch["tokens_in"], xa, want_match=True)
    again = live(batch, batch["tokens_in"], xa, want_match=True)
    torch.testing.assert_close(cached["t_logits"], again["t_logits"])
    assert len(cached["t_feats"]) == len(again["t_feats"]) == teacher.dims.n_text_layer
    # at the counted positions: (N, K), as a live teacher gives them
    from dqwhisper import losses

    mask = batch["targets"] != losses.IGNORE
    cached_at = CachedTargets(teacher, None)(batch, batch["tokens_in"], xa, want_match=False, at=mask)
    live_at = live(batch, batch["tokens_in"], xa, want_match=False, at=mask)
    assert cached_at["t_logits"].shape[0] == int(mask.sum()) < mask.numel()
    torch.testing.assert_close(cached_at["t_logits"], live_at["t_logits"])


@pytest.mark.parametrize("topk", [0, 5])
def test_logits_only_at_counted_positions_give_the_losses_and_gradients_of_all_positions(pair, topk):
    """Training projects onto the vocabulary only where CE/KD count (decoder.logits_at): the same losses and
    gradients as the whole (B, L, V) projection, on a batch with prompt and padding positions."""
    student, teacher = pair
    loss = OmegaConf.structured(LossConfig(alpha=0.5, beta=0.0, label_smoothing=0.1))
    model = DistillModel(student, loss, LiveTargets(teacher, None, kd_topk=topk)).train()
    batch = tiny_batch()
    named, _ = model(batch)
    named["loss"].backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    from dqwhisper import losses

    xa = student.encoder(batch["mel"]).detach()
    logits = student.decoder(batch["tokens_in"], xa)  # (B, L, V): every position
    assert logits.shape[:2] == batch["tokens_in"].shape
    mask = batch["targets"] != losses.IGNORE
    t = LiveTargets(teacher, None, kd_topk=topk)(batch, batch["tokens_in"], xa, want_match=False)
    ce = losses.ce(logits, batch["targets"], 0.1)
    kd = losses.kd_logits(logits, t["t_logits"], mask, 1.0, teacher_index=t.get("t_index"))
    torch.testing.assert_close(named["loss_ce"], ce)
    torch.testing.assert_close(named["loss_kd"], kd)
    (0.5 * ce + 0.5 * kd).backward()
    for n, p in student.named_parameters():
        if n in got:
            torch.testing.assert_close(got[n], p.grad, msg=n)
    assert student.decoder.logit_mask is None and not student.decoder.subset_logits  # restored after the forward


def test_decoder_dropout_acts_in_training_only(pair):
    student, _ = pair
    batch = tiny_batch()
    xa = student.encoder(batch["mel"]).detach()
    dec = student.decoder
    ref = dec.eval()(batch["tokens_in"], xa)
    dec.dropout = 0.3
    torch.testing.assert_close(dec.eval()(batch["tokens_in"], xa), ref)  # decoding: no dropout
    torch.manual_seed(1)
    a = dec.train()(batch["tokens_in"], xa)
    b, _, _ = dec.forward_features(batch["tokens_in"], xa)
    assert not torch.allclose(a, ref) and not torch.allclose(a, b)  # a fresh mask each pass, in both paths
    dec.dropout = 0.0
    torch.testing.assert_close(dec.train()(batch["tokens_in"], xa), ref)


def test_feature_masks_reach_the_students_decoder_in_training_only(pair):
    """data.feature_mask: the decoder reads the encoder output with time masks (zeros) inside each row's audio
    positions; the teacher and the CTC head read it unmasked; eval reads it unmasked."""
    student, teacher = pair
    seen = {}

    recording = recording_teacher(teacher, lambda batch, tokens_in, xa: seen.__setitem__("teacher", xa.clone()))
    hook = student.decoder.register_forward_pre_hook(lambda mod, args: seen.__setitem__("decoder", args[1].clone()))
    loss = OmegaConf.structured(LossConfig(alpha=0.5, beta=0.1))
    model = DistillModel(student, loss, recording, feature_mask=(2, 30))
    batch = tiny_batch()
    clean = student.encoder(batch["mel"])
    torch.manual_seed(3)
    named, _ = model.train()(batch)
    assert torch.isfinite(named["loss"])
    torch.testing.assert_close(seen["teacher"], clean)
    zero = (seen["decoder"] == 0).all(-1)  # (B, T): masked positions
    changed = ~torch.isclose(seen["decoder"], clean).all(-1)
    assert torch.equal(zero, changed)  # what changed is whole positions set to 0
    assert 0 < int(zero[0].sum()) <= 60 and 0 < int(zero[1].sum()) <= 60
    assert not zero[1, 80:].any()  # row 1 has 80 audio positions of 100: nothing past them is masked
    model.eval()(batch)
    torch.testing.assert_close(seen["decoder"], clean)
    hook.remove()
    plain = DistillModel(student, loss, recording)  # default: no masks
    plain.train()(batch)
    torch.testing.assert_close(seen["decoder"], clean)


def test_a_masking_teacher_reads_what_the_students_decoder_reads(pair):
    """data.feature_mask.teacher=true (consistent teaching): the teacher's targets come from the same masked encoder
    output as the student's decoder reads, with fresh masks every step."""
    student, teacher = pair
    seen = {}

    recording = recording_teacher(
        teacher, lambda batch, tokens_in, xa: seen.setdefault("teacher", []).append(xa.clone())
    )
    hook = student.decoder.register_forward_pre_hook(
        lambda mod, args: seen.setdefault("decoder", []).append(args[1].clone())
    )
    loss = OmegaConf.structured(LossConfig(alpha=0.5, beta=0.1))
    model = DistillModel(student, loss, recording, feature_mask=(2, 30), mask_teacher=True)
    batch = tiny_batch()
    clean = student.encoder(batch["mel"])
    torch.manual_seed(3)
    model.train()(batch)
    model.train()(batch)
    hook.remove()
    for t_xa, s_xa in zip(seen["teacher"], seen["decoder"]):
        torch.testing.assert_close(t_xa, s_xa)
        assert (t_xa == 0).all(-1).any() and not torch.equal(t_xa, clean)
    assert not torch.equal(seen["decoder"][0], seen["decoder"][1])


def test_prefix_noise_replaces_fed_back_labels_with_batch_tokens_for_student_and_teacher(pair):
    """data.prefix_noise: in training, text tokens of the decoder's input (not the prompt, not the padding) are
    replaced by text tokens of the batch; a live teacher reads the same history; the targets stay the labels."""
    student, teacher = pair
    seen = {}

    recording = recording_teacher(teacher, lambda batch, tokens_in, xa: seen.__setitem__("teacher", tokens_in.clone()))
    hook = student.decoder.register_forward_pre_hook(lambda mod, args: seen.__setitem__("decoder", args[0].clone()))
    loss = OmegaConf.structured(LossConfig(alpha=0.5, beta=0.1))
    model = DistillModel(student, loss, recording, prefix_noise=1.0)
    batch = tiny_batch()
    clean = batch["tokens_in"]
    text = torch.zeros_like(clean, dtype=torch.bool)
    text[0, 4:7] = True
    text[1, 4:6] = True  # row 1: position 6 is the end-of-text after its last label, fed as padding
    changed = torch.zeros_like(text)
    for seed in range(5):
        torch.manual_seed(seed)
        model.train()(batch)
        torch.testing.assert_close(seen["teacher"], seen["decoder"])
        torch.testing.assert_close(seen["decoder"][~text], clean[~text])
        assert set(seen["decoder"][text].tolist()) <= {11, 12, 13, 21, 22}
        changed |= seen["decoder"] != clean
    assert changed[text].sum() >= 3
    model.eval()(batch)
    torch.testing.assert_close(seen["decoder"], clean)
    torch.testing.assert_close(batch["tokens_in"], clean)  # the batch itself is not modified
    hook.remove()


@pytest.mark.parametrize("topk", [0, 5])
def test_a_live_teacher_at_the_counted_positions_gives_those_positions_targets(pair, topk):
    """LiveTargets(at=mask): the teacher projects onto the vocabulary only where the losses count; the same logits
    (and top-k indices) as its whole (B, L, K) output at those positions, and the same matching features."""
    from dqwhisper import losses

    _, teacher = pair
    batch = tiny_batch()
    xa = teacher.encoder(batch["mel"])
    mask = batch["targets"] != losses.IGNORE
    live = LiveTargets(teacher, None, kd_topk=topk, match_feature="ffn")
    full = live(batch, batch["tokens_in"], xa, want_match=True)
    at = live(batch, batch["tokens_in"], xa, want_match=True, at=mask)
    assert at["t_logits"].shape[0] == int(mask.sum())
    torch.testing.assert_close(at["t_logits"], full["t_logits"][mask])
    if topk:
        torch.testing.assert_close(at["t_index"], full["t_index"][mask])
    for a, b in zip(at["t_feats"], full["t_feats"]):
        torch.testing.assert_close(a, b)
    assert teacher.decoder.logit_mask is None


def test_a_masking_teacher_on_its_own_longer_window_gets_the_same_time_positions_masked(pair):
    """The teacher's own cached encoder output (`t_enc`, its whole window) is longer than the student's windowed
    one (`enc`): the masked positions are the same 20 ms positions from the start; the rest of its window stays."""
    student, teacher = pair
    seen = {}

    recording = recording_teacher(
        teacher, lambda batch, tokens_in, xa: seen.__setitem__("t_enc", batch["t_enc"].clone())
    )
    hook = student.decoder.register_forward_pre_hook(lambda mod, args: seen.__setitem__("decoder", args[1].clone()))
    batch = tiny_batch()
    full = teacher.encoder(batch["mel"])  # (2, 100, d): the teacher's whole window
    batch.pop("mel")
    batch.update(enc=full[:, :75].clone(), t_enc=full.clone(), enc_lengths=torch.tensor([75, 60]))
    loss = OmegaConf.structured(LossConfig(alpha=0.5, beta=0.0))
    model = DistillModel(student, loss, recording, feature_mask=(2, 20), mask_teacher=True)
    torch.manual_seed(5)
    model.train()(batch)
    hook.remove()
    zero_s = (seen["decoder"] == 0).all(-1)
    zero_t = (seen["t_enc"] == 0).all(-1)
    assert zero_s.any()
    assert torch.equal(zero_t[:, :75], zero_s) and not zero_t[:, 75:].any()
    torch.testing.assert_close(seen["t_enc"][~zero_t], full[~zero_t])


def greedy_reference(student, tokens_in, mask, xa, eot: int, extra: int) -> list[list[int]]:
    """Each row decoded alone through the student's plain full-vocabulary forward: greedy over text tokens and
    end-of-text, from its prompt, to end-of-text or its label's length (with end-of-text) + `extra` tokens."""
    out = []
    for b in range(tokens_in.shape[0]):
        p = int(mask[b].float().argmax())
        toks = tokens_in[b, : p + 1].tolist()
        for _ in range(int(mask[b].sum()) + extra):
            with torch.no_grad():
                logits = student.decoder(torch.tensor([toks]), xa[b : b + 1])[0, -1]
            logits[eot + 1 :] = float("-inf")
            toks.append(int(logits.argmax()))
            if toks[-1] == 50257:
                break
        out.append(toks)
    return out


@pytest.mark.parametrize("boost", [None, 1.05, 1.2])  # rows to the cap; one ending early; both at once
def test_on_policy_hypotheses_are_the_students_greedy_decode(pair, boost):
    """loss.on_policy: the hypotheses are what greedy decoding of the student gives, row by row, and the learnt
    positions are the last prompt token and every decoded text token (not end-of-text, not padding)."""
    student, teacher = pair
    if boost is not None:  # end-of-text's row a multiple of a token's the student says: rows end early, at once
        with torch.no_grad():
            student.decoder.token_embedding.weight[50257] = boost * student.decoder.token_embedding.weight[16036]
    loss = OmegaConf.structured(LossConfig(alpha=0.5, on_policy=OnPolicyConfig(weight=0.5, extra_tokens=6)))
    model = DistillModel(student, loss, LiveTargets(teacher, None), eot=50257).train()
    batch = tiny_batch()
    xa = student.encoder(batch["mel"]).detach()
    mask = batch["targets"] != -100
    tokens, learn = model._hypotheses(batch["tokens_in"], mask, xa, None)
    assert student.decoder.training  # restored after decoding in eval mode
    ref = greedy_reference(student.eval(), batch["tokens_in"], mask, xa, 50257, extra=6)
    for b, want in enumerate(ref):
        got = tokens[b].tolist()
        assert got[: len(want)] == want and all(t == 50257 for t in got[len(want) :])
        text = [t for t in want[4:] if t != 50257]
        assert learn[b].nonzero().squeeze(1).tolist() == list(range(3, 4 + len(text)))
    lengths = learn.sum(1).tolist()
    assert lengths == {None: [11, 10], 1.05: [5, 10], 1.2: [1, 1]}[boost]  # the cases this test means to cover


def test_on_policy_kd_is_the_teachers_kl_on_the_hypotheses_and_mixes_into_kd(pair):
    student, teacher = pair
    batch = tiny_batch()
    seen = []
    mix = OmegaConf.structured(LossConfig(alpha=0.5, beta=0.0, on_policy=OnPolicyConfig(weight=0.25)))
    model = DistillModel(student, mix, recording_teacher(teacher, lambda b, t, x: seen.append(t)), eot=50257)
    named, info = model.train()(batch)
    torch.testing.assert_close(named["loss_kd"], 0.75 * named["loss_kd_labels"] + 0.25 * named["loss_kd_on_policy"])
    torch.testing.assert_close(named["loss"], 0.5 * named["loss_ce"] + 0.5 * named["loss_kd"])
    # the teacher read the labels, then the student's hypotheses
    xa = student.encoder(batch["mel"]).detach()
    mask = batch["targets"] != -100
    tokens, learn = model._hypotheses(batch["tokens_in"], mask, xa, None)
    assert torch.equal(seen[0], batch["tokens_in"]) and torch.equal(seen[1], tokens)
    assert info["n_on_policy"] == int(learn.sum()) > info["n_tokens"]  # the untrained student runs to the cap
    from dqwhisper import losses

    s = student.decoder(tokens, xa)
    t = teacher.decoder(tokens, xa)
    torch.testing.assert_close(named["loss_kd_on_policy"], losses.kd_logits(s, t, learn, 1.0), rtol=1e-4, atol=1e-5)
    named["loss"].backward()
    assert student.decoder.blocks[-1].mlp[0].weight.grad is not None
    # dev (eval) and the teacher-forced loss: no hypotheses
    named, info = model.eval()(batch)
    assert "loss_kd_on_policy" not in named and "n_on_policy" not in info


def test_a_student_equal_to_its_teacher_has_no_on_policy_kd(pair):
    _, teacher = pair
    student = from_whisper(teacher)  # every layer copied: the same distributions on any history
    loss = OmegaConf.structured(LossConfig(alpha=1.0, beta=0.0, on_policy=OnPolicyConfig(weight=1.0)))
    named, info = DistillModel(student, loss, LiveTargets(teacher, None), eot=50257).train()(tiny_batch())
    assert info["n_on_policy"] > 0 and float(named["loss_kd_on_policy"]) < 1e-6


def test_on_policy_leaves_the_label_terms_as_they_were(pair):
    """With loss.on_policy the label passes keep their cross-attention keys and values for the hypothesis passes:
    CE, KD on the labels, matching and their gradients stay what they are without it."""
    student, teacher = pair
    batch = tiny_batch()
    got = {}
    for w in (0.0, 0.5):
        cfg = LossConfig(alpha=0.5, beta=0.1, match=MatchConfig(enabled=True), on_policy=OnPolicyConfig(weight=w))
        adapter = feature_adapter(student, teacher, "ffn")
        torch.manual_seed(1)
        model = DistillModel(
            student, OmegaConf.structured(cfg), LiveTargets(teacher, None, match_feature="ffn"), adapter, eot=50257
        )
        named, _ = model.train()(batch)
        student.zero_grad()
        (0.5 * named["loss_ce"] + named["loss_match"]).backward()
        got[w] = named, student.decoder.blocks[0].cross_attn.key.weight.grad.clone()
    (off, g_off), (on, g_on) = got[0.0], got[0.5]
    for k in ("loss_ce", "loss_ctc", "loss_match"):
        torch.testing.assert_close(on[k], off[k], msg=k)
    torch.testing.assert_close(on["loss_kd_labels"], off["loss_kd"])
    torch.testing.assert_close(g_on, g_off)
