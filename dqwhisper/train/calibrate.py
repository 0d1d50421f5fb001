"""GPTQ calibration on training audio: the glue between a data set and `dqwhisper.quant.gptq`.

With `quant.gptq=true` every quantized linear and convolution is rounded by GPTQ instead of to the nearest code,
before the frozen encoder's outputs are cached: frozen weights (the encoder of a QAT student, everything under PTQ)
keep those codes, trainable ones start QAT from them. `quant.gptq_utts` sets the calibration size.
"""

from __future__ import annotations

import torch
from torch import nn

from dqwhisper.data.dataset import WhisperDataset, collate
from dqwhisper.data.sampler import chunks_by_key
from dqwhisper.decoding.audio import encoder_window
from dqwhisper.models.student import FRAMES_PER_SECOND, margin_frames
from dqwhisper.quant.gptq import gptq_
from dqwhisper.quant.prepare import quantized_modules
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


def calibration_batches(
    ds: WhisperDataset, n_utts: int, batch_size: int = 8, margin: float | None = None
) -> list[dict]:
    """`n_utts` utterances evenly spaced over `ds` (every language stays), collated in batches; bad ones skipped.
    `margin` (data.batch_window): each utterance gets its training window (its audio + margin, whole seconds), the
    mel cut to it, in batches of one window (`window`: encoder positions)."""
    n = min(n_utts, len(ds.items))
    items = [ds[int(i * len(ds.items) / n)] for i in range(n)]
    items = [it for it in items if it is not None]
    if not items:
        raise DQWhisperError(f"GPTQ calibration: no readable utterance in {ds.data.path}")
    pad = ds.tokenizer.eot
    windows = [margin_frames(it["n_frames"] / FRAMES_PER_SECOND, margin, ds.n_audio_ctx) for it in items]
    batches = []
    for chunk in chunks_by_key(list(range(len(items))), windows, batch_size):
        w = windows[chunk[0]]
        batches.append(dict(collate([dict(items[i], mel=items[i]["mel"][:, : 2 * w]) for i in chunk], pad), window=w))
    return batches


@torch.no_grad()
def rank_embedding_rows(
    model: nn.Module, batches: list[dict], device: torch.device | str, top: int = 16
) -> torch.Tensor:
    """Token ids, most used first, by the float `model` teacher-forced on `batches` (calibration_batches): each
    id counts once per position where it is among the `top` logits, and 100 times per position where it is the
    target. Ids never seen keep their order (stable sort). The rows that `quant.embedding_hi_rows` widens."""
    dec = model.decoder
    n_vocab = dec.token_embedding.weight.shape[0]
    counts = torch.zeros(n_vocab, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for b in batches:
        with encoder_window(model, b["window"]):
            logits = model(b["mel"].to(device), b["tokens_in"].to(device)).float().cpu()
        if logits.shape[-1] != n_vocab:  # a pruned student's logits over the full vocabulary: its own rows
            logits = logits[..., dec.vocab_keep.cpu()]
        mask = b["targets"] != -100
        targets = dec.to_subset_ids(b["targets"][mask].to(device)).cpu()
        counts += torch.bincount(logits[mask].topk(min(top, n_vocab), -1).indices.reshape(-1), minlength=n_vocab)
        counts += 100 * torch.bincount(targets[targets >= 0], minlength=n_vocab)
    model.train(was_training)
    return counts.argsort(descending=True, stable=True)


def embedding_rows_by_use(
    model: nn.Module, ds: WhisperDataset, n_utts: int, margin: float | None, device: torch.device | str
) -> torch.Tensor:
    """rank_embedding_rows on `n_utts` utterances of `ds` (0: all), each in its training window (`margin`)."""
    batches = calibration_batches(ds, n_utts or len(ds.items), margin=margin)
    log.info("token embedding rows ranked on %d utterances of %s", sum(len(b["mel"]) for b in batches), ds.data.path)
    return rank_embedding_rows(model, batches, device)


def _encode(model: nn.Module, batch: dict, device: torch.device | str) -> torch.Tensor:
    with encoder_window(model, batch["window"]):
        return model.encoder(batch["mel"].to(device))


def gptq_calibrate(
    model: nn.Module,
    ds: WhisperDataset,
    n_utts: int,
    scope: str,
    device: torch.device | str,
    margin: float | None = None,
    act_order: bool = False,
) -> dict:
    """GPTQ-round the fake-quantized layers of `model` under `scope` ("encoder.", "decoder." or "" for both) on
    `n_utts` utterances of `ds`: the encoder first, then the decoder on the rounded encoder's outputs. `margin`:
    data.batch_window of the model's training (the encoder runs on each utterance's window, as trained).
    `act_order`: GPTQ's columns in order of decreasing Hessian diagonal (quant.gptq_act_order)."""
    batches = calibration_batches(ds, n_utts, margin=margin)
    log.info(
        "GPTQ: %d calibration utterances from %s, scope %r",
        sum(len(b["mel"]) for b in batches),
        ds.data.path,
        scope or "all",
    )
    ratios = {}
    quantized = {n.split(".")[0] for n, _ in quantized_modules(model)}
    if scope in ("", "encoder", "encoder.") and "encoder" in quantized:
        ratios.update(
            gptq_(model, batches, scope="encoder.", run=lambda m, b: _encode(m, b, device), act_order=act_order)
        )
    if scope in ("", "decoder", "decoder.") and "decoder" in quantized:
        with torch.no_grad():  # the encoder is final now: its outputs once, not in every decoder block's pass
            dec_batches = [(b["tokens_in"].to(device), _encode(model, b, device)) for b in batches]
        ratios.update(gptq_(model, dec_batches, scope="decoder.", run=lambda m, b: m.decoder(*b), act_order=act_order))
    if not ratios:
        raise DQWhisperError(f"GPTQ: no quantized linear or convolution in scope {scope or 'all'!r}")
    return ratios
