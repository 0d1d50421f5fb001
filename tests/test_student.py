"""DQWhisper: cutting, pruning, windows and checkpoints agree with openai-whisper's own model."""

import pytest
import torch
import whisper

from dqwhisper.decoding.search import decode_batch
from dqwhisper.models.student import (
    from_whisper,
    load_checkpoint,
    save_checkpoint,
    set_audio_window,
    vocab_from_token_lists,
    window_frames,
)
from dqwhisper.utils import DQWhisperError

PREFIX = [50258, 50259, 50359, 50363]  # sot, en, transcribe, notimestamps


def _inputs(n_audio_ctx=100):
    torch.manual_seed(1)
    return torch.randn(2, 80, 2 * n_audio_ctx), torch.tensor([PREFIX + [400, 500]] * 2)


def test_full_copy_equals_whisper(tiny_whisper):
    mel, tok = _inputs()
    with torch.no_grad():
        assert torch.equal(from_whisper(tiny_whisper).eval()(mel, tok), tiny_whisper(mel, tok))


def _equal_scores(got, want, exact):
    """The decodings' average log-probabilities: bit for bit where each row attends to its own keys (greedy), else to
    1e-6 relative. Rows of one utterance (beams, best-of samples) attend to one copy of its keys and values as a single
    n x L query block (rows_share_audio), a GEMM of another shape than whisper's per-row one: its sums round
    differently where the CPU's kernel blocks them differently (AVX2 builds: ~1e-7 relative; AVX512: equal)."""
    got, want = [r.avg_logprob for r in got], [r.avg_logprob for r in want]
    assert got == (want if exact else pytest.approx(want, rel=1e-6, abs=0))


@pytest.mark.parametrize("beam_size", [None, 2])
def test_cached_decoding_equals_whispers_bit_for_bit(tiny_whisper, beam_size):
    """Our decoder keeps the cross-attention's keys and values in their own layout: the logits of every kv-cached
    step, and whisper's greedy decoding through them, equal whisper's own bit for bit. Beam search (which reorders
    the cache) gives the same tokens and the same scores up to float rounding (see _equal_scores)."""
    ours = from_whisper(tiny_whisper).eval()
    mel, tok = _inputs()
    with torch.no_grad():
        xa = tiny_whisper.encoder(mel)
        logits = []
        for model in (tiny_whisper, ours):
            cache, hooks = model.install_kv_cache_hooks()
            steps = [model.decoder(tok, xa, kv_cache=cache)]
            for _ in range(5):
                steps.append(model.decoder(steps[-1][:, -1:].argmax(-1), xa, kv_cache=cache))
            for h in hooks:
                h.remove()
            logits.append(steps)
        assert all(torch.equal(a, b) for a, b in zip(*logits))
        assert sum(1 for key in cache if isinstance(key, tuple)) == 2 * len(ours.decoder.blocks)
        opts = whisper.DecodingOptions(
            language="en", beam_size=beam_size, sample_len=8, without_timestamps=True, fp16=False
        )
        want, got = (decode_batch(m, mel, opts) for m in (tiny_whisper, ours))
    assert [r.tokens for r in got] == [r.tokens for r in want]
    _equal_scores(got, want, exact=beam_size is None)


@pytest.mark.parametrize("search", ["beam", "best_of"])
def test_rows_sharing_one_utterance_project_its_keys_and_values_once(tiny_whisper, search):
    """Beam search and best-of sampling repeat each utterance's encoder output per beam / sample: our decoder
    projects the cross-attention's keys and values on one row per utterance, and decodes what whisper decodes."""
    ours = from_whisper(tiny_whisper).eval()
    mel, _ = _inputs()
    group = 3
    opts = whisper.DecodingOptions(
        language="en", sample_len=8, without_timestamps=True, fp16=False,
        **({"beam_size": group} if search == "beam" else {"temperature": 0.8, "best_of": group}),
    )  # fmt: skip
    rows = []
    hook = ours.decoder.blocks[0].cross_attn.key.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    results = {}
    with torch.no_grad():
        for name, model in (("whisper", tiny_whisper), ("ours", ours)):
            torch.manual_seed(5)  # best-of sampling draws the same numbers on both sides
            results[name] = decode_batch(model, mel, opts)
    hook.remove()
    assert rows == [mel.shape[0]]  # 2 utterances, not 2 x 3 rows
    assert [r.tokens for r in results["ours"]] == [r.tokens for r in results["whisper"]]
    _equal_scores(results["ours"], results["whisper"], exact=False)
    assert ours.decoder.shared_rows == 1  # restored after the decoding


