from functools import partial

import pytest
import torch
import whisper

from dqwhisper.data.bpe import train_bpe
from dqwhisper.data.dataset import (
    SpecAugment,
    TooManyBadUtterances,
    WhisperDataset,
    collate,
    default_tokenizer,
    text_tokens,
    token_vocabulary,
)
from dqwhisper.data.kaldi import DataDir, Utterance, write_data_dir
from dqwhisper.data.sampler import BatchSampler

from .helpers import make_data_dir, write_wav

TOK = default_tokenizer()


def _dir(tmp_path, specs):
    """specs: (utt_id, seconds or None for a missing file, text, lang)"""
    utts = []
    for utt, seconds, text, lang in specs:
        if seconds is not None:
            write_wav(tmp_path / "wav" / f"{utt}.wav", seconds, rate=22050)
        utts.append(Utterance(utt, f"../wav/{utt}.wav", text, "s", lang))
    write_data_dir(tmp_path / "d", utts)
    return tmp_path / "d"


def test_items_and_collate(tmp_path):
    d = _dir(tmp_path, [("s-a", 1.0, "hello world", "en"), ("s-b", 1.5, "今日は晴れです", "ja")])
    bpe = train_bpe(["hello world", "今日は晴れです"] * 20, 300)
    ds = WhisperDataset(d, TOK, n_mels=80, n_audio_ctx=100, bpe=bpe)
    assert len(ds) == 2 and ds.lengths == [50, 75] and not ds.bad
    a, b = ds[0], ds[1]
    assert a["mel"].shape == (80, 200) and a["mel"].dtype == torch.float32
    assert a["tokens"][:4] == [TOK.sot, TOK.to_language_token("en"), TOK.transcribe, TOK.no_timestamps]
    assert a["tokens"][-1] == TOK.eot and TOK.decode(a["tokens"][4:-1]) == " hello world"
    assert b["tokens"][1] == TOK.to_language_token("ja") and TOK.decode(b["tokens"][4:-1]) == "今日は晴れです"
    assert bpe.decode_ctc(b["ctc_targets"]) == "今日は晴れです" and min(b["ctc_targets"]) >= 1
    assert (a["n_frames"], b["n_frames"]) == (50, 75)

    batch = collate([a, None, b], pad_id=TOK.eot)
    assert batch["utt_ids"] == ["s-a", "s-b"] and batch["langs"] == ["en", "ja"]
    assert batch["mel"].shape == (2, 80, 200)
    L = max(len(a["tokens"]), len(b["tokens"])) - 1
    assert batch["tokens_in"].shape == batch["targets"].shape == (2, L)
    for i, it in enumerate([a, b]):
        n = len(it["tokens"]) - 1
        assert batch["tokens_in"][i, :n].tolist() == it["tokens"][:-1]
        assert (batch["tokens_in"][i, n:] == TOK.eot).all()
        assert (batch["targets"][i, :3] == -100).all()
        assert batch["targets"][i, 3:n].tolist() == it["tokens"][4:]
        assert (batch["targets"][i, n:] == -100).all()
    assert batch["ctc_target_lengths"].tolist() == [len(a["ctc_targets"]), len(b["ctc_targets"])]
    assert batch["ctc_targets"].tolist() == a["ctc_targets"] + b["ctc_targets"]
    assert batch["enc_lengths"].tolist() == [50, 75]
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=BatchSampler(ds.lengths, 2, shuffle=False), collate_fn=partial(collate, pad_id=TOK.eot)
    )
    assert [b["utt_ids"] for b in loader] == [["s-a", "s-b"]]


@pytest.mark.parametrize("n_mels,n_audio_ctx", [(80, 1500), (128, 1500), (80, 500)])
def test_log_mel_matches_whisper(tmp_path, n_mels, n_audio_ctx):
    d = _dir(tmp_path, [("s-a", 2.3, "hi", "en")])
    ds = WhisperDataset(d, TOK, n_mels=n_mels, n_audio_ctx=n_audio_ctx)
    audio = DataDir.load(d).load_audio(ds.data.utts[0])
    # whisper.transcribe: the mel of the audio with 30 s of trailing silence, its content frames, zero-padded
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels, padding=whisper.audio.N_SAMPLES)
    content = mel[:, : mel.shape[-1] - whisper.audio.N_FRAMES]
    ref = whisper.pad_or_trim(content[:, : 2 * n_audio_ctx], 2 * n_audio_ctx)
    assert bool((ref[:, content.shape[-1] :] == 0).all())
    got = ds[0]["mel"]
    assert got.shape == (n_mels, 2 * n_audio_ctx)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_bad_utterances_skipped_and_counted(tmp_path, caplog):
    specs = [(f"s-ok{i}", 0.5, f"fine {i}", "en") for i in range(10)] + [
        ("s-missing", None, "no audio", "en"),
        ("s-empty", 0.5, "", "en"),
        ("s-lang", 0.5, "text", "xx"),
        ("s-long", 0.5, "word " * 460, "en"),
        ("s-toolongaudio", 3.0, "too long audio", "en"),
    ]
    d = _dir(tmp_path, specs)
    ds = WhisperDataset(d, TOK, n_mels=80, n_audio_ctx=100, max_bad_fraction=0.5)
    assert len(ds) == 10 and ds.n_total == 15
    reasons = {k: v.split(":")[0] for k, v in ds.bad.items()}
    assert reasons == {
        "s-missing": "missing audio",
        "s-empty": "empty transcript",
        "s-lang": "unknown language",
        "s-long": "transcript too long",
        "s-toolongaudio": "audio too long",
    }
    assert "skipping utterance s-missing" in caplog.text
    with pytest.raises(TooManyBadUtterances, match="5 of 15"):
        WhisperDataset(d, TOK, n_mels=80, n_audio_ctx=100, max_bad_fraction=0.3)
    # the language filter applies before counting
    assert len(WhisperDataset(d, TOK, 80, 100, languages=["xx"], max_bad_fraction=1.0)) == 0


