"""The training and dev sets with their caches: frozen encoder outputs and frozen teacher targets read from disk
(dqwhisper.cache) instead of computed every step, the collate function that batches them, and the filling of the
caches (once, by rank 0, before training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from dqwhisper.cache import FeatureCache, audio_key, module_key, tokens_key
from dqwhisper.data.dataset import WhisperDataset, collate
from dqwhisper.data.sampler import chunks_by_key
from dqwhisper.decoding.audio import encoder_window
from dqwhisper.distill.teacher import TeacherTargets
from dqwhisper.models.student import FRAMES_PER_SECOND, DQWhisper, margin_frames
from dqwhisper.utils import DQWhisperError, autocast, get_logger

log = get_logger(__name__)


def utterance_windows(base: WhisperDataset, margin: float | None) -> list[int]:
    """Encoder window (positions) of each item: its audio + `margin` seconds rounded up to whole seconds
    (`margin_frames`, data.batch_window); the dataset's whole window for every item when `margin` is None."""
    ctx = base.n_audio_ctx
    return [margin_frames(n / FRAMES_PER_SECOND, margin, ctx) for n in base.lengths]


class TrainingSet(torch.utils.data.Dataset):
    """A WhisperDataset whose items come with cached encoder outputs (`enc`, instead of audio) and cached teacher
    outputs (`t_logits` [, `t_index`], `t_feats`) where those caches are in use.

    `margin` (data.batch_window) gives each utterance its own encoder window (`utterance_windows`): its cached
    encoder output has that many positions, and `windows` lets the sampler batch utterances of one window.
    `teacher_margin`: the same for the teacher's encoder cache (None: its whole window)."""

    def __init__(
        self,
        base: WhisperDataset,
        enc_cache: FeatureCache | None = None,
        teacher_enc_cache: FeatureCache | None = None,
        teacher_caches: list[FeatureCache] = (),
        margin: float | None = None,
        teacher_margin: float | None = None,
    ):
        self.base = base
        self.margin = margin
        self.enc_windows = utterance_windows(base, margin)  # by position in base
        self.teacher_enc_windows = utterance_windows(base, teacher_margin)
        self.enc_cache = enc_cache
        self.teacher_enc_cache = teacher_enc_cache
        self.teacher_caches = list(teacher_caches)  # teacher logits; teacher features (when matching)
        self.audio_keys = (
            [audio_key(base.data, utt) for utt, _, _, _ in base.items]
            if (enc_cache or teacher_enc_cache or self.teacher_caches)
            else []
        )
        self.index = list(range(len(base)))  # items usable (cache filled), positions in base

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> list[int]:
        all_lengths = self.base.lengths
        return [all_lengths[i] for i in self.index]

    @property
    def windows(self) -> list[int]:
        """Encoder window (positions) of each usable item."""
        return [self.enc_windows[i] for i in self.index]

    @property
    def languages(self) -> list[str]:
        """utt2lang of each usable item."""
        return [self.base.items[i][0].lang for i in self.index]

    def tokens(self, i: int) -> list[int]:
        return self.base.items[i][1]

    def teacher_key(self, i: int) -> str:
        return tokens_key(self.audio_keys[i], self.tokens(i))

    def __getitem__(self, j: int) -> dict | None:
        i = self.index[j]
        if self.enc_cache is not None:
            utt, tokens, ctc, _ = self.base.items[i]
            entry = self.enc_cache.get(self.audio_keys[i])
            item = dict(
                utt_id=utt.utt_id,
                lang=utt.lang,
                mel=torch.zeros(0),
                tokens=list(tokens),
                ctc_targets=list(ctc),
                n_frames=int(entry["n_frames"]),
                enc=entry["enc"],
                prefix_len=self.base.prefix_len,
            )
        else:
            item = self.base[i]
            if item is None:
                return None
        if self.teacher_enc_cache is not None:
            item["t_enc"] = self.teacher_enc_cache.get(self.audio_keys[i])["enc"]
        for cache in self.teacher_caches:
            item.update(cache.get(self.teacher_key(i)))
        return item

    def drop_unfilled(self) -> None:
        """Keep the utterances every cache has (audio that failed while filling is left out)."""
        caches = [c for c in (self.enc_cache, self.teacher_enc_cache) if c is not None]
        self.index = [i for i in self.index if all(c.has(self.audio_keys[i]) for c in caches)]
        self.index = [i for i in self.index if all(c.has(self.teacher_key(i)) for c in self.teacher_caches)]


