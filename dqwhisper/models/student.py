"""The model every part of DQ-Whisper trains, quantizes, exports and decodes.

`DQWhisper` is an openai-whisper `Whisper` (so `whisper.decode`, its beam search and kv-cache hooks run unchanged)
with three additions: a CTC head on the encoder, an optional pruned vocabulary, and feature taps for layer
matching. See docs/DESIGN.md for the contract.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from whisper.model import AudioEncoder, LayerNorm, ModelDimensions, TextDecoder, Whisper

from dqwhisper.quant.prepare import prepare
from dqwhisper.utils import DQWhisperError, atomic_torch_save

FRAMES_PER_SECOND = 50  # encoder positions per second of audio (mel hop 10 ms, conv stride 2)
SAMPLES_PER_FRAME = 320  # 16 kHz samples per encoder position
CHECKPOINT_VERSION = 1


def window_frames(seconds: float) -> int:
    """Encoder positions for an audio window of `seconds` (30 s -> 1500)."""
    frames = int(round(seconds * FRAMES_PER_SECOND))
    if not 1 <= frames <= 1500:
        raise DQWhisperError(f"audio window of {seconds} s is outside Whisper's 0.02..30 s")
    return frames


def margin_frames(seconds: float, margin: float | None, n_audio_ctx: int) -> int:
    """Encoder positions of the window for `seconds` of audio plus `margin` seconds, rounded up to whole seconds and
    at most `n_audio_ctx` (the whole window when `margin` is None): decode.batch_window for the longest utterance
    of a batch, data.batch_window for each training utterance (the same rule, so training sees what decoding runs)."""
    if margin is None:
        return n_audio_ctx
    whole = math.ceil(seconds + margin - 1e-9)
    return max(1, min(n_audio_ctx, whole * FRAMES_PER_SECOND))


@contextlib.contextmanager
def swapped(obj: Any, name: str, value: Any):
    """Within: obj.name is value; the value before is restored after."""
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


class DQAudioEncoder(AudioEncoder):
    """Whisper's encoder plus feature taps, and per-row windows: inside `row_windows(lengths)` (a batch whose rows
    have encoder windows of different lengths, padded to the longest), row b is encoded as it is alone on its first
    lengths[b] positions, and the padding is never computed: each row's conv stem runs on its own mel frames, the
    rows' positions are packed into one sequence for every linear layer, and self-attention runs per row. The
    output holds zeros past each row's window."""

    row_lengths: Tensor | None = None

    def row_windows(self, lengths: Tensor | None):
        """Within: row b of the batch has lengths[b] encoder positions (None: every row has the whole window)."""
        return swapped(self, "row_lengths", lengths)

    def _window_error(self, mel: Tensor) -> DQWhisperError:
        n = self.positional_embedding.shape[0]
        return DQWhisperError(
            f"mel of {mel.shape[-1]} frames does not fit this encoder's window of {n} positions "
            f"(expected {2 * n} frames)"
        )

    def _stem(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 2 * n) -> conv stem + sinusoids (B, n, d), n at most the window."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        if x.shape[1] > self.positional_embedding.shape[0] or x.shape[2] != self.positional_embedding.shape[1]:
            raise self._window_error(mel)
        return (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 2*n_ctx) -> (B, n_ctx, d), as whisper's AudioEncoder (per-row windows: row_windows)."""
        n_ctx = self.positional_embedding.shape[0]
        lengths = self.row_lengths
        if lengths is None or not bool((lengths < n_ctx).any()):
            return super().forward(mel)
        if mel.shape[-1] != 2 * n_ctx or len(lengths) != mel.shape[0]:
            raise DQWhisperError(
                f"mel of shape {tuple(mel.shape)} for {len(lengths)} row windows of an encoder window of {n_ctx}"
            )
        sizes = [int(n) for n in lengths]
        x = torch.cat([self._stem(mel[b : b + 1, :, : 2 * n]) for b, n in enumerate(sizes)], dim=1)  # (1, N, d)
        for block in self.blocks:
            x = x + segment_attention(block.attn, block.attn_ln(x), sizes)
            x = x + block.mlp(block.mlp_ln(x))
        x = self.ln_post(x)
        out = x.new_zeros(len(sizes), n_ctx, x.shape[-1])
        out[torch.arange(n_ctx, device=x.device)[None] < lengths.to(x.device)[:, None]] = x[0]
        return out

    def forward_features(self, mel: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """mel (B, n_mels, 2*n_ctx) -> (out (B, n_ctx, d), block outputs [(B, n_ctx, d)], FFN acts [(B, n_ctx, 4d)])."""
        if self.row_lengths is not None:
            raise DQWhisperError("forward_features encodes whole windows; per-row windows are for decoding")
        if mel.shape[-1] != 2 * self.positional_embedding.shape[0]:
            raise self._window_error(mel)
        x = self._stem(mel)
        block_outs, ffn_acts = [], []
        for block in self.blocks:
            x = x + block.attn(block.attn_ln(x))[0]
            h = block.mlp[1](block.mlp[0](block.mlp_ln(x)))
            x = x + block.mlp[2](h)
            block_outs.append(x)
            ffn_acts.append(h)
        return self.ln_post(x), block_outs, ffn_acts


def segment_attention(attn: nn.Module, x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Whisper's self-attention `attn` over x (1, N, d) holding consecutive rows of `sizes` positions, each row
    attending only to itself (the linears run once on all N positions)."""
    q, k, v = attn.query(x), attn.key(x), attn.value(x)
    heads, out, start = attn.n_head, [], 0
    for n in sizes:
        qs, ks, vs = (t[:, start : start + n].view(1, n, heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs).permute(0, 2, 1, 3).flatten(start_dim=2))
        start += n
    return attn.out(torch.cat(out, dim=1))


def heads_first(t: Tensor, heads: int) -> Tensor:
    """(B, T, d) -> (B, heads, T, d / heads), a view (the layout scaled_dot_product_attention reads)."""
    return t.view(*t.shape[:2], heads, -1).permute(0, 2, 1, 3)


def cached_keys_values(attn: nn.Module, xa: Tensor, kv_cache: dict, group: int = 1) -> tuple[Tensor, Tensor]:
    """The cross-attention's keys and values of xa, (B, heads, T, d / heads) contiguous, computed once per decoding
    (kv_cache, whisper's dict that its hooks fill, under the keys (attn, "k") and (attn, "v"); beam search reorders
    only the self-attention's caches, within each utterance's rows, which share these). Whisper reads them every step
    as permuted views of (B, T, d): the same sums, so the same bits, but strided reads that took 1.8x the time of the
    contiguous layout at 8 rows x 1500 keys (6.7 vs 3.7 ms a call on a 2-core Xeon), the largest part of a decoder
    step. The (B, T, d) copies its hooks keep are dropped.
    group > 1: xa's rows come in runs of `group` copies of one encoder output (beam search, best-of sampling:
    DQTextDecoder.rows_share_audio); the projections run on one row per run, and the keys and values are kept once
    per run, (B / group, heads, T, d / heads): `masked_attention` attends each run's queries to them together."""
    if (attn, "k") not in kv_cache:
        shared = group > 1 and xa.shape[0] % group == 0
        rows = xa[::group] if shared else xa
        for proj, name in ((attn.key, "k"), (attn.value, "v")):
            kv_cache[(attn, name)] = heads_first(proj(rows), attn.n_head).contiguous()
            kv_cache.pop(proj, None)
    return kv_cache[(attn, "k")], kv_cache[(attn, "v")]


def masked_attention(
    attn: nn.Module, x: Tensor, xa: Tensor, key_mask: Tensor | None, kv_cache: dict | None = None, group: int = 1
) -> Tensor:
    """Whisper's attention `attn` (its query/key/value/out modules, fake-quantized or not) of x (B, L, d) over xa
    (B, T, d), each row attending only to its keys where key_mask (B, T) is True (None: all): a row whose encoder
    window is shorter than the batch's sees exactly what it sees alone on its window (the padding is never attended).
    The decoder's cross-attention (the encoder's rows use `segment_attention`); with whisper's kv_cache (decoding),
    the keys and values of xa are computed once (`cached_keys_values`). Rows in runs of `group` sharing one encoder
    output (beam search, best-of sampling) attend as one sequence of group * L queries to their run's one copy of
    the keys and values (cross-attention has no causal mask: each query sees the same keys as alone), so a step
    reads each utterance's keys and values once, not once per row: at 10 rows x 400 keys the attention call read
    16 MB a layer and took 0.8 ms. The same as whisper's MultiHeadAttention without a mask, to float rounding."""
    heads = attn.n_head
    if kv_cache is not None:
        k, v = cached_keys_values(attn, xa, kv_cache, group)
    else:
        k, v = heads_first(attn.key(xa), heads), heads_first(attn.value(xa), heads)
    q = heads_first(attn.query(x), heads)  # (B, heads, L, dh)
    runs = k.shape[0]
    grouped = runs != q.shape[0]
    if grouped:  # (B, heads, L, dh) -> (B / group, heads, group * L, dh): a run's queries one after another
        q = q.reshape(runs, group, heads, *q.shape[2:]).transpose(1, 2).flatten(2, 3)
    mask = None
    if key_mask is not None:
        if grouped:
            key_mask = key_mask[::group]  # a run's rows share their encoder window
        if key_mask.shape != (k.shape[0], k.shape[2]):
            raise DQWhisperError(f"key mask of shape {tuple(key_mask.shape)} for keys of shape {tuple(k.shape[:3])}")
        mask = key_mask[:, None, None, :]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if grouped:  # back to (B, heads, L, dh)
        a = a.unflatten(2, (group, -1)).transpose(1, 2).flatten(0, 1)
    return attn.out(a.permute(0, 2, 1, 3).flatten(start_dim=2))


class DQTextDecoder(TextDecoder):
    """Whisper's decoder with an optional pruned vocabulary and feature taps.

    Takes full-vocabulary token ids. Returns full-vocabulary logits (-inf at pruned ids) unless `subset_logits` is
    set, then logits over `vocab_keep` in its order. Inside `key_lengths(lengths)` (training on a batch whose rows
    have encoder windows of different lengths, padded to the longest), row b's cross-attention sees only its first
    lengths[b] encoder positions.
    """

    def __init__(
        self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int, vocab_keep: Tensor | None = None
    ):
        rows = n_vocab if vocab_keep is None else len(vocab_keep)
        super().__init__(rows, n_ctx, n_state, n_head, n_layer)
        self.n_vocab_full = n_vocab
        self.subset_logits = False
        self.dropout = 0.0  # residual-branch dropout in training (student.dropout); Whisper itself has none
        self.logit_mask: Tensor | None = None  # inside logits_at(mask): logits only where mask (B, L) is true
        self.key_mask: Tensor | None = None
        self.shared_rows = 1  # inside rows_share_audio(n): batch rows in runs of n reading one encoder output
        if vocab_keep is None:
            self.vocab_keep = None
            self.full_to_sub = None
        else:
            keep = torch.as_tensor(vocab_keep, dtype=torch.long)
            if keep.ndim != 1 or len(keep) == 0 or bool((keep[1:] <= keep[:-1]).any()) or keep[-1] >= n_vocab:
                raise DQWhisperError("vocab_keep must be a sorted list of distinct token ids below n_vocab")
            self.register_buffer("vocab_keep", keep)
            # ids outside the kept set map to -1; as inputs they are replaced by the last kept id (a special token)
            full_to_sub = torch.full((n_vocab,), -1, dtype=torch.long)
            full_to_sub[keep] = torch.arange(len(keep))
            self.register_buffer("full_to_sub", full_to_sub)

    @property
    def pruned(self) -> bool:
        return self.vocab_keep is not None

    def to_subset_ids(self, tokens: Tensor) -> Tensor:
        """Full ids -> row ids of the pruned embedding; -1 where the id was pruned (identity when not pruned)."""
        if not self.pruned:
            return tokens
        return torch.where(tokens >= 0, self.full_to_sub[tokens.clamp(min=0)], tokens)

    def project(self, x: Tensor) -> Tensor:
        """Hidden states (B, L, d) -> logits over the embedding's rows (tied projection)."""
        emb = self.token_embedding
        if hasattr(emb, "project"):
            return emb.project(x).float()
        return (x @ emb.weight.to(x.dtype).t()).float()

    def _embed(self, tokens: Tensor, offset: int) -> Tensor:
        ids = tokens
        if self.pruned:
            ids = self.to_subset_ids(tokens)
            ids = torch.where(ids < 0, torch.full_like(ids, len(self.vocab_keep) - 1), ids)
        return self.token_embedding(ids) + self.positional_embedding[offset : offset + tokens.shape[-1]]

    def logits_at(self, mask: Tensor | None):
        """Within: forward and forward_features return logits (N, V) for the N positions where mask (B, L) is
        true, in row-major order, instead of (B, L, V): training projects onto the vocabulary only where a loss
        is counted (not at the prompt and padding, half of a demo batch)."""
        return swapped(self, "logit_mask", mask)

    def _head(self, h: Tensor) -> Tensor:
        if self.logit_mask is not None:
            h = h[self.logit_mask.to(h.device)]
        return self._expand(self.project(self.ln(h)))

    def _expand(self, logits: Tensor) -> Tensor:
        if not self.pruned or self.subset_logits:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.n_vocab_full), float("-inf"))
        return full.index_copy_(-1, self.vocab_keep, logits)

    @contextlib.contextmanager
    def key_lengths(self, lengths: Tensor | None, n_keys: int):
        """Within: cross-attention of row b over its first lengths[b] of the n_keys encoder positions (no mask when
        lengths is None or every row has all n_keys), in training and in kv-cached decoding (the mask's rows are
        the decoder's batch rows); the mask before is restored after."""
        before = self.key_mask
        self.key_mask = None
        if lengths is not None and bool((lengths < n_keys).any()):
            self.key_mask = torch.arange(n_keys, device=lengths.device)[None] < lengths[:, None]
        try:
            yield
        finally:
            self.key_mask = before

    @contextlib.contextmanager
    def rows_share_audio(self, n: int):
        """Within: the decoder's batch rows come in runs of n that cross-attend to one encoder output, repeated n
        times (whisper's beam search and best-of sampling: DecodingTask's n_group); kv-cached decoding projects each
        run's keys and values once (`cached_keys_values`). The setting before is restored after."""
        before, self.shared_rows = self.shared_rows, max(1, int(n))
        try:
            yield
        finally:
            self.shared_rows = before

    def _cross(self, block: nn.Module, h: Tensor, xa: Tensor, kv_cache: dict | None = None) -> Tensor:
        """Whisper's cross-attention module in training (where hooks on it see what whisper's would), ours when
        decoding (kv_cache) or with per-row key lengths."""
        if self.key_mask is None and kv_cache is None:
            return block.cross_attn(block.cross_attn_ln(h), xa)[0]
        mask = None if self.key_mask is None else self.key_mask.to(h.device)
        return masked_attention(block.cross_attn, block.cross_attn_ln(h), xa, mask, kv_cache, self.shared_rows)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else x

    def _one_embedding_weight(self):
        """A fake-quantized embedding's one weight for the lookup and the projection of a pass (see one_weight)."""
        emb = self.token_embedding
        return emb.one_weight() if hasattr(emb, "one_weight") else contextlib.nullcontext()

    def forward(self, x: Tensor, xa: Tensor, kv_cache: dict | None = None) -> Tensor:
        first = self.blocks[0].attn.key
        offset = kv_cache[first].shape[1] if kv_cache and first in kv_cache else 0
        with self._one_embedding_weight():
            h = self._drop(self._embed(x, offset).to(xa.dtype))
            for block in self.blocks:  # whisper's ResidualAttentionBlock.forward, with the cross-attention of _cross
                h = h + self._drop(block.attn(block.attn_ln(h), mask=self.mask, kv_cache=kv_cache)[0])
                h = h + self._drop(self._cross(block, h, xa, kv_cache))
                h = h + self._drop(block.mlp(block.mlp_ln(h)))
            return self._head(h)

    def forward_features(
        self, x: Tensor, xa: Tensor, kv_cache: dict | None = None
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Teacher-forced pass. x (B, L) full ids, xa (B, T, d) ->
        (logits, FFN acts [(B, L, 4d)] per layer, block outputs [(B, L, d)] per layer).
        kv_cache: a dict that keeps the cross-attention's keys and values of xa (`cached_keys_values`), so passes
        over other token sequences on the same xa project them once (the self-attention is not cached)."""
        with self._one_embedding_weight():
            h = self._drop(self._embed(x, 0).to(xa.dtype))
            ffn_acts, block_outs = [], []
            for block in self.blocks:
                h = h + self._drop(block.attn(block.attn_ln(h), mask=self.mask)[0])
                h = h + self._drop(self._cross(block, h, xa, kv_cache))
                a = block.mlp[1](block.mlp[0](block.mlp_ln(h)))
                h = h + self._drop(block.mlp[2](a))
                ffn_acts.append(a)
                block_outs.append(h)
            return self._head(h), ffn_acts, block_outs


class DQWhisper(Whisper):
    """A Whisper with a CTC head on the encoder and an optional pruned decoder vocabulary."""

    def __init__(self, dims: ModelDimensions, ctc_units: int = 0, vocab_keep: Sequence[int] | Tensor | None = None):
        nn.Module.__init__(self)
        self.dims = dims
        self.encoder = DQAudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        keep = (
            None
            if vocab_keep is None
            else torch.as_tensor(list(vocab_keep) if not torch.is_tensor(vocab_keep) else vocab_keep, dtype=torch.long)
        )
        self.decoder = DQTextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer, keep
        )
        all_heads = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        all_heads[dims.n_text_layer // 2 :] = True
        self.register_buffer("alignment_heads", all_heads.to_sparse(), persistent=False)
        self.ctc_units = int(ctc_units)
        self.ctc_head = nn.Linear(dims.n_audio_state, self.ctc_units + 1) if self.ctc_units > 0 else None
        self.quant_config: dict | None = None  # set by dqwhisper.quant.prepare
        self.ctc_bpe: bytes | None = None  # serialized sentencepiece model of the CTC units

    def ctc_logits(self, audio_features: Tensor) -> Tensor:
        """(B, T, d) -> (B, T, ctc_units + 1) CTC logits, blank = 0."""
        if self.ctc_head is None:
            raise DQWhisperError("this model has no CTC head (ctc_units = 0)")
        return self.ctc_head(audio_features).float()

    @property
    def audio_window_seconds(self) -> float:
        return self.dims.n_audio_ctx / FRAMES_PER_SECOND


def set_audio_window(model: Whisper, n_audio_ctx: int) -> Whisper:
    """Shrink (never grow) the encoder window in place: keep the first `n_audio_ctx` rows of the sinusoid table."""
    pos = model.encoder.positional_embedding
    if n_audio_ctx > pos.shape[0]:
        raise DQWhisperError(f"cannot grow the audio window from {pos.shape[0]} to {n_audio_ctx} positions")
    if n_audio_ctx != pos.shape[0]:
        model.encoder.positional_embedding = pos[:n_audio_ctx].clone()
        model.dims = ModelDimensions(**{**asdict(model.dims), "n_audio_ctx": n_audio_ctx})
    return model


def from_whisper(
    model: Whisper,
    ctc_units: int = 0,
    vocab_keep: Sequence[int] | None = None,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
    n_audio_ctx: int | None = None,
) -> DQWhisper:
    """Build a DQWhisper from any Whisper, copying weights.

    encoder_layers / decoder_layers choose which of the source's blocks the new model keeps, in order (None: all),
    as distil-whisper initialises its student from teacher layers. vocab_keep prunes the token embedding to those
    rows. n_audio_ctx shortens the audio window.
    """
    src = model.dims
    enc = list(range(src.n_audio_layer)) if encoder_layers is None else list(encoder_layers)
    dec = list(range(src.n_text_layer)) if decoder_layers is None else list(decoder_layers)
    for name, chosen, n in (("encoder", enc, src.n_audio_layer), ("decoder", dec, src.n_text_layer)):
        if not chosen or any(not 0 <= i < n for i in chosen):
            raise DQWhisperError(f"{name} layers {chosen} are not within the source's {n} layers")
    ctx = src.n_audio_ctx if n_audio_ctx is None else n_audio_ctx
    if ctx > src.n_audio_ctx:
        raise DQWhisperError(f"audio window {ctx} is larger than the source's {src.n_audio_ctx}")
    dims = ModelDimensions(**{**asdict(src), "n_audio_layer": len(enc), "n_text_layer": len(dec), "n_audio_ctx": ctx})
    student = DQWhisper(dims, ctc_units=ctc_units, vocab_keep=vocab_keep)

    sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] == "blocks":
            chosen = enc if parts[0] == "encoder" else dec
            i = int(parts[2])
            for j, k in enumerate(chosen):
                if k == i:
                    out[".".join([parts[0], "blocks", str(j)] + parts[3:])] = value
            continue
        if key == "encoder.positional_embedding":
            value = value[:ctx]
        if key == "decoder.token_embedding.weight" and student.decoder.pruned:
            src_keep = getattr(model.decoder, "vocab_keep", None)
            if src_keep is not None:  # already pruned: map through the source's subset
                idx = model.decoder.full_to_sub[student.decoder.vocab_keep]
                if bool((idx < 0).any()):
                    raise DQWhisperError("vocab_keep asks for token ids that the source model pruned")
                value = value[idx]
            else:
                value = value[student.decoder.vocab_keep]
        if key.startswith("decoder.vocab_keep") or key.startswith("decoder.full_to_sub"):
            continue
        if (
            key.startswith("ctc_head.")
            and student.ctc_head is not None
            and student.ctc_head.weight.shape[0] == getattr(model, "ctc_head").weight.shape[0]
        ):
            out[key] = value
            continue
        if key.startswith("ctc_head."):
            continue
        out[key] = value
    missing, unexpected = student.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.startswith(("ctc_head.", "decoder.vocab_keep", "decoder.full_to_sub"))]
    if missing or unexpected:
        raise DQWhisperError(f"weight copy failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    student.ctc_bpe = getattr(model, "ctc_bpe", None)
    return student.to(next(model.parameters()).device)


def vocab_from_token_lists(token_lists: Sequence[Sequence[int]], n_vocab: int, first_special: int) -> list[int]:
    """The sorted ids a pruned vocabulary keeps: every id seen in the token lists plus every special token
    (ids >= first_special, i.e. tokenizer.eot and above)."""
    keep = set(range(first_special, n_vocab))
    for tokens in token_lists:
        keep.update(int(t) for t in tokens)
    return sorted(keep)


def save_checkpoint(
    model: DQWhisper | Whisper, path: str | Path, config: dict | None = None, **train_state: Any
) -> None:
    """Atomic save in openai-whisper's layout plus a `dqwhisper` section (docs/DESIGN.md)."""
    keep = getattr(model.decoder, "vocab_keep", None)
    meta = {
        "version": CHECKPOINT_VERSION,
        "ctc_units": int(getattr(model, "ctc_units", 0)),
        "vocab_keep": None if keep is None else keep.tolist(),
        "quant": getattr(model, "quant_config", None),
        "bpe_model": getattr(model, "ctc_bpe", None),
        "config": config,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"dims": asdict(model.dims), "model_state_dict": state, "dqwhisper": meta, **train_state}, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load(weights_only=True) with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise DQWhisperError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise DQWhisperError(f"checkpoint {path} is a directory, expected a .pt file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        first = str(e).splitlines()[0] if str(e) else ""
        raise DQWhisperError(f"checkpoint {path} could not be read ({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise DQWhisperError(f"checkpoint {path} is not a Whisper checkpoint (no 'dims' / 'model_state_dict')")
    return ckpt


def model_from_checkpoint(ckpt: dict, source: str = "<checkpoint>") -> DQWhisper:
    try:
        dims = ModelDimensions(**ckpt["dims"])
    except TypeError as e:
        raise DQWhisperError(f"checkpoint {source} has bad dims {ckpt['dims']}: {e}") from e
    meta = ckpt.get("dqwhisper") or {}
    sd = ckpt["model_state_dict"]
    if dims.n_audio_ctx != 1500 and "encoder.positional_embedding" not in sd:
        raise DQWhisperError(f"checkpoint {source} has a {dims.n_audio_ctx}-position window but no positional table")
    model = DQWhisper(dims, ctc_units=meta.get("ctc_units", 0), vocab_keep=meta.get("vocab_keep"))
    if meta.get("quant"):
        prepare(model, meta["quant"])
    model.ctc_bpe = meta.get("bpe_model")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DQWhisperError(
            f"checkpoint {source} does not match its architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> DQWhisper:
    """Any checkpoint this project writes, or an openai-whisper one, as a DQWhisper on `device` in eval mode."""
    model = model_from_checkpoint(read_checkpoint(path), str(path))
    return model.to(device).eval()


def export_state(model_or_ckpt: Whisper | dict) -> dict[str, Any]:
    """What the converters take, from a model or a checkpoint dict: `dims` (ModelDimensions), `state_dict`,
    `vocab_keep` (list or None), `alignment_heads` (list of [layer, head] or None)."""
    if isinstance(model_or_ckpt, Whisper):
        m = model_or_ckpt
        keep = getattr(m.decoder, "vocab_keep", None)
        heads = m.alignment_heads.to_dense().nonzero().tolist() if m.alignment_heads is not None else None
        return {
            "dims": m.dims,
            "state_dict": dict(m.state_dict()),
            "vocab_keep": None if keep is None else keep.tolist(),
            "alignment_heads": heads,
        }
    dims = model_or_ckpt["dims"]
    return {
        "dims": dims if isinstance(dims, ModelDimensions) else ModelDimensions(**dims),
        "state_dict": dict(model_or_ckpt["model_state_dict"]),
        "vocab_keep": (model_or_ckpt.get("dqwhisper") or {}).get("vocab_keep"),
        "alignment_heads": model_or_ckpt.get("alignment_heads"),
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DQWhisper",
    "DQTextDecoder",
    "DQAudioEncoder",
    "LayerNorm",
    "set_audio_window",
    "from_whisper",
    "window_frames",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "vocab_from_token_lists",
    "export_state",
    "count_parameters",
    "FRAMES_PER_SECOND",
    "SAMPLES_PER_FRAME",
]
