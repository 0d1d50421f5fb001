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