def collate_training(items: list[dict | None], pad_id: int) -> dict:
    items = [it for it in items if it is not None]
    batch = collate(items, pad_id)
    length = batch["tokens_in"].shape[1]

    def pad(key: str, fill: float = 0.0, to: int | None = None) -> Tensor:
        """items[*][key] (n_b, ...) stacked along a new batch axis, each padded with `fill` to `to` (default: the
        batch's token length) rows."""
        first = items[0][key]
        out = first.new_full((len(items), to or length, *first.shape[1:]), fill)
        for b, it in enumerate(items):
            out[b, : it[key].shape[0]] = it[key]
        return out

    for key in ("enc", "t_enc"):  # cached encoder outputs; rows of different windows are padded to the longest
        if key in items[0]:
            windows = [it[key].shape[0] for it in items]
            if len(set(windows)) == 1:
                batch[key] = torch.stack([it[key] for it in items])
            else:
                batch[key], batch[f"{key}_window"] = pad(key, to=max(windows)), torch.tensor(windows)

    if "t_logits" in items[0]:
        batch["t_logits"] = pad("t_logits")
        if "t_index" in items[0]:
            batch["t_index"] = pad("t_index", 0)
    if "t_feats" in items[0]:
        n_layers = items[0]["t_feats"].shape[0]
        feats = []
        for layer in range(n_layers):
            out = items[0]["t_feats"].new_zeros((len(items), length, items[0]["t_feats"].shape[-1]))
            for b, it in enumerate(items):
                out[b, : it["t_feats"].shape[1]] = it["t_feats"][layer]
            feats.append(out)
        batch["t_feats"] = feats
    return batch


@dataclass
class Caches:
    """The caches in use (None: not cached). `teacher_enc` only when the teacher's encoder differs from the
    student's (else both read `enc`)."""

    enc: FeatureCache | None = None
    teacher_enc: FeatureCache | None = None
    teacher_logits: FeatureCache | None = None
    teacher_feats: FeatureCache | None = None

    @property
    def teacher(self) -> list[FeatureCache]:
        return [c for c in (self.teacher_logits, self.teacher_feats) if c is not None]


