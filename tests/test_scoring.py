"""Scoring: WER / CER against hand-counted edits, normalizers, per-language and overall aggregation, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from dqwhisper.data.kaldi import Utterance, write_data_dir
from dqwhisper.scoring import (
    format_table,
    main,
    normalize,
    read_kaldi_text,
    score_utterances,
    summarize,
    write_kaldi_text,
    write_results,
)
from dqwhisper.utils import DQWhisperError


def one(ref: str, hyp: str, lang: str = "de", raw: bool = False):
    scores, _ = score_utterances({"u": ref}, {"u": hyp}, {"u": lang}, raw=raw)
    return scores[0]


def test_wer_hand_counted():
    # the cat sat on the mat -> the cat sit on mat: sat->sit (S), the (D); 6 reference words
    s = one("the cat sat on the mat", "the cat sit on mat")
    assert (s.metric, s.n_ref, s.substitutions, s.deletions, s.insertions) == ("wer", 6, 1, 1, 0)
    s = one("a b", "x a b c")
    assert (s.substitutions, s.deletions, s.insertions) == (0, 0, 2)


def test_english_normalizer_vs_raw():
    assert one("Hello, World!", "hello world", "en").errors == 0
    raw = one("Hello, World!", "hello world", "en", raw=True)
    assert (raw.n_ref, raw.substitutions) == (2, 2)
    assert normalize("Mr. Smith has 2 cats.", "en") == "mister smith has 2 cats"
    assert normalize("¿Dónde está? Sí.", "es") == "dónde está sí"  # basic normalizer keeps accents


def test_cer_removes_spaces():
    # 今日は いい天気 -> 7 characters once the space is gone; one inserted character
    s = one("今日は、いい天気。", "今日はいい天気だ", "ja")
    assert (s.metric, s.n_ref, s.insertions, s.errors) == ("cer", 7, 1, 1)
    assert one("今日 は", "今日は", "zh").errors == 0  # spaces never count in CER


def test_summary_pooled_and_macro():
    refs = {"e1": "red green blue black", "e2": "white pink", "j1": "あいうえお", "j2": "かきくけこさ"}
    hyps = {"e1": "red green glue black", "e2": "white pink", "j1": "あいうえ", "j2": "かきくけこさし"}
    langs = {"e1": "en", "e2": "en", "j1": "ja", "j2": "ja"}
    scores, alignments = score_utterances(refs, hyps, langs)
    summary = summarize(scores)
    en, ja = summary["per_language"]["en"], summary["per_language"]["ja"]
    assert (en["metric"], en["n_utts"], en["n_errors"], en["n_ref_units"]) == ("wer", 2, 1, 6)
    assert (ja["metric"], ja["n_utts"], ja["n_errors"], ja["n_ref_units"]) == ("cer", 2, 2, 11)
    assert en["error"] == pytest.approx(1 / 6) and ja["error"] == pytest.approx(2 / 11)
    o = summary["overall"]
    assert o["metric"] == "mixed" and o["n_utts"] == 4
    assert o["error"] == pytest.approx(3 / 17)  # pooled: (1 + 2) / (6 + 11)
    assert o["macro_error"] == pytest.approx((1 / 6 + 2 / 11) / 2)
    assert set(alignments) == set(refs) and alignments["j1"].startswith("REF:")
    assert alignments["e2"].splitlines()[:2] == ["REF: white pink", "HYP: white pink"]  # correct ones shown too
    table = format_table(summary)
    assert "16.67" in table and "18.18" in table and "17.65" in table


def test_missing_and_extra_hypotheses():
    scores, _ = score_utterances({"a": "x y", "b": "z"}, {"a": "x y"}, {"a": "en", "b": "en"})
    assert [s.deletions for s in scores] == [0, 1]
    with pytest.raises(DQWhisperError, match="no reference"):
        score_utterances({"a": "x"}, {"a": "x", "zz": "y"}, {"a": "en"})


def test_write_results_files(tmp_path):
    scores, alignments = score_utterances({"a": "one two"}, {"a": "one three"}, {"a": "de"})
    summary = {**summarize(scores), "rtf": 0.25, "tokens_per_second": 10.0}
    table = write_results(tmp_path, scores, alignments, summary)
    assert "RTF 0.2500" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["per_language"]["de"]["error"] == 0.5
    rows = (tmp_path / "utt_errors.tsv").read_text().splitlines()
    assert rows[1].split("\t")[:8] == ["a", "de", "wer", "2", "1", "0", "0", "1"]
    assert "a (de, wer: 1 errors / 2)\nREF: one   two\nHYP: one three\n" in (tmp_path / "alignment.txt").read_text()
    assert (tmp_path / "summary.txt").read_text().strip() == table


def test_kaldi_text_round_trip(tmp_path):
    write_kaldi_text(tmp_path / "t", {"b": "two  words", "a": ""})
    assert (tmp_path / "t").read_text() == "a\nb two words\n"
    assert read_kaldi_text(tmp_path / "t") == {"a": "", "b": "two words"}


def test_cli_rescores_a_hyp_file(tmp_path, capsys):
    wav = tmp_path / "x.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    write_data_dir(
        tmp_path / "data",
        [Utterance("u1", str(wav), "guten Tag", "s", "de"), Utterance("u2", str(wav), "猫です", "s", "ja")],
    )
    write_kaldi_text(tmp_path / "hyp.txt", {"u1": "guten tag", "u2": "犬です"})
    main(
        [
            "--data",
            str(tmp_path / "data"),
            "--hyp",
            str(tmp_path / "hyp.txt"),
            "--out",
            str(tmp_path / "out"),
            "--extra",
            '{"rtf": 0.5}',
        ]
    )
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["per_language"]["de"] == {**data["per_language"]["de"], "metric": "wer", "error": 0.0, "n_utts": 1}
    assert data["per_language"]["ja"]["error"] == pytest.approx(1 / 3)
    assert data["rtf"] == 0.5
    assert "overall" in capsys.readouterr().out
