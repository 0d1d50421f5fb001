"""Mixed row widths in the token embedding (quant.embedding_hi_rows): the most used rows at embedding_hi_bits, the
rest at the embedding's bits, still int8 rows for the kernels; ranked on training audio by the float student."""

from __future__ import annotations

import pytest
import torch

from dqwhisper.models.student import load_checkpoint, save_checkpoint
from dqwhisper.quant import QuantSpec, prepare
from dqwhisper.quant.config import resolve_config
from dqwhisper.quant.export import export_model, load_exported, read_header
from dqwhisper.quant.fake_quant import WeightFakeQuantizer
from dqwhisper.quant.prepare import quantize_module_weight, widen_embedding_rows
from dqwhisper.train.calibrate import rank_embedding_rows
from dqwhisper.utils import DQWhisperError
from tests.quant.conftest import make_student
from tests.quant.test_int8_groups import _weight
from tests.quant.test_kernels import W4A8_INT8_GROUPS

HI_ROWS = {**W4A8_INT8_GROUPS, "embedding_hi_rows": 300, "embedding_hi_bits": 5}


def _quantized(spec, w, hi_rows=None):
    wfq = WeightFakeQuantizer(spec, w, lsq=True, hi_bits=None if hi_rows is None else 5)
    if hi_rows is not None:
        wfq.set_hi_rows(hi_rows)
    with torch.no_grad():
        return wfq(w), wfq


def test_each_row_is_quantized_as_a_quantizer_of_its_own_width_would():
    w = _weight(rows=40)
    spec4 = QuantSpec(4, True, "per_group_int8", 16)
    hi = torch.tensor([1, 5, 7, 30])
    mixed, wfq = _quantized(spec4, w, hi)
    all4, _ = _quantized(spec4, w)
    all5, _ = _quantized(QuantSpec(5, True, "per_group_int8", 16), w)
    narrow = torch.ones(40, dtype=torch.bool)
    narrow[hi] = False
    assert torch.equal(mixed[hi], all5[hi]) and torch.equal(mixed[narrow], all4[narrow])
    assert not torch.equal(mixed, all4)
    q, _, _ = wfq.codes(w)
    assert int(q[hi].min()) == -16 or int(q[hi].max()) == 15  # the wide rows use their wider grid
    assert -8 <= int(q[narrow].min()) and int(q[narrow].max()) <= 7
    m = wfq.multiplier
    assert int(m[hi].max()) <= 4 and int(m[narrow].max()) == 8  # 2^(7 - bits) per row
    assert int((q * m.unsqueeze(-1)).abs().max()) <= 64  # int8 rows within +-64


def test_lsq_scales_of_wide_and_narrow_rows_learn():
    w = _weight(rows=40)
    _, wfq = _quantized(QuantSpec(4, True, "per_group_int8", 16), w, torch.tensor([0, 3]))
    wfq.train()
    (wfq(w) - w * 1.1).pow(2).sum().backward()
    g = wfq.scale.grad
    assert g.shape == (40, 1) and bool((g[[0, 3]] != 0).all()) and bool((g[1:3] != 0).all())


def test_export_stores_narrow_and_wide_codes_and_reloads_exactly(tmp_path, inputs):
    mel, tokens = inputs
    plain = prepare(make_student(), W4A8_INT8_GROUPS)
    model = prepare(make_student(), HI_ROWS)
    rows = model.decoder.token_embedding.weight.shape[0]
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    assert widen_embedding_rows(model, order, HI_ROWS) == 300
    export_model(plain, tmp_path / "plain.dqw", float_dtype="float32")
    export_model(model, tmp_path / "m.dqw", float_dtype="float32")
    header, _ = read_header(tmp_path / "m.dqw")
    e = header["tensors"]["decoder.token_embedding"]
    width = e["shape"][1]
    assert e["bits"] == 4 and e["row_bits"]["hi"] == 5
    assert e["codes"]["nbytes"] == ((rows - 300) * width * 4 + 7) // 8
    assert e["codes_hi"]["nbytes"] == (300 * width * 5 + 7) // 8
    assert e["multiplier"]["bits"] == 3
    assert e["row_bits"]["nbytes"] == (rows + 7) // 8
    plain_e = read_header(tmp_path / "plain.dqw")[0]["tensors"]["decoder.token_embedding"]
    extra = e["codes"]["nbytes"] + e["codes_hi"]["nbytes"] - plain_e["codes"]["nbytes"]
    assert abs(extra - 300 * width // 8) <= 1  # one more bit per wide weight
    from dqwhisper.quant.size import dqw_tensors

    row = next(r for r in dqw_tensors(tmp_path / "m.dqw") if r["name"] == "decoder.token_embedding")
    assert row["format"] == "int4+5 per_group_int8/16"
    assert row["bytes"] == sum(e[k]["nbytes"] for k in ("codes", "codes_hi", "row_bits", "scale", "multiplier"))
    grown = (tmp_path / "m.dqw").stat().st_size - (tmp_path / "plain.dqw").stat().st_size
    assert grown <= extra + e["row_bits"]["nbytes"] + 3 * 64 + 256  # + alignment of two more blobs, header keys
    with torch.no_grad():
        ref = model.decoder(tokens, model.encoder(mel))
        exact = load_exported(tmp_path / "m.dqw", "dequant")
        assert torch.equal(exact.decoder(tokens, exact.encoder(mel)), ref)
        qt = exact.decoder.token_embedding.quantized_tensor()
        assert torch.equal(qt.row_bits, model.decoder.token_embedding.weight_fake_quantizer.row_bits)
        assert torch.equal(qt.codes, quantize_module_weight(model.decoder.token_embedding).codes)
        m = load_exported(tmp_path / "m.dqw", "fbgemm")
        out = m.decoder(tokens, m.encoder(mel))
        assert m.decoder.token_embedding.kernel == "fbgemm"
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out))
    err = float((out[finite] - ref[finite]).abs().max())
    assert err <= 0.02 * float(ref[finite].abs().max())  # test_int8_groups' whole-model int8 tolerance
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99