def test_unreadable_audio_at_load_time(tmp_path):
    d = _dir(tmp_path, [(f"s-ok{i}", 0.5, "fine", "en") for i in range(4)] + [("s-bad", 0.5, "bad", "en")])
    (tmp_path / "wav" / "s-bad.wav").write_bytes(b"garbage" * 100)
    assert "s-bad" in WhisperDataset(d, TOK, 80, 100, max_bad_fraction=0.5).bad  # the header check finds it
    ds = WhisperDataset(d, TOK, 80, 100, max_bad_fraction=0.2, check_audio=False)
    assert len(ds) == 5
    items = [ds[i] for i in range(len(ds))]
    assert items[ds.utt_ids.index("s-bad")] is None and ds.bad["s-bad"].startswith("unreadable audio")
    assert len(collate(items, TOK.eot)["utt_ids"]) == 4
    (tmp_path / "wav" / "s-ok0.wav").write_bytes(b"garbage")
    with pytest.raises(TooManyBadUtterances):
        ds[ds.utt_ids.index("s-ok0")]


def test_spec_augment(tmp_path):
    d = _dir(tmp_path, [("s-a", 1.0, "hello", "en")])
    plain = WhisperDataset(d, TOK, 80, 100)[0]["mel"]
    torch.manual_seed(0)
    aug = WhisperDataset(d, TOK, 80, 100, spec_augment={"enabled": True, "time_mask_param": 20})[0]["mel"]
    assert aug.shape == plain.shape and not torch.equal(aug, plain)
    torch.testing.assert_close(aug[:, 100:], plain[:, 100:], rtol=0, atol=0)  # padding frames untouched
    assert SpecAugment.from_config({"enabled": False}) is None and SpecAugment.from_config(None) is None
    assert SpecAugment.from_config(True).freq_mask_param == 27
    from dqwhisper.config import SpecAugmentConfig

    assert SpecAugment.from_config(SpecAugmentConfig(enabled=False)) is None
    cfg = SpecAugment.from_config(
        SpecAugmentConfig(enabled=True, freq_mask_param=5, time_mask_param=7, num_freq_masks=1, num_time_masks=3)
    )
    assert (cfg.freq_mask_param, cfg.time_mask_param, cfg.num_freq_masks, cfg.num_time_masks) == (5, 7, 1, 3)
    short = SpecAugment.from_config({"freq_mask": 4, "time_mask": 6, "n_freq_masks": 3, "n_time_masks": 1})
    assert (short.freq_mask_param, short.time_mask_param, short.num_freq_masks, short.num_time_masks) == (4, 6, 3, 1)


def test_batch_sampler():
    lengths = [10, 20, 30, 40, 50, 60, 70]
    s = BatchSampler(lengths, minibatch_size=3, seed=5)
    e0 = list(s)
    assert sorted(i for b in e0 for i in b) == list(range(7)) and all(len(b) <= 3 for b in e0)
    assert e0 == list(BatchSampler(lengths, 3, seed=5))  # same seed and epoch: same batches
    s.set_epoch(1)
    assert list(s) != e0  # a new epoch reshuffles
    budget = list(BatchSampler(lengths, 10, max_frames=100, shuffle=False))
    assert budget == [[0, 1, 2, 3], [4], [5], [6]]
    assert all(sum(lengths[i] for i in b) <= 100 for b in budget)
    shards = [list(BatchSampler(lengths, 2, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert set(map(tuple, shards[0])).isdisjoint(map(tuple, shards[1]))
    dropped = [list(BatchSampler(lengths, 3, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert [len(x) for x in dropped] == [1, 1]


def test_text_tokens(tmp_path):
    d = make_data_dir(tmp_path, n=2)
    toks = text_tokens(d)
    assert toks["spk0-u0"] == TOK.encode(" hello number 0")
    assert token_vocabulary(d) == set(TOK.encode(" hello number 0") + TOK.encode(" hello number 1"))
