"""Each importer on a tiny fixture written in the corpus' own layout; the result must load and validate."""

import pytest

from dqwhisper.data.importers import (
    csj_text,
    import_aishell,
    import_commonvoice,
    import_csj,
    import_fleurs,
    import_librispeech,
    import_manifest,
    main,
    to_iso639_1,
)
from dqwhisper.data.kaldi import DataDir
from dqwhisper.data.validate import validate_data_dir
from dqwhisper.utils import DQWhisperError

from .helpers import write_mp3, write_wav


def _check(dest, n, lang):
    r = validate_data_dir(dest)
    assert r.ok, r.errors
    data = DataDir.load(dest)
    assert len(data) == n and {u.lang for u in data.utts} == {lang}
    assert all(len(data.load_audio(u)) > 0 for u in data.utts)
    return data


def test_commonvoice(tmp_path):
    src = tmp_path / "cv-corpus-17.0" / "ja"
    header = (
        "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\t"
        "accents\tvariant\tlocale\tsegment\n"
    )
    rows = [
        ("abc123", "common_voice_ja_1.mp3", "今日は晴れです。"),
        ("abc123", "common_voice_ja_2.mp3", "ありがとう"),
        ("zzz999", "common_voice_ja_3.mp3", "こんばんは"),
        ("zzz999", "common_voice_ja_missing.mp3", "ない"),
        ("zzz999", "common_voice_ja_4.mp3", "  "),
    ]
    for _, p, _ in rows:
        if "missing" not in p:
            write_mp3(src / "clips" / p, 0.6)
    src.mkdir(parents=True, exist_ok=True)
    (src / "train.tsv").write_text(
        header + "".join(f"{c}\t{p}\tsid\t{s}\t\t2\t0\t\t\t\t\tja\t\n" for c, p, s in rows[:4] + rows[4:]),
        encoding="utf-8",
    )
    (src / "test.tsv").write_text(header + f"zzz999\t{rows[2][1]}\tsid\t{rows[2][2]}\t\t2\t0\t\t\t\t\tja\t\n")
    stats = import_commonvoice(src, tmp_path / "out")
    assert stats.skipped == {"missing audio": 1, "empty transcript": 1}
    data = _check(tmp_path / "out" / "train", 3, "ja")
    assert sorted(u.text for u in data.utts) == sorted(["今日は晴れです。", "ありがとう", "こんばんは"])
    assert len({u.speaker for u in data.utts}) == 2
    assert all(u.utt_id.startswith(u.speaker + "-") for u in data.utts)
    _check(tmp_path / "out" / "test", 1, "ja")
    assert not (tmp_path / "out" / "dev").exists()


def test_fleurs(tmp_path):
    src = tmp_path / "fleurs" / "cmn_hans_cn"
    lines = []
    for i, split in enumerate(["train", "train", "dev"]):
        write_wav(src / "audio" / split / f"{1000 + i}.wav", 0.5)
        lines.append((split, f"{i}\t{1000 + i}.wav\t你好，世界{i}。\t你好 世界{i}\tn i h a o\t8000\tMALE\n"))
    for split in ("train", "dev"):
        (src / f"{split}.tsv").write_text("".join(line for s, line in lines if s == split), encoding="utf-8")
    import_fleurs(src, tmp_path / "out")
    data = _check(tmp_path / "out" / "train", 2, "zh")
    assert data.utts[0].text == "你好，世界0。"
    import_fleurs(src, tmp_path / "norm", normalized_text=True)
    assert DataDir.load(tmp_path / "norm" / "dev").utts[0].text == "你好 世界2"


def test_librispeech(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    for i in range(3):
        write_wav(chapter / f"84-121123-000{i}.flac", 0.5)
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n"
        "84-121123-0002 AT THIS MOMENT\n84-121123-0003 NO AUDIO FOR THIS ONE\n"
    )
    stats = import_librispeech(tmp_path / "LibriSpeech" / "dev-clean", tmp_path / "out", lowercase=True)
    assert stats.skipped == {"missing audio": 1}
    data = _check(tmp_path / "out", 3, "en")
    assert data["84-121123-0000"].text == "go do you hear" and data["84-121123-0000"].speaker == "84-121123"


def test_aishell(tmp_path):
    src = tmp_path / "data_aishell"
    for split, utt in [
        ("train", "BAC009S0002W0122"),
        ("train", "BAC009S0002W0123"),
        ("dev", "BAC009S0724W0121"),
        ("test", "BAC009S0764W0121"),
        ("train", "BAC009S0002W0999"),
    ]:
        write_wav(src / "wav" / split / utt[6:11] / f"{utt}.wav", 0.5)
    (src / "transcript").mkdir(parents=True)
    (src / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\nBAC009S0002W0123 也 成为 地方 政府 的 眼中 钉\n"
        "BAC009S0724W0121 甚至 出现 交易 几乎 停滞 的 情况\nBAC009S0764W0121 广州市 房地产 中介 协会 分析\n",
        encoding="utf-8",
    )
    stats = import_aishell(src, tmp_path / "out")
    assert stats.skipped == {"no transcript": 1}
    data = _check(tmp_path / "out" / "train", 2, "zh")
    assert data["S0002-BAC009S0002W0122"].text == "而对楼市成交抑制作用最大的限购"
    assert data["S0002-BAC009S0002W0122"].speaker == "S0002"
    _check(tmp_path / "out" / "dev", 1, "zh")
    _check(tmp_path / "out" / "test", 1, "zh")


