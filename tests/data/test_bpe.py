from dqwhisper.data.bpe import BPE, main, train_bpe

TEXTS = [
    "hello world how are you",
    "good morning to you",
    "今日は晴れです",
    "ありがとうございます",
    "привет как дела",
    "ciao come stai",
] * 10


def test_train_encode_decode_and_byte_fallback(tmp_path):
    bpe = train_bpe(TEXTS, vocab_size=320, out_path=tmp_path / "bpe.model")
    assert 260 < bpe.vocab_size <= 320 and bpe.n_ctc_units == bpe.vocab_size + 1
    for text in ["hello world", "今日は晴れです", "鬱蒼とした森", "Ωμέγα"]:  # the last two were never seen
        assert bpe.decode(bpe.encode(text)) == text
    unseen = bpe.encode("鬱")
    assert [bpe.sp.is_byte(i) for i in unseen] == [False, True, True, True]  # "▁" + three UTF-8 bytes
    assert bpe.sp.unk_id() not in bpe.encode("鬱蒼とした森")
    ctc = bpe.ctc_targets("good morning")
    assert ctc == [i + 1 for i in bpe.encode("good morning")] and 0 not in ctc
    assert bpe.decode_ctc([0] + ctc + [0]) == "good morning"
    loaded = BPE.load(tmp_path / "bpe.model")
    assert loaded.encode("ciao come stai") == bpe.encode("ciao come stai")
    assert BPE.load(bpe.model_bytes).vocab_size == bpe.vocab_size


def test_deterministic():
    assert train_bpe(TEXTS, 320).model_bytes == train_bpe(TEXTS, 320).model_bytes
    assert train_bpe(TEXTS, 320).model_bytes != train_bpe(TEXTS[:-1] + ["something else entirely"], 320).model_bytes


def test_cli(tmp_path, capsys):
    from .helpers import make_data_dir

    d = make_data_dir(tmp_path, n=4)
    main([str(d), str(tmp_path / "m.model"), "--vocab-size", "300"])
    assert (tmp_path / "m.model").is_file() and "CTC units" in capsys.readouterr().out


def test_too_few_pieces_for_the_scripts_is_a_clear_error():
    import pytest

    from dqwhisper.data.bpe import train_bpe
    from dqwhisper.utils import DQWhisperError

    # more distinct characters than pieces: 400 CJK characters + 256 bytes do not fit 300 pieces
    texts = ["".join(chr(0x4E00 + i + j) for j in range(8)) for i in range(0, 400, 8)]
    with pytest.raises(DQWhisperError, match="could not train 300 pieces"):
        train_bpe(texts, vocab_size=300)