class CacheFiller:
    """Opens the caches a run uses (keyed by content: audio and model weights) and computes what is missing."""

    def __init__(
        self,
        root: Path,
        dtype: torch.dtype,
        n_audio_ctx: int,
        device: torch.device,
        batch_size: int = 16,
        amp_dtype: torch.dtype | None = None,
        progress: bool = True,
    ):
        self.root, self.dtype, self.n_audio_ctx, self.device = root, dtype, n_audio_ctx, device
        self.batch_size, self.amp_dtype, self.progress = batch_size, amp_dtype, progress

    def encoder_cache(self, model: DQWhisper, what: str, margin: float | None = None) -> FeatureCache:
        """The encoder outputs of `model` for the whole window, or (margin = data.batch_window) for each utterance's
        own window."""
        windows = {} if margin is None else {"batch_window": float(margin)}
        key = module_key(
            model.encoder,
            kind="encoder",
            n_mels=model.dims.n_mels,
            n_audio_ctx=self.n_audio_ctx,
            dtype=str(self.dtype),
            mel="zeros",
            **windows,
        )
        info = {"what": what, "n_audio_ctx": self.n_audio_ctx, **windows}
        return FeatureCache(self.root / "encoder", key, info=info)

    def open(self, cfg, student: DQWhisper, teacher: DQWhisper | None) -> Caches:
        """`cfg`: the whole training config (trainer.cache_*, student.freeze_encoder, loss.kd_topk, loss.match)."""
        caches = Caches()
        margin, t_margin = window_margins(cfg)
        if cfg.student.freeze_encoder and cfg.trainer.cache_encoder:
            caches.enc = self.encoder_cache(student, "student encoder", margin)
        if teacher is not None and cfg.trainer.cache_encoder:
            tcache = self.encoder_cache(teacher, "teacher encoder", t_margin)
            if caches.enc is None or tcache.dir != caches.enc.dir:
                caches.teacher_enc = tcache
        if teacher is not None and cfg.trainer.cache_teacher and cfg.trainer.cache_encoder:
            # logits and matching features in two caches, so that KD-only and KD + matching runs share the logits
            m = cfg.loss.match
            vocab = student.decoder.vocab_keep
            keep = None if vocab is None else vocab.tolist()
            t_enc = caches.teacher_enc or caches.enc or self.encoder_cache(teacher, "teacher", t_margin)
            common = dict(dtype=str(self.dtype), encoder=t_enc.dir.name)
            key = module_key(teacher.decoder, kind="teacher_logits", keep=keep, topk=cfg.loss.kd_topk, **common)
            caches.teacher_logits = FeatureCache(
                self.root / "teacher_logits", key, info={"teacher": cfg.teacher.name, "topk": cfg.loss.kd_topk}
            )
            if m.enabled:
                key = module_key(teacher.decoder, kind="teacher_features", feature=m.feature, **common)
                caches.teacher_feats = FeatureCache(
                    self.root / "teacher_features", key, info={"teacher": cfg.teacher.name, "feature": m.feature}
                )
        return caches

    def fill(
        self,
        train_set: TrainingSet,
        dev_set: TrainingSet,
        caches: Caches,
        student: DQWhisper,
        teacher: TeacherTargets | None,
    ) -> None:
        t0 = time.time()
        for ds, name in ((train_set, "train"), (dev_set, "dev")):
            self.fill_encoder(ds, ds.enc_cache, student, name, ds.enc_windows)
            if ds is train_set:
                teacher_model = teacher and teacher.teacher
                self.fill_encoder(ds, ds.teacher_enc_cache, teacher_model, "train (teacher)", ds.teacher_enc_windows)
                self.fill_teacher(ds, teacher, caches.teacher_feats)
        if time.time() - t0 > 1:
            log.info("caches ready in %.1f s", time.time() - t0)

    def fill_encoder(
        self, ds: TrainingSet, cache: FeatureCache | None, model: DQWhisper | None, name: str, windows: list[int]
    ) -> None:
        """Compute the missing encoder outputs, in batches of one window (`windows`, positions by base index): the
        mel cut to the window's frames is the mel of the audio zero-padded to that window."""
        if cache is None:
            return
        todo = [i for i in ds.index if not cache.has(ds.audio_keys[i])]
        if not todo:
            return
        bs = self.batch_size
        chunks = chunks_by_key(todo, windows, bs)
        model.encoder.eval()
        with torch.no_grad():
            for chunk in tqdm(chunks, desc=f"encoder cache {name}", unit="batch", disable=not self.progress):
                items = [ds.base[i] for i in chunk]
                ok = [(i, it) for i, it in zip(chunk, items) if it is not None]
                if not ok:
                    continue
                w = windows[chunk[0]]
                mel = torch.stack([it["mel"][:, : 2 * w] for _, it in ok]).to(self.device)
                with autocast(self.amp_dtype), encoder_window(model, w):
                    out = model.encoder(mel)
                for (i, it), enc in zip(ok, out):
                    cache.put(ds.audio_keys[i], {"enc": enc.to(self.dtype), "n_frames": torch.tensor(it["n_frames"])})
        log.info("encoder cache %s: %d utterances computed into %s", name, len(todo), cache.dir)

    def fill_teacher(self, ds: TrainingSet, teacher: TeacherTargets | None, feats: FeatureCache | None) -> None:
        if not ds.teacher_caches:
            return
        enc_cache = ds.teacher_enc_cache or ds.enc_cache
        todo = [
            i
            for i in ds.index
            if enc_cache.has(ds.audio_keys[i]) and not all(c.has(ds.teacher_key(i)) for c in ds.teacher_caches)
        ]
        if not todo:
            return
        bs = self.batch_size
        pad = ds.base.tokenizer.eot
        windows = ds.teacher_enc_windows if ds.teacher_enc_cache is not None else ds.enc_windows
        chunks = chunks_by_key(todo, windows, bs)
        with torch.no_grad():
            for chunk in tqdm(chunks, desc="teacher cache", unit="batch", disable=not self.progress):
                toks = [ds.tokens(i)[:-1] for i in chunk]
                length = max(map(len, toks))
                tokens_in = torch.full((len(chunk), length), pad, dtype=torch.long)
                for b, t in enumerate(toks):
                    tokens_in[b, : len(t)] = torch.tensor(t)
                xa = torch.stack([enc_cache.get(ds.audio_keys[i])["enc"] for i in chunk]).float()
                out = teacher.outputs(tokens_in.to(self.device), xa.to(self.device))
                for b, i in enumerate(chunk):
                    n = len(toks[b])
                    entry = {
                        k: (v[b, :n] if k != "t_feats" else v[:, b, :n]).to(
                            self.dtype if v.is_floating_point() else v.dtype
                        )
                        for k, v in out.items()
                    }
                    for cache in ds.teacher_caches:
                        fields = ("t_feats",) if cache is feats else ("t_logits", "t_index")
                        cache.put(ds.teacher_key(i), {k: v for k, v in entry.items() if k in fields})
        log.info(
            "teacher cache: %d utterances computed into %s", len(todo), ", ".join(str(c.dir) for c in ds.teacher_caches)
        )


def window_margins(cfg) -> tuple[float | None, float | None]:
    """(the student's, the teacher's) data.batch_window margin: the teacher's is None (its whole window) unless
    teacher.batch_window."""
    margin = getattr(cfg.data, "batch_window", None)
    return margin, (margin if getattr(cfg.teacher, "batch_window", False) else None)


def check_usable(train_set: TrainingSet, dev_set: TrainingSet) -> None:
    for ds in (train_set, dev_set):
        ds.drop_unfilled()
    if not len(train_set):
        raise DQWhisperError(f"no usable training utterance in {train_set.base.data.path}")