def test_checkpoint_keeps_the_row_widths(tmp_path, inputs):
    mel, tokens = inputs
    model = prepare(make_student(), HI_ROWS)
    widen_embedding_rows(model, torch.arange(299, -1, -1), HI_ROWS)
    save_checkpoint(model, tmp_path / "q.pt")
    back = load_checkpoint(tmp_path / "q.pt")
    wfq = back.decoder.token_embedding.weight_fake_quantizer
    assert int((wfq.row_bits == 5).sum()) == 300 and bool((wfq.row_bits[:300] == 5).all())
    with torch.no_grad():
        assert torch.equal(back.decoder(tokens, back.encoder(mel)), model.decoder(tokens, model.encoder(mel)))


def test_rows_are_ranked_targets_first_then_top_logits(inputs):
    mel, tokens = inputs
    model = make_student(vocab_keep=None)
    targets = torch.full_like(tokens, -100)
    targets[:, 3:6] = torch.tensor([700, 123, 700])
    batch = {"mel": mel, "tokens_in": tokens, "targets": targets, "window": model.dims.n_audio_ctx}
    order = rank_embedding_rows(model, [batch], "cpu", top=4)
    assert order[:2].tolist() == [700, 123]  # 4 and 2 target positions x 100
    with torch.no_grad():
        top = model(mel, tokens)[:, 3:6].topk(4, -1).indices.reshape(-1)
    seen = set(top.tolist()) | {700, 123}
    assert set(order[: len(seen)].tolist()) == seen  # then every id seen in the top 4, before the unseen


def test_pruned_students_rank_their_own_rows(inputs):
    mel, tokens = inputs
    model = make_student()  # the pruned vocabulary of conftest: ids 0..999 and the specials
    targets = torch.full_like(tokens, -100)
    targets[:, 2] = 50257  # eot: row 1000 of the pruned embedding
    order = rank_embedding_rows(
        model, [{"mel": mel, "tokens_in": tokens, "targets": targets, "window": model.dims.n_audio_ctx}], "cpu"
    )
    assert len(order) == model.decoder.token_embedding.weight.shape[0] and int(order[0]) == 1000


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"embedding_hi_bits": 4}, "above the embedding's 4 bits"),
        ({"embedding_hi_bits": 7}, "at most 6"),
        ({"embedding_hi_rows": -1}, "embedding_hi_rows"),
        ({"embedding_granularity": "per_group"}, "needs the embedding in per_group_int8"),
        ({"embedding_rank_utts": -2}, "embedding_rank_utts"),
    ],
)
def test_bad_settings_fail_clearly(extra, match):
    with pytest.raises(DQWhisperError, match=match):
        resolve_config({**HI_ROWS, **extra})


def test_widening_needs_a_model_prepared_for_it():
    model = prepare(make_student(), W4A8_INT8_GROUPS)
    with pytest.raises(DQWhisperError, match="no rows to widen"):
        widen_embedding_rows(model, torch.arange(10), HI_ROWS)


def test_ptq_cli_widens_the_rows_used_on_the_calibration_audio_and_can_drop_ctc(tmp_path, capsys):
    from dqwhisper.quant import ptq
    from tests.train.fixtures import write_data_dir

    data = write_data_dir(tmp_path / "data", n_per_lang=3)
    student = make_student(vocab_keep=None, ctc_units=20)
    save_checkpoint(student, tmp_path / "f.pt")
    args = [str(tmp_path / "f.pt"), "w4a8", str(tmp_path / "q.pt"), "embedding_hi_rows=50", "embedding_rank_utts=4"]
    assert ptq.main(args) != 0
    assert "--calib" in capsys.readouterr().err and not (tmp_path / "q.pt").exists()
    assert ptq.main(args + ["--calib", str(data / "train"), "--no-ctc"]) == 0
    q = load_checkpoint(tmp_path / "q.pt")
    assert q.ctc_head is None and q.ctc_units == 0
    assert q.quant_config["embedding_hi_rows"] == 50
    wide = (q.decoder.token_embedding.weight_fake_quantizer.row_bits == 5).nonzero()[:, 0]
    assert len(wide) == 50
    # the widened rows include every id of the calibration transcripts' targets (they rank first)
    from dqwhisper.data.dataset import WhisperDataset, default_tokenizer
    from dqwhisper.train.calibrate import calibration_batches

    ds = WhisperDataset(data / "train", default_tokenizer(student.dims.n_vocab), 80, student.dims.n_audio_ctx)
    targets = torch.cat([b["targets"][b["targets"] != -100] for b in calibration_batches(ds, 4)]).unique()
    assert len(targets) <= 50 and set(targets.tolist()) <= set(wide.tolist())
