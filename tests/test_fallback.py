"""openai transcribe's rules in `decode_mels`: temperature fallback on a crafted looping decoder, the token cap,
special-token suppression, no-repeat n-gram, and runaways counted in inference.py's results.json."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from whisper.tokenizer import get_tokenizer

from dqwhisper.decoding import DecodeConfig, decode_mels, token_cap
from tests.conftest import random_tiny_whisper

TOK = get_tokenizer(True, num_languages=99, language="en", task="transcribe")
X, W, V, Y, Z, Z2, Z3 = (TOK.encode(w)[0] for w in (" hello", " world", " again", " good", " day", " to", " you"))
GOOD = [Y, Z, Z2, Z3]


class TableDecoder(nn.Module):
    """Next-token logits from the previous token only, by a table {prev: {next: logit}} (default row: `start`);
    every other token gets -1e4. Used as a drop-in `model.decoder` (whisper's kv-cache hooks then stay empty)."""

    def __init__(self, table: dict[int, dict[int, float]], start: dict[int, float], n_vocab: int):
        super().__init__()
        self.table, self.start, self.n_vocab = table, start, n_vocab
        self.blocks = nn.ModuleList()

    def forward(self, tokens, xa, kv_cache=None):
        logits = torch.full((*tokens.shape, self.n_vocab), -1e4)
        for b, row in enumerate(tokens.tolist()):
            for t, prev in enumerate(row):
                for nxt, value in self.table.get(prev, self.start).items():
                    logits[b, t, nxt] = value
        return logits


def looping_model(start: dict[int, float] | None = None, table: dict | None = None):
    """Greedy and beam search (3 beams) loop "hello world again hello ..." (X, W, V beat Y at the start and lead to
    a loop); sampling at T > 0 sometimes starts with Y, which finishes "good day to you" with certainty, a path
    more likely per token than the loop."""
    loop = {X: 0.0, W: -0.1}
    model = random_tiny_whisper()
    model.decoder = TableDecoder(
        table or {X: loop, W: loop, V: loop, Y: {Z: 0.0}, Z: {Z2: 0.0}, Z2: {Z3: 0.0}, Z3: {TOK.eot: 0.0}},
        start or {X: 0.0, W: 0.0, V: 0.0, Y: -0.3},
        model.dims.n_vocab,
    )
    return model


@pytest.fixture(scope="module")
def mel():
    return torch.zeros(2, 80, 200)


def test_greedy_loop_hits_the_cap_without_fallback(mel):
    cfg = DecodeConfig(temperatures=[0.0], tokens_per_second=4.0, token_cap_margin=2)
    hyps = decode_mels(looping_model(), mel, "en", [2.0, 5.0], cfg)
    assert [h.cap for h in hyps] == [10, 22]
    for h in hyps:
        assert h.tokens[1:] == [X] * (h.cap - 1) and h.hit_cap and h.runaway and h.n_tries == 1
        assert h.compression_ratio > 2.4
    cfg = DecodeConfig(temperatures=[0.0], beam_size=3, tokens_per_second=4.0, token_cap_margin=2)
    [beam] = decode_mels(looping_model(), mel[:1], "en", [2.0], cfg)
    assert beam.runaway and beam.hit_cap and Y not in beam.tokens


@pytest.mark.parametrize("beam_size", [1, 3])
def test_fallback_recovers_from_a_looping_output(mel, beam_size):
    cfg = DecodeConfig(tokens_per_second=4.0, token_cap_margin=2, beam_size=beam_size)
    hyps = decode_mels(looping_model(), mel, "en", [2.0, 5.0], cfg)
    for h in hyps:
        assert h.tokens == GOOD, h.tokens  # the sampled "good day to you" passes every test and is kept
        assert h.text == "good day to you" and h.temperature > 0 and h.n_tries >= 2
        assert not h.hit_cap and not h.runaway
        assert h.avg_logprob > -1.0 and h.compression_ratio < 2.4
    again = decode_mels(looping_model(), mel, "en", [2.0, 5.0], cfg)  # seeded: the same result twice
    assert [(h.tokens, h.temperature) for h in again] == [(h.tokens, h.temperature) for h in hyps]
    [alone] = decode_mels(looping_model(), mel[1:], "en", [5.0], cfg)  # and the same without its batch
    assert (alone.tokens, alone.temperature) == (hyps[1].tokens, hyps[1].temperature)


def test_sampled_rows_do_not_depend_on_their_batch():
    """Sampling (here the only temperature, 1.0) draws each utterance's rows from its own generator: a batch of three
    gives each utterance what it gets decoded alone, and the global RNG is untouched."""
    model = random_tiny_whisper(seed=3)
    torch.manual_seed(1)
    mel = torch.randn(3, 80, 200)
    cfg = DecodeConfig(temperatures=[1.0], tokens_per_second=6.0, token_cap_margin=2)
    seconds = [1.0, 2.0, 4.0]
    state = torch.random.get_rng_state()
    hyps = decode_mels(model, mel, "en", seconds, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(h.n_tries == 1 and h.temperature == 1.0 for h in hyps)
    for i, h in enumerate(hyps):
        [alone] = decode_mels(model, mel[i : i + 1], "en", seconds[i : i + 1], cfg)
        assert h.tokens == alone.tokens, i
        assert h.avg_logprob == pytest.approx(alone.avg_logprob, rel=1e-5)  # other batch sizes: other float sums
    assert len({tuple(h.tokens) for h in hyps}) == 3
    other = decode_mels(model, mel, "en", seconds, DecodeConfig(**{**cfg.__dict__, "seed": 1}))
    assert [h.tokens for h in other] != [h.tokens for h in hyps]


def test_seeded_sampler_draws_from_the_tempered_softmax():
    """SeededSampler's inverse-CDF draws against the exact distribution softmax(logits / T): total variation
    distance of 40,000 draws below 0.02 (a wrong temperature or an off-by-one token is far above), and a token of
    probability zero (-inf) is never drawn."""
    from dqwhisper.decoding.search import SeededSampler

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    logits[0, [0, 7, 49]] = -math.inf
    for temperature in (0.5, 1.0):
        sampler = SeededSampler(temperature, eot=49, n_group=2000, seed=5)  # one group: one generator
        draws = torch.cat([sampler.sample(logits.expand(2000, -1).contiguous()) for _ in range(20)])
        counts = torch.bincount(draws, minlength=50).double() / len(draws)
        exact = torch.softmax(logits[0].double() / temperature, -1)
        assert 0.5 * (counts - exact).abs().sum() < 0.02, temperature
        assert counts[[0, 7, 49]].sum() == 0
        wrong = torch.softmax(logits[0].double() / (2 * temperature), -1)
        assert 0.5 * (counts - wrong).abs().sum() > 0.05


def test_fallback_samples_the_pending_utterances_in_one_batch():
    """All three rows fall back (threshold 0: every hypothesis is unlikely): each temperature's sampling runs once,
    on 3 x best_of rows, not once per utterance."""
    model = random_tiny_whisper(seed=3)
    rows = []
    model.decoder.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    cfg = DecodeConfig(temperatures=[0.0, 0.5, 1.0], logprob_threshold=0.0, best_of=4)
    hyps = decode_mels(model, torch.zeros(3, 80, 200), "en", [1.0, 1.0, 1.0], cfg)
    assert [h.n_tries for h in hyps] == [3, 3, 3] and all(h.fallback_reason.startswith("logprob") for h in hyps)
    assert sorted(set(rows)) == [3, 12]


def test_a_loop_that_never_ends_stays_a_runaway(mel):
    """With no way out, every temperature fails; the row is counted as a runaway and stops at its cap."""
    model = looping_model(start={X: 0.0}, table={X: {X: 0.0}})
    cfg = DecodeConfig(tokens_per_second=4.0, token_cap_margin=2, best_of=2)
    hyps = decode_mels(model, mel, "en", [2.0, 2.0], cfg)
    for h in hyps:
        assert h.n_tries == len(cfg.temperatures) and h.runaway and h.hit_cap and len(h.tokens) == h.cap


def test_logprob_rule_and_no_speech(mel):
    """An unlikely first token (avg log-prob < -1) triggers fallback; the threshold off (null) does not."""
    spread = {t: 0.0 for t in TOK.encode(" a b c d e f g h i j k l m n o p")}
    model = looping_model(start=spread, table={t: {TOK.eot: 0.0} for t in spread})
    [h] = decode_mels(model, mel[:1], "en", [2.0], DecodeConfig(best_of=2))
    assert h.avg_logprob < -1.0 and h.n_tries == 6 and not h.runaway  # unlikely, but not a runaway
    [h] = decode_mels(model, mel[:1], "en", [2.0], DecodeConfig(logprob_threshold=None))
    assert h.n_tries == 1


def test_special_and_timestamp_tokens_are_suppressed(mel):
    """The decoder prefers a timestamp, a language token and <|notimestamps|>; none of them may be produced."""
    start = {TOK.timestamp_begin + 5: 5.0, TOK.to_language_token("de"): 4.0, TOK.no_timestamps: 3.0, Y: 0.0}
    model = looping_model(start=start)
    [h] = decode_mels(model, mel[:1], "en", [2.0], DecodeConfig(temperatures=[0.0]))
    assert h.tokens == GOOD


def test_no_repeat_ngram(mel):
    cfg = DecodeConfig(temperatures=[0.0], tokens_per_second=None, max_new_tokens=12, no_repeat_ngram_size=2)
    table = {X: {X: 0.0, W: -1.0, Y: -2.0}, W: {X: 0.0, W: -1.0, Y: -2.0}, Y: {X: 0.0, W: -1.0, Y: -2.0}}
    [h] = decode_mels(looping_model(start={X: 0.0}, table=table), mel[:1], "en", None, cfg)
    grams = list(zip(h.tokens, h.tokens[1:]))
    assert len(grams) == len(set(grams)) and len(h.tokens) >= 4
    [plain] = decode_mels(
        looping_model(start={X: 0.0}, table=table),
        mel[:1],
        "en",
        None,
        DecodeConfig(temperatures=[0.0], tokens_per_second=None, max_new_tokens=12),
    )
    assert plain.tokens == [X] * 12


def test_token_cap_formula():
    model = random_tiny_whisper()
    cfg = DecodeConfig(tokens_per_second=10.0, token_cap_margin=5)
    assert token_cap(1.0, cfg, model) == 15 and token_cap(0.0, cfg, model) == 5
    assert token_cap(100.0, cfg, model) == 224  # never above n_text_ctx // 2 (max_new_tokens default)
    assert token_cap(None, cfg, model) == 224
    assert token_cap(100.0, DecodeConfig(max_new_tokens=30), model) == 30


def test_languages_detected_per_row(mel):
    """None rows get a detected code; a forced row keeps its own."""
    hyps = decode_mels(random_tiny_whisper(), mel, [None, "ja"], [1.0, 1.0], DecodeConfig(temperatures=[0.0]))
    assert hyps[1].language == "ja" and isinstance(hyps[0].language, str) and len(hyps[0].language) == 2


def test_inference_counts_runaways(tmp_path, monkeypatch):
    """results.json gains n_runaways per language and overall, and the ids, from the decoder's flags."""
    import json

    import numpy as np
    import soundfile as sf

    from dqwhisper import inference
    from dqwhisper.data.kaldi import Utterance, write_data_dir

    model = looping_model()
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(inference, "check_model_name", lambda *a: None)
    data = tmp_path / "test"
    data.mkdir()
    utts = []
    for i, lang in enumerate(["en", "en", "de"]):
        sf.write(data / f"u{i}.wav", np.zeros(16000, np.float32), 16000)
        utts.append(Utterance(f"utt{i}", f"u{i}.wav", "good day to you", "spk", lang))
    write_data_dir(data, utts)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    common = [f"decode.test_sets=[{data}]", "decode.tokens_per_second=4.0", "decode.token_cap_margin=2"]
    [res] = inference.run(
        "tiny", ckpt, common + [f"decode.out_dir={tmp_path / 'a'}", "decode.temperatures=[0.0]"], progress=False
    )
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["overall"]["n_runaways"] == 3 and saved["runaway_utts"] == ["utt0", "utt1", "utt2"]
    assert {k: v["n_runaways"] for k, v in saved["per_language"].items()} == {"de": 1, "en": 2}
    [res] = inference.run("tiny", ckpt, common + [f"decode.out_dir={tmp_path / 'b'}"], progress=False)
    assert res["overall"]["n_runaways"] == 0 and res["overall"]["n_fallbacks"] == 3 and res["overall"]["error"] == 0
    assert res["overall"]["fallback_reasons"] == {"cap": 3}
    table = (tmp_path / "b" / "utt_decode.tsv").read_text().splitlines()
    header, rows = table[0].split("\t"), [dict(zip(table[0].split("\t"), r.split("\t"))) for r in table[1:]]
    assert header[:3] == ["utt_id", "lang", "seconds"] and [r["utt_id"] for r in rows] == ["utt0", "utt1", "utt2"]
    for r in rows:
        assert r["fallback_reason"] == "cap" and int(r["n_tries"]) >= 2 and float(r["temperature"]) > 0
        assert r["runaway"] == "0" and r["n_tokens"] == "4" and float(r["avg_logprob"]) > float(r["first_avg_logprob"])
    assert "3 utterances fell back (first hypothesis failed: cap 3)" in (tmp_path / "b" / "summary.txt").read_text()