@pytest.mark.parametrize("masked", [False, True])
def test_rows_sharing_audio_attend_to_one_copy_of_its_keys(tiny_whisper, masked):
    """Under rows_share_audio(n) the cross-attention keeps one copy of an utterance's keys and values and attends its
    n rows' queries to it as one sequence: the outputs are those of n rows each with its own copy (float rounding
    allowed, 1e-6; with or without a per-row key mask)."""
    from dqwhisper.models.student import masked_attention

    attn = from_whisper(tiny_whisper).eval().decoder.blocks[0].cross_attn
    torch.manual_seed(2)
    n, steps = 3, 2
    xa = torch.randn(2, 40, attn.query.in_features).repeat_interleave(n, dim=0)
    x = torch.randn(2 * n, steps, attn.query.in_features)
    mask = None
    if masked:
        mask = (torch.arange(40)[None] < torch.tensor([25, 40])[:, None]).repeat_interleave(n, dim=0)
    with torch.no_grad():
        shared_cache, own_cache = {}, {}
        shared = masked_attention(attn, x, xa, mask, shared_cache, group=n)
        own = masked_attention(attn, x, xa, mask, own_cache, group=1)
        alone = torch.cat(
            [
                masked_attention(attn, x[i : i + 1], xa[i : i + 1], None if mask is None else mask[i : i + 1])
                for i in range(2 * n)
            ]
        )
    assert shared_cache[(attn, "k")].shape[0] == 2 and own_cache[(attn, "k")].shape[0] == 2 * n
    assert torch.allclose(shared, own, atol=1e-6, rtol=0) and torch.allclose(shared, alone, atol=1e-6, rtol=0)
    assert not torch.allclose(shared[:n], shared[n:], atol=1e-3)  # the two utterances differ


def test_cut_layers_copy_the_chosen_blocks(tiny_whisper):
    s = from_whisper(tiny_whisper, decoder_layers=[0, 3], encoder_layers=[1])
    assert s.dims.n_text_layer == 2 and s.dims.n_audio_layer == 1
    assert torch.equal(s.decoder.blocks[1].mlp[0].weight, tiny_whisper.decoder.blocks[3].mlp[0].weight)
    assert torch.equal(s.encoder.blocks[0].attn.query.weight, tiny_whisper.encoder.blocks[1].attn.query.weight)
    with pytest.raises(DQWhisperError, match="decoder layers"):
        from_whisper(tiny_whisper, decoder_layers=[4])


def test_pruned_vocab_matches_full_logits_on_kept_ids(tiny_whisper):
    mel, tok = _inputs()
    keep = vocab_from_token_lists([[400, 500, 600]], 51865, 50257)
    s = from_whisper(tiny_whisper, vocab_keep=keep).eval()
    with torch.no_grad():
        full = tiny_whisper(mel, tok)
        pruned = s(mel, tok)
        assert torch.allclose(pruned[..., keep], full[..., keep], atol=1e-5)
        assert torch.isinf(pruned[..., 401]).all() and len(keep) == 3 + 51865 - 50257
        s.decoder.subset_logits = True
        assert torch.allclose(s(mel, tok), full[..., keep], atol=1e-5)
    assert s.decoder.to_subset_ids(torch.tensor([400, 401, -100])).tolist() == [0, -1, -100]


def test_short_window_is_the_sinusoid_prefix(tiny_whisper):
    s = set_audio_window(from_whisper(tiny_whisper), 50)
    assert s.dims.n_audio_ctx == 50
    assert torch.equal(s.encoder.positional_embedding, tiny_whisper.encoder.positional_embedding[:50])
    assert window_frames(30) == 1500 and window_frames(10) == 500
    with pytest.raises(DQWhisperError):
        window_frames(31)


def test_checkpoint_round_trip_and_openai_loader(tiny_whisper, tmp_path):
    mel, tok = _inputs(60)
    s = from_whisper(
        tiny_whisper,
        ctc_units=7,
        decoder_layers=[0, 2],
        n_audio_ctx=60,
        vocab_keep=vocab_from_token_lists([[400, 500]], 51865, 50257),
    ).eval()
    s.ctc_bpe = b"fake-sentencepiece-bytes"
    save_checkpoint(s, tmp_path / "s.pt", config={"a": 1}, step=3)
    r = load_checkpoint(tmp_path / "s.pt")
    with torch.no_grad():
        assert torch.equal(r(mel, tok), s(mel, tok))
        assert torch.equal(r.ctc_logits(r.encoder(mel)), s.ctc_logits(s.encoder(mel)))
    assert r.ctc_bpe == s.ctc_bpe and r.dims == s.dims
    # a float model we save stays loadable by openai-whisper's own loader
    save_checkpoint(from_whisper(tiny_whisper), tmp_path / "plain.pt")
    w = whisper.load_model(str(tmp_path / "plain.pt"), device="cpu")
    with torch.no_grad():
        assert torch.equal(
            w(mel[..., :200].new_zeros(1, 80, 200), tok[:1]),
            tiny_whisper(mel[..., :200].new_zeros(1, 80, 200), tok[:1]),
        )


def test_checkpoint_errors_name_the_file(tmp_path, tiny_whisper):
    with pytest.raises(DQWhisperError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "trunc.pt"
    save_checkpoint(from_whisper(tiny_whisper), bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DQWhisperError, match="trunc.pt could not be read"):
        load_checkpoint(bad)
    ckpt = torch.load(_save(tiny_whisper, tmp_path), weights_only=True)
    del ckpt["model_state_dict"]["decoder.ln.weight"]
    torch.save(ckpt, tmp_path / "missing_key.pt")
    with pytest.raises(DQWhisperError, match="missing_key.pt does not match.*decoder.ln.weight"):
        load_checkpoint(tmp_path / "missing_key.pt")


def _save(model, tmp_path):
    path = tmp_path / "ok.pt"
    save_checkpoint(from_whisper(model), path)
    return path