def test_csj_text():
    assert csj_text("えー+感動詞 今日+名詞 は+助詞/係助詞 <sp> 晴れ+名詞") == "えー今日は晴れ"


def test_csj(tmp_path):
    rec = write_wav(tmp_path / "csj" / "wav" / "A01F0055.wav", 4.0)
    src = tmp_path / "kaldi" / "train_nodup"
    src.mkdir(parents=True)
    (src / "wav.scp").write_text("A01F0055 ../../csj/wav/A01F0055.wav\n")
    (src / "segments").write_text(
        "A01F0055_0000100_0001500 A01F0055 0.10 1.50\n"
        "A01F0055_0001600_0003000 A01F0055 1.60 3.00\n"
        "A01F0055_0003100_0003500 A01F0055 3.10 3.50\n"
    )
    (src / "text").write_text(
        "A01F0055_0000100_0001500 えー+感動詞 今日+名詞 は+助詞/係助詞\n"
        "A01F0055_0001600_0003000 学会+名詞 <sp> です+助動詞\n"
        "A01F0055_0003100_0003500 <sp>\n",
        encoding="utf-8",
    )
    (src / "utt2spk").write_text(
        "A01F0055_0000100_0001500 A01F0055\nA01F0055_0001600_0003000 A01F0055\nA01F0055_0003100_0003500 A01F0055\n"
    )
    stats = import_csj(src, tmp_path / "out")
    assert stats.skipped == {"empty transcript after removing tags": 1}
    data = _check(tmp_path / "out", 2, "ja")
    u = data["A01F0055_0001600_0003000"]
    assert u.text == "学会です" and u.segment == (1.6, 3.0) and u.wav == str(rec.resolve())
    assert (tmp_path / "out" / "segments").read_text().startswith("A01F0055_0000100_0001500 A01F0055 0.100 1.500")
    assert len(data.load_audio(u)) == 22400


@pytest.mark.parametrize("sep,ext", [(",", "csv"), ("\t", "tsv")])
def test_manifest(tmp_path, sep, ext):
    write_wav(tmp_path / "audio" / "a.wav", 0.5)
    write_wav(tmp_path / "audio" / "b.wav", 0.5, rate=22050)
    m = tmp_path / f"m.{ext}"
    m.write_text(
        sep.join(["path", "text", "language", "speaker"])
        + "\n"
        + sep.join(["audio/a.wav", "hola mundo", "es", "ana"])
        + "\n"
        + sep.join([str(tmp_path / "audio" / "b.wav"), "guten tag", "de", "bob"])
        + "\n"
        + sep.join(["audio/none.wav", "nada", "es", "ana"])
        + "\n",
        encoding="utf-8",
    )
    stats = import_manifest(m, tmp_path / "out")
    assert stats.skipped == {"missing audio": 1}
    data = DataDir.load(tmp_path / "out")
    assert [(u.utt_id, u.lang, u.speaker) for u in data.utts] == [
        ("ana-audio_a", "es", "ana"),
        ("bob-" + data.utts[1].utt_id[4:], "de", "bob"),
    ]
    assert validate_data_dir(tmp_path / "out").ok
    assert len(data.load_audio(data.utts[1])) == 8000


def test_manifest_errors(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("file,sentence\nx.wav,hi\n")
    with pytest.raises(DQWhisperError, match="no language column"):
        import_manifest(m, tmp_path / "out")
    m.write_text("audio,words,lang\nx.wav,hi,en\n")
    with pytest.raises(DQWhisperError, match="m.csv:1: no text column"):
        import_manifest(m, tmp_path / "out")
    write_wav(tmp_path / "x.wav", 0.2)
    m.write_text("audio,text,lang\nx.wav,hi,klingon\n")
    with pytest.raises(DQWhisperError, match="m.csv:2: language 'klingon'"):
        import_manifest(m, tmp_path / "out")
    assert main(["manifest", str(m), str(tmp_path / "out")]) == 1


def test_language_codes():
    assert [to_iso639_1(t) for t in ["ja", "zh-CN", "ja_jp", "cmn_hans_cn", "sv-SE", "pt_br", "en"]] == [
        "ja",
        "zh",
        "ja",
        "zh",
        "sv",
        "pt",
        "en",
    ]
    with pytest.raises(DQWhisperError):
        to_iso639_1("xx-YY")
