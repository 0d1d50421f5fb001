import json

import pytest

from dqwhisper import report
from dqwhisper.models.student import from_whisper, save_checkpoint
from dqwhisper.utils import DQWhisperError


def _results(path, per_language, rtf, overall=None):
    path.write_text(
        json.dumps(
            {"per_language": per_language, "overall": overall or {}, "rtf": rtf, "model": "base", "checkpoint": "x.pt"}
        )
    )
    return path


def test_report_rows_ratio_average_and_files(tmp_path, tiny_whisper):
    ckpt = tmp_path / "student.pt"
    student = from_whisper(tiny_whisper, decoder_layers=[0, 3])
    save_checkpoint(student, ckpt)
    res = _results(
        tmp_path / "results.json",
        {"en": {"metric": "wer", "error": 0.10, "n_utts": 20}, "ja": {"metric": "cer", "error": 0.30, "n_utts": 20}},
        0.05,
        {"n_runaways": 3},
    )
    out = tmp_path / "out"
    (tmp_path / "times.tsv").write_text("models\t12.5\ndata\t30\n")
    teacher_bytes = 10 * ckpt.stat().st_size
    report.main(
        [
            "--out",
            str(out),
            "--row",
            "student",
            str(res),
            str(ckpt),
            "--teacher-fp16-bytes",
            str(teacher_bytes),
            "--stage-times",
            str(tmp_path / "times.tsv"),
        ]
    )
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["student"]
    row = rows[0]
    assert row["ratio_vs_teacher_fp16"] == pytest.approx(10.0, abs=1e-3)
    assert row["avg_error"] == pytest.approx(0.20)
    expected_params = sum(p.numel() for p in student.parameters())
    assert row["params"] == expected_params
    md = (out / "RESULTS.md").read_text()
    assert "| student |" in md and "20.0" in md and "| total | 42 |" in md
    assert "| avg % | RTF | runaways |" in md and "| 0.050 | 3 |" in md and row["n_runaways"] == 3
    assert (out / "wer_vs_size.png").stat().st_size > 1000


def test_report_missing_results_names_the_row(tmp_path, tiny_whisper):
    ckpt = tmp_path / "m.pt"
    save_checkpoint(from_whisper(tiny_whisper), ckpt)
    with pytest.raises(DQWhisperError, match="row teacher_zeroshot: .*does not exist"):
        report.build_row("teacher_zeroshot", tmp_path / "nope.json", ckpt, 100)


def test_params_of_an_exported_quantized_file_count_the_packed_weights(tmp_path, tiny_whisper):
    from dqwhisper.quant import prepare
    from dqwhisper.quant.export import export_model

    student = from_whisper(tiny_whisper, decoder_layers=[0, 3])
    n_float = sum(p.numel() for p in student.parameters())
    prepare(student, {"enabled": True, "scope": "all", "weight": {"bits": 4}})
    export_model(student, tmp_path / "m.dqw")
    assert report.count_params(tmp_path / "m.dqw") == n_float


def test_seed_rows_are_grouped_with_their_mean():
    rows = [
        {"name": "teacher", "avg_error": 0.3},
        {"name": "student_ce", "avg_error": 0.40},
        {"name": "student_kd", "avg_error": 0.35},
        {"name": "student_ce_seed2", "avg_error": 0.50},
    ]
    groups = report.seed_groups(rows)
    assert list(groups) == ["student_ce"]
    assert [k for k, _ in groups["student_ce"]] == [1, 2]
    md = "\n".join(report.render_seeds(rows))
    assert "| student_ce | 40.0 | 50.0 | 45.0 |" in md
    assert "student_kd |" not in md
    assert report.render_seeds(rows[:3]) == []


def _utt_errors(folder, rows):
    """rows: (utt, lang, errors, n_ref) -> folder/utt_errors.tsv (inference.py's columns) and folder/results.json."""
    folder.mkdir(parents=True, exist_ok=True)
    head = "utt_id\tlang\tmetric\tn_ref\tsub\tdel\tins\terrors\terror\tref\thyp"
    lines = [head] + [f"{u}\t{lang}\twer\t{n}\t{e}\t0\t0\t{e}\t{e / n:.4f}\tr\th" for u, lang, e, n in rows]
    (folder / "utt_errors.tsv").write_text("\n".join(lines) + "\n")
    return folder / "results.json"


def _langs(errors_by_lang, n_ref=10):
    return [(f"{lang}-{i}", lang, e, n_ref) for lang, errs in errors_by_lang.items() for i, e in enumerate(errs)]


def test_paired_bootstrap_point_estimate_is_the_language_average(tmp_path):
    a = report.read_utt_errors(_utt_errors(tmp_path / "a", _langs({"en": [1, 2, 3], "de": [5, 5, 0]})))
    b = report.read_utt_errors(_utt_errors(tmp_path / "b", _langs({"en": [2, 2, 2], "de": [6, 6, 6]})))
    c = report.paired_bootstrap(a, b, n_boot=500)
    assert c["avg_error"] == pytest.approx((6 / 30 + 10 / 30) / 2)
    assert c["against_avg_error"] == pytest.approx((6 / 30 + 18 / 30) / 2)
    assert c["relative_change"] == pytest.approx(c["avg_error"] / c["against_avg_error"] - 1)
    assert c["n_utts"] == 6 and c["ci95"][0] <= c["relative_change"] <= c["ci95"][1]


