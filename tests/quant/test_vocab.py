"""Vocabulary pruning: selection from data dirs, and teacher / student / export consistency."""

from __future__ import annotations

import json

import torch
import whisper

from dqwhisper.data.dataset import default_tokenizer, text_ids
from dqwhisper.data.kaldi import Utterance, write_data_dir
from dqwhisper.models.student import from_whisper
from dqwhisper.data.vocab import gather_teacher_logits, main, single_byte_tokens, vocab_from_data_dirs
from dqwhisper.quant import prepare
from dqwhisper.quant.export import export_model, load_exported
from tests.quant.conftest import make_student


def write_dir(path):
    utts = [
        Utterance("a1", "a1.wav", "hello world", "spk", "en"),
        Utterance("b1", "b1.wav", "こんにちは世界", "spk2", "ja"),
        Utterance("c1", "c1.wav", "guten Tag", "spk3", "de"),
    ]
    write_data_dir(path, utts)
    return utts


def test_selection_keeps_used_special_and_byte_tokens(tmp_path):
    utts = write_dir(tmp_path / "train")
    tok = default_tokenizer()
    keep = vocab_from_data_dirs([tmp_path / "train"], languages=["en", "ja"])
    used = set(text_ids(tok, utts[0].text, "en")) | set(text_ids(tok, utts[1].text, "ja"))
    assert used <= set(keep)
    assert set(range(tok.eot, tok.encoding.n_vocab)) <= set(keep)  # every special token
    assert set(single_byte_tokens(tok)) <= set(keep) and len(single_byte_tokens(tok)) == 256
    german_only = set(text_ids(tok, utts[2].text, "de")) - used - set(single_byte_tokens(tok))
    assert german_only and not german_only & set(keep)  # languages filter: the German-only tokens are pruned
    assert keep == sorted(set(keep))
    no_bytes = vocab_from_data_dirs([tmp_path / "train"], languages=["en", "ja"], byte_tokens=False)
    assert len(no_bytes) < len(keep)
    assert main([str(tmp_path / "train"), "--out", str(tmp_path / "k.json")]) == 0
    assert json.loads((tmp_path / "k.json").read_text()) == vocab_from_data_dirs([tmp_path / "train"])


def test_pruned_student_matches_teacher_on_kept_ids_and_decodes_consistently(tmp_path, inputs):
    mel, tokens = inputs
    teacher = make_student(vocab_keep=None)
    keep = torch.tensor(sorted(set(range(1000)) | set(range(50257, 51865))))
    student = from_whisper(teacher, vocab_keep=keep.tolist()).eval()
    with torch.no_grad():
        xa = teacher.encoder(mel)
        t_logits = teacher.decoder(tokens, xa)
        student.decoder.subset_logits = True
        s_sub = student.decoder(tokens, xa)
        student.decoder.subset_logits = False
        s_full = student.decoder(tokens, xa)
    torch.testing.assert_close(s_sub, gather_teacher_logits(t_logits, keep), atol=1e-5, rtol=1e-5)  # KD targets
    pruned = torch.ones(51865, dtype=torch.bool)
    pruned[keep] = False
    assert bool(torch.isneginf(s_full[..., pruned]).all())
    torch.testing.assert_close(s_full[..., keep], s_sub)
    # decoding on the pruned student never emits a pruned id
    opts = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=8)
    res_s = whisper.decode(student, mel[0], opts)
    assert all(int(t) in set(keep.tolist()) for t in res_s.tokens)
    # export keeps the id map: the reloaded model gives the same full-vocabulary logits
    prepare(student, {"enabled": True})
    with torch.no_grad():
        ref = student.decoder(tokens, xa)
    export_model(student, tmp_path / "p.dqw", float_dtype="float32")
    loaded = load_exported(tmp_path / "p.dqw")
    with torch.no_grad():
        torch.testing.assert_close(loaded.decoder(tokens, xa), ref, atol=0, rtol=0)
    assert torch.equal(loaded.decoder.vocab_keep, keep)