def test_paired_bootstrap_separates_a_consistent_gain_from_noise(tmp_path):
    rng = __import__("random").Random(0)
    base = {lang: [rng.randint(2, 8) for _ in range(30)] for lang in ("en", "de", "ja")}
    better = {lang: [max(e - 1, 0) for e in errs] for lang, errs in base.items()}  # one error fewer everywhere
    shuffled = {lang: rng.sample(errs, len(errs)) for lang, errs in base.items()}  # same totals, paired noise
    r = {
        name: report.read_utt_errors(_utt_errors(tmp_path / name, _langs(d)))
        for name, d in (("base", base), ("better", better), ("shuffled", shuffled))
    }
    gain = report.paired_bootstrap(r["better"], r["base"])
    assert gain["ci95"][1] < 0 and gain["p_better"] > 0.99
    noise = report.paired_bootstrap(r["shuffled"], r["base"])
    assert noise["relative_change"] == pytest.approx(0.0)
    assert noise["ci95"][0] < 0 < noise["ci95"][1] and 0.2 < noise["p_better"] < 0.8
    same = report.paired_bootstrap(r["base"], r["base"])
    assert same["ci95"] == [0.0, 0.0] and same["p_better"] == 0.0


def test_a_gain_on_one_voice_is_resolved_over_utterances_but_not_over_voices(tmp_path):
    """Three voices per language; A beats B on one voice only. Resampling utterances calls that a sure gain;
    resampling voices first must not, and both agree on the point estimate."""
    rng = __import__("random").Random(1)
    rows_a, rows_b, speakers = [], [], {}
    for lang in ("en", "de"):
        for v in range(3):
            for i in range(12):
                utt = f"{lang}-v{v}-{i}"
                e = rng.randint(2, 6)
                rows_b.append((utt, lang, e, 10))
                rows_a.append((utt, lang, e - 2 if v == 0 else e, 10))
                speakers[utt] = f"{lang}-v{v}"
    a = report.read_utt_errors(_utt_errors(tmp_path / "a", rows_a))
    b = report.read_utt_errors(_utt_errors(tmp_path / "b", rows_b))
    by_utt = report.paired_bootstrap(a, b)
    by_voice = report.paired_bootstrap(a, b, speakers=speakers)
    assert by_utt["relative_change"] == pytest.approx(by_voice["relative_change"]) and by_utt["relative_change"] < 0
    assert by_utt["ci95"][1] < 0 and by_utt["n_voices"] is None
    assert by_voice["ci95"][0] < by_voice["relative_change"] and by_voice["ci95"][1] >= 0
    assert by_voice["n_voices"] == 6
    with pytest.raises(DQWhisperError, match="no speaker in utt2spk, e.g. en-v0-0"):
        report.paired_bootstrap(a, b, speakers={k: v for k, v in speakers.items() if k != "en-v0-0"})


def test_compare_needs_the_per_utterance_errors(tmp_path):
    with pytest.raises(DQWhisperError, match="utt_errors.tsv does not exist"):
        report.read_utt_errors(tmp_path / "results.json")
    (tmp_path / "utt_errors.tsv").write_text("utt_id\tlang\terrors\tn_ref\nu1\ten\tx\t3\n")
    with pytest.raises(DQWhisperError, match=r"utt_errors.tsv:2: not a row"):
        report.read_utt_errors(tmp_path / "results.json")


def test_report_writes_paired_comparisons(tmp_path, tiny_whisper, capsys):
    ckpt = tmp_path / "m.pt"
    save_checkpoint(from_whisper(tiny_whisper), ckpt)
    args = ["--out", str(tmp_path / "out"), "--teacher-fp16-bytes", "1000"]
    for name, errs in (("student_ce", [3, 4, 5, 6]), ("student_kd_dm", [2, 3, 4, 5])):
        res = _utt_errors(tmp_path / name, _langs({"en": errs}))
        _results(res, {"en": {"metric": "wer", "error": sum(errs) / 40, "n_utts": 4}}, 0.1)
        args += ["--row", name, str(res), str(ckpt)]
    report.main(args + ["--compare", "student_kd_dm", "student_ce", "--compare", "student_kd_dm", "nope"])
    comps = json.loads((tmp_path / "out" / "comparisons.json").read_text())
    assert [(c["name"], c["against"]) for c in comps] == [("student_kd_dm", "student_ce")]
    assert comps[0]["relative_change"] == pytest.approx(14 / 18 - 1)
    assert "| student_kd_dm | student_ce | 35.0 | 45.0 | -22.2% |" in (tmp_path / "out" / "RESULTS.md").read_text()
    # with the test set's utt2spk: the bootstrap goes over voices, and each voice's error is tabled
    (tmp_path / "utt2spk").write_text("en-0 en-a\nen-1 en-a\nen-2 en-b\nen-3 en-b\n")
    report.main(args + ["--compare", "student_kd_dm", "student_ce", "--utt2spk", str(tmp_path / "utt2spk")])
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "over the held-out voices (2) and then their utterances" in md
    assert "| en-a | 2 | 35.0 | 25.0 |" in md and "| en-b | 2 | 55.0 | 45.0 |" in md
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rows[1]["per_voice"]["en-b"] == {"lang": "en", "error": pytest.approx(0.45), "n_utts": 2}
    assert report.main(args + ["--utt2spk", str(tmp_path / "nope")]) == 1
    assert "nope: no such file" in capsys.readouterr().err
