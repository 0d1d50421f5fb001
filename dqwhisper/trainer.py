"""The training loop: build teacher and student, cache what is frozen, distil, validate, checkpoint, resume.

One `Trainer` per process. Under `torchrun` each rank reads its share of the batches (the data package's
BatchSampler) and gradients are summed across ranks by hand after backward (an all-reduce of one flat buffer): the
loop calls `decoder.forward_features`, not a module's `forward`, so torch's DDP wrapper would not see it. Losses are
normalised by the global token count, so N ranks step exactly as one process on the concatenated batch would.

CPU path (the default): the encoder is frozen, its outputs are computed once per utterance into the on-disk cache
(dqwhisper.cache), and so are the frozen teacher's decoder outputs (logits at the student's kept vocabulary, FFN
activations or block outputs for matching); a step then runs only the student decoder.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf
from torch import Tensor, nn

from dqwhisper import losses
from dqwhisper.cache import FeatureCache, audio_key, module_key, tokens_key
from dqwhisper.config import validate as validate_config
from dqwhisper.data.bpe import BPE, train_bpe
from dqwhisper.data.kaldi import DataDir
from dqwhisper.data.dataset import BatchSampler, WhisperDataset, collate, default_tokenizer, text_tokens
from dqwhisper.distill.matching import FeatureAdapter, match_loss
from dqwhisper.models.student import (DQWhisper, from_whisper, read_checkpoint, save_checkpoint,
                                      vocab_from_token_lists, window_frames)
from dqwhisper.utils import DQWhisperError, atomic_torch_save, atomic_write_bytes, get_logger, resolve_device, set_seed

log = get_logger(__name__)

TRAIN_STATE_KEYS = ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng", "best_metric", "kept",
                    "nonfinite", "adapter", "scaler")


# ----------------------------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """torchrun's environment -> a process group (nccl on GPU, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        x = x.clone()
        torch_dist.all_reduce(x)
    return x


# ------------------------------------------------------------------------------------------------------ the models
def load_source(name: str, n_audio_ctx: int) -> DQWhisper:
    """Any Whisper (store name, openai/DQ-Whisper .pt) as a DQWhisper on the CPU with the training window."""
    from dqwhisper.models.load import load_model

    model = load_model(name, device="cpu")
    keep = getattr(model.decoder, "vocab_keep", None)
    if getattr(model, "quant_config", None):
        raise DQWhisperError(f"{name}: a fake-quantized model cannot be a teacher or a source to cut from")
    if n_audio_ctx > model.dims.n_audio_ctx:
        raise DQWhisperError(f"{name} was trained with a {model.dims.n_audio_ctx / 50:g} s window; data.audio_window "
                             f"= {n_audio_ctx / 50:g} s is larger")
    out = from_whisper(model, ctc_units=getattr(model, "ctc_units", 0),
                       vocab_keep=None if keep is None else keep.tolist(), n_audio_ctx=n_audio_ctx)
    return out.eval()


def build_student(cfg: Any, source: DQWhisper, vocab_keep: list[int] | None, ctc_units: int,
                  n_audio_ctx: int) -> DQWhisper:
    s = cfg.student
    enc = None if s.encoder_layers is None else list(s.encoder_layers)
    dec = None if s.decoder_layers is None else list(s.decoder_layers)
    if s.init == "copy" and (enc is not None or dec is not None):
        raise DQWhisperError("student.init=copy keeps every layer: leave student.encoder_layers/decoder_layers null")
    return from_whisper(source, ctc_units=ctc_units, vocab_keep=vocab_keep, encoder_layers=enc,
                        decoder_layers=dec, n_audio_ctx=n_audio_ctx)


def set_trainable(student: DQWhisper, cfg: Any) -> list[nn.Parameter]:
    for p in student.encoder.parameters():
        p.requires_grad_(not cfg.student.freeze_encoder)
    for p in student.decoder.parameters():
        p.requires_grad_(not cfg.student.freeze_decoder)
    if student.ctc_head is not None:
        for p in student.ctc_head.parameters():
            p.requires_grad_(bool(cfg.student.train_ctc_head))
    return [p for p in student.parameters() if p.requires_grad]


def lr_lambda(step: int, warmup: int, total: int, kind: str, floor: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


# ----------------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- data with caches
class TrainingSet(torch.utils.data.Dataset):
    """A WhisperDataset whose items come with cached encoder outputs (`enc`, instead of audio) and cached teacher
    outputs (`t_logits` [, `t_index`], `t_feats`) where those caches are in use."""

    def __init__(self, base: WhisperDataset, enc_cache: FeatureCache | None = None,
                 teacher_enc_cache: FeatureCache | None = None, teacher_caches: list[FeatureCache] = ()):
        self.base = base
        self.enc_cache = enc_cache
        self.teacher_enc_cache = teacher_enc_cache
        self.teacher_caches = list(teacher_caches)  # teacher logits; teacher features (when matching)
        self.audio_keys = [audio_key(base.data, utt) for utt, _, _, _ in base.items] \
            if (enc_cache or teacher_enc_cache or self.teacher_caches) else []
        self.index = list(range(len(base)))  # items usable (cache filled), positions in base

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> list[int]:
        all_lengths = self.base.lengths
        return [all_lengths[i] for i in self.index]

    def tokens(self, i: int) -> list[int]:
        return self.base.items[i][1]

    def teacher_key(self, i: int) -> str:
        return tokens_key(self.audio_keys[i], self.tokens(i))

    def __getitem__(self, j: int) -> dict | None:
        i = self.index[j]
        if self.enc_cache is not None:
            utt, tokens, ctc, _ = self.base.items[i]
            entry = self.enc_cache.get(self.audio_keys[i])
            item = dict(utt_id=utt.utt_id, lang=utt.lang, mel=torch.zeros(0), tokens=list(tokens),
                        ctc_targets=list(ctc), n_frames=int(entry["n_frames"]), enc=entry["enc"])
        else:
            item = self.base[i]
            if item is None:
                return None
        if self.teacher_enc_cache is not None:
            item["t_enc"] = self.teacher_enc_cache.get(self.audio_keys[i])["enc"]
        for cache in self.teacher_caches:
            item.update(cache.get(self.teacher_key(i)))
        return item


def collate_training(items: list[dict | None], pad_id: int) -> dict:
    items = [it for it in items if it is not None]
    batch = collate(items, pad_id)
    length = batch["tokens_in"].shape[1]
    if "enc" in items[0]:
        batch["enc"] = torch.stack([it["enc"] for it in items])
    if "t_enc" in items[0]:
        batch["t_enc"] = torch.stack([it["t_enc"] for it in items])

    def pad(key: str, fill: float = 0.0) -> Tensor:
        first = items[0][key]
        out = first.new_full((len(items), length, *first.shape[1:]), fill)
        for b, it in enumerate(items):
            out[b, : it[key].shape[0]] = it[key]
        return out

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


# ---------------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: Any):
        validate_config(cfg)
        self.cfg = cfg
        tc = cfg.trainer
        self.device = resolve_device(tc.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        self.expdir = Path(cfg.checkpoint_dir)
        self.expdir.mkdir(parents=True, exist_ok=True)
        self.cache_root = Path(tc.cache_dir) if tc.cache_dir else Path("exp/cache")
        self.cache_dtype = getattr(torch, tc.cache_dtype)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp) \
            if self.device.type == "cuda" else None
        self.writer = None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.nonfinite = 0
        self.kept: list[list] = []  # [metric, step, path] of the kept step checkpoints, best first
        self.best_metric = float("inf")
        self.loss_log: list[dict] = []
        self.chosen_counts: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self._setup()

    # -------------------------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        set_seed(cfg.trainer.seed)
        self.n_audio_ctx = window_frames(cfg.data.audio_window)
        self.tokenizer = default_tokenizer()
        languages = None if cfg.data.languages is None else list(cfg.data.languages)
        data_dir = Path(cfg.data.data_dir)
        train_dir, dev_dir = data_dir / cfg.data.train_set, data_dir / cfg.data.dev_set

        need_teacher = cfg.loss.alpha > 0 and bool(cfg.teacher.name)
        src_name = cfg.student.name or cfg.teacher.name
        source = load_source(src_name, self.n_audio_ctx)
        self.teacher = None
        if need_teacher:
            self.teacher = source if src_name == cfg.teacher.name else load_source(cfg.teacher.name,
                                                                                    self.n_audio_ctx)
            self.teacher.requires_grad_(False)
            self.teacher.to(self.device).eval()

        # CTC units: the source's own sentencepiece model when it has a CTC head (the student inherits the head),
        # else one trained on the training text
        self.bpe = None
        if cfg.student.ctc:
            if source.ctc_bpe is not None and source.ctc_units > 0:
                self.bpe = BPE.load(source.ctc_bpe)
            else:
                data = DataDir.load(train_dir).filter(languages=languages)
                self.bpe = train_bpe([u.text for u in data.utts], cfg.data.bpe_vocab_size)
            if dist.main:
                self.bpe.save(self.expdir / "bpe.model")

        spec = cfg.data.spec_augment if not cfg.student.freeze_encoder else None
        if cfg.data.spec_augment.enabled and cfg.student.freeze_encoder:
            log.info("data.spec_augment is off: the encoder is frozen (its outputs are features, not trained)")
        common = dict(tokenizer=self.tokenizer, n_mels=source.dims.n_mels, n_audio_ctx=self.n_audio_ctx,
                      bpe=self.bpe, max_bad_fraction=cfg.data.max_bad_fraction, languages=languages)
        self.train_base = WhisperDataset(train_dir, spec_augment=spec, **common)
        self.dev_base = WhisperDataset(dev_dir, **common)
        for ds, n in ((self.train_base, cfg.data.max_train_utts), (self.dev_base, cfg.data.max_dev_utts)):
            if 0 < n < len(ds.items):  # evenly spaced over the id-sorted set, so every language stays
                ds.items = [ds.items[int(i * len(ds.items) / n)] for i in range(n)]
        self.dev_refs = {u.utt_id: u.text for u, _, _, _ in self.dev_base.items}

        vocab_keep = None
        if cfg.student.prune_vocab:
            lists = text_tokens(self.train_base.data, self.tokenizer, languages).values()
            vocab_keep = vocab_from_token_lists(list(lists), source.dims.n_vocab, self.tokenizer.eot)
        ctc_units = self.bpe.vocab_size if self.bpe is not None else 0
        self.student = build_student(cfg, source, vocab_keep, ctc_units, self.n_audio_ctx)
        self.student.ctc_bpe = self.bpe.model_bytes if self.bpe is not None else None
        if cfg.quant.enabled:
            from dqwhisper.quant import prepare

            prepare(self.student, OmegaConf.to_object(cfg.quant) if OmegaConf.is_config(cfg.quant) else cfg.quant)
        self.student.to(self.device)
        if self.teacher is None:
            del source
        self.params = set_trainable(self.student, cfg)
        self.keep = self.student.decoder.vocab_keep

        self.adapter = None
        self.enc_adapter = None
        m = cfg.loss.match
        if need_teacher and m.enabled:
            dim = lambda model: (model.dims.n_text_state * (4 if m.feature == "ffn" else 1))  # noqa: E731
            self.adapter = FeatureAdapter(self.student.dims.n_text_layer, dim(self.teacher),
                                          dim(self.student)).to(self.device)
            self.params += list(self.adapter.parameters())
            if m.encoder and not cfg.student.freeze_encoder:
                edim = lambda model: (model.dims.n_audio_state * (4 if m.feature == "ffn" else 1))  # noqa: E731
                self.enc_adapter = FeatureAdapter(self.student.dims.n_audio_layer, edim(self.teacher),
                                                  edim(self.student)).to(self.device)
                self.params += list(self.enc_adapter.parameters())
        if not self.params:
            raise DQWhisperError("nothing to train: every parameter is frozen")

        self._setup_caches()
        oc = cfg.optim
        opt_cls = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
        head = {id(p) for m in (self.student.ctc_head, self.adapter, self.enc_adapter) if m is not None
                for p in m.parameters()}
        groups = [{"params": [p for p in self.params if id(p) not in head]},
                  {"params": [p for p in self.params if id(p) in head],
                   "lr": oc.head_lr if oc.head_lr is not None else oc.lr}]
        self.optimizer = opt_cls([g for g in groups if g["params"]], lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                 weight_decay=oc.weight_decay)
        total = cfg.trainer.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, oc.warmup_steps, total, oc.scheduler, oc.min_lr_ratio))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        n_train = sum(p.numel() for p in self.params)
        log.info("student: %d encoder / %d decoder layers, %.1fM parameters (%.1fM trainable), vocabulary %s, "
                 "CTC units %d, window %.1f s; teacher: %s", self.student.dims.n_audio_layer,
                 self.student.dims.n_text_layer, sum(p.numel() for p in self.student.parameters()) / 1e6,
                 n_train / 1e6, "full" if self.keep is None else len(self.keep), ctc_units,
                 self.n_audio_ctx / 50, cfg.teacher.name if self.teacher is not None else "none")

    def _encoder_cache(self, model: DQWhisper, what: str) -> FeatureCache:
        key = module_key(model.encoder, kind="encoder", n_mels=model.dims.n_mels, n_audio_ctx=self.n_audio_ctx,
                         dtype=str(self.cache_dtype), mel="zeros")
        return FeatureCache(self.cache_root / "encoder", key, info={"what": what, "n_audio_ctx": self.n_audio_ctx})

    def _setup_caches(self) -> None:
        cfg = self.cfg
        self.enc_cache = self.teacher_enc_cache = self.teacher_cache = self.teacher_feat_cache = None
        student_cached = cfg.student.freeze_encoder and cfg.trainer.cache_encoder
        if student_cached:
            self.enc_cache = self._encoder_cache(self.student, "student encoder")
        if self.teacher is not None and cfg.trainer.cache_encoder:
            tcache = self._encoder_cache(self.teacher, "teacher encoder")
            if self.enc_cache is None or tcache.dir != self.enc_cache.dir:
                self.teacher_enc_cache = tcache
        if self.teacher is not None and cfg.trainer.cache_teacher and cfg.trainer.cache_encoder:
            # logits and matching features in two caches, so that KD-only and KD + matching runs share the logits
            m = cfg.loss.match
            keep = None if self.keep is None else self.keep.tolist()
            t_enc = self.teacher_enc_cache or self.enc_cache or self._encoder_cache(self.teacher, "teacher")
            common = dict(dtype=str(self.cache_dtype), encoder=t_enc.dir.name)
            key = module_key(self.teacher.decoder, kind="teacher_logits", keep=keep, topk=cfg.loss.kd_topk, **common)
            self.teacher_cache = FeatureCache(self.cache_root / "teacher_logits", key,
                                              info={"teacher": cfg.teacher.name, "topk": cfg.loss.kd_topk})
            if m.enabled:
                key = module_key(self.teacher.decoder, kind="teacher_features", feature=m.feature, **common)
                self.teacher_feat_cache = FeatureCache(self.cache_root / "teacher_features", key,
                                                       info={"teacher": cfg.teacher.name, "feature": m.feature})
        teacher_caches = [c for c in (self.teacher_cache, self.teacher_feat_cache) if c is not None]
        self.train_set = TrainingSet(self.train_base, self.enc_cache, self.teacher_enc_cache, teacher_caches)
        self.dev_set = TrainingSet(self.dev_base, self.enc_cache)
        if self.dist.main:
            t0 = time.time()
            for ds, name in ((self.train_set, "train"), (self.dev_set, "dev")):
                self._fill_encoder_cache(ds, self.enc_cache, self.student, name)
                if ds is self.train_set:
                    self._fill_encoder_cache(ds, self.teacher_enc_cache, self.teacher, "train (teacher)")
                    self._fill_teacher_cache(ds)
            if time.time() - t0 > 1:
                log.info("caches ready in %.1f s", time.time() - t0)
        barrier(self.dist)
        for ds in (self.train_set, self.dev_set):  # drop utterances whose audio failed while filling
            caches = [c for c in (ds.enc_cache, ds.teacher_enc_cache) if c is not None]
            ds.index = [i for i in ds.index if all(c.has(ds.audio_keys[i]) for c in caches)]
            ds.index = [i for i in ds.index if all(c.has(ds.teacher_key(i)) for c in ds.teacher_caches)]
        if not len(self.train_set):
            raise DQWhisperError(f"no usable training utterance in {self.train_base.data.path}")

    def _fill_encoder_cache(self, ds: TrainingSet, cache: FeatureCache | None, model: DQWhisper | None,
                            name: str) -> None:
        if cache is None:
            return
        todo = [i for i in ds.index if not cache.has(ds.audio_keys[i])]
        if not todo:
            return
        from tqdm import tqdm

        bs = self.cfg.trainer.valid_batch_size
        model.encoder.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(todo), bs), desc=f"encoder cache {name}", unit="batch",
                              disable=not self.cfg.trainer.progress):
                chunk = todo[start: start + bs]
                items = [ds.base[i] for i in chunk]
                ok = [(i, it) for i, it in zip(chunk, items) if it is not None]
                if not ok:
                    continue
                mel = torch.stack([it["mel"] for _, it in ok]).to(self.device)
                with self._autocast():
                    out = model.encoder(mel)
                for (i, it), enc in zip(ok, out):
                    cache.put(ds.audio_keys[i], {"enc": enc.to(self.cache_dtype),
                                                 "n_frames": torch.tensor(it["n_frames"])})
        log.info("encoder cache %s: %d utterances computed into %s", name, len(todo), cache.dir)

    def _fill_teacher_cache(self, ds: TrainingSet) -> None:
        if not ds.teacher_caches:
            return
        enc_cache = ds.teacher_enc_cache or ds.enc_cache
        todo = [i for i in ds.index if enc_cache.has(ds.audio_keys[i])
                and not all(c.has(ds.teacher_key(i)) for c in ds.teacher_caches)]
        if not todo:
            return
        from tqdm import tqdm

        bs = self.cfg.trainer.valid_batch_size
        pad = self.tokenizer.eot
        with torch.no_grad():
            for start in tqdm(range(0, len(todo), bs), desc="teacher cache", unit="batch",
                              disable=not self.cfg.trainer.progress):
                chunk = todo[start: start + bs]
                toks = [ds.tokens(i)[:-1] for i in chunk]
                length = max(map(len, toks))
                tokens_in = torch.full((len(chunk), length), pad, dtype=torch.long)
                for b, t in enumerate(toks):
                    tokens_in[b, : len(t)] = torch.tensor(t)
                xa = torch.stack([enc_cache.get(ds.audio_keys[i])["enc"] for i in chunk]).float()
                out = self._teacher_outputs(tokens_in.to(self.device), xa.to(self.device))
                for b, i in enumerate(chunk):
                    n = len(toks[b])
                    entry = {k: (v[b, :n] if k != "t_feats" else v[:, b, :n]).to(
                        self.cache_dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}
                    for cache in ds.teacher_caches:
                        fields = ("t_feats",) if cache is self.teacher_feat_cache else ("t_logits", "t_index")
                        cache.put(ds.teacher_key(i), {k: v for k, v in entry.items() if k in fields})
        log.info("teacher cache: %d utterances computed into %s", len(todo),
                 ", ".join(str(c.dir) for c in ds.teacher_caches))

    # ------------------------------------------------------------------------------------------- forward/losses
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _teacher_outputs(self, tokens_in: Tensor, xa: Tensor) -> dict[str, Tensor]:
        """Teacher logits at the student's kept vocabulary (or top-k of them) and its matching features."""
        m = self.cfg.loss.match
        with torch.no_grad(), self._autocast():
            logits, ffn, blocks = self.teacher.decoder.forward_features(tokens_in, xa.to(self.teacher_dtype))
        if self.keep is not None:
            logits = logits.index_select(-1, self.keep)
        if not bool(torch.isfinite(logits).all()):
            raise DQWhisperError("the teacher prunes token ids that the student keeps: use a teacher with the full "
                                 "vocabulary or the same training text")
        out = {}
        k = self.cfg.loss.kd_topk
        if k > 0:
            out["t_logits"], out["t_index"] = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
        else:
            out["t_logits"] = logits.float()
        if m.enabled:
            out["t_feats"] = torch.stack(ffn if m.feature == "ffn" else blocks).float()
        return out

    @property
    def teacher_dtype(self) -> torch.dtype:
        return next(self.teacher.parameters()).dtype

    def compute_losses(self, batch: dict, with_teacher: bool = True) -> tuple[dict[str, Tensor], dict]:
        """One forward pass of the student (and the teacher where not cached) -> (named losses, info)."""
        cfg = self.cfg
        dev = self.device
        tokens_in = batch["tokens_in"].to(dev)
        targets_full = batch["targets"].to(dev)
        mask = targets_full != losses.IGNORE
        targets = targets_full
        if self.keep is not None:
            targets = self.student.decoder.to_subset_ids(targets_full)
            targets = torch.where(mask & (targets >= 0), targets, torch.full_like(targets, losses.IGNORE))
        m = cfg.loss.match
        distil = with_teacher and self.teacher is not None and cfg.loss.alpha > 0
        want_match = distil and m.enabled
        n_tok = mask.sum().float()
        n_ctc = batch["ctc_target_lengths"].sum().float()
        norm_tok = norm_ctc = None
        if self.dist.enabled and self.student.training:
            counts = all_reduce_sum(torch.stack([n_tok, n_ctc]).to(dev))
            norm_tok, norm_ctc = counts[0] / self.dist.world_size, counts[1] / self.dist.world_size

        with self._autocast():
            enc_feats = None
            if "enc" in batch:
                xa = batch["enc"].to(dev).float()
            else:
                mel = batch["mel"].to(dev)
                if cfg.student.freeze_encoder:
                    with torch.no_grad():
                        xa = self.student.encoder(mel)
                else:
                    if want_match and m.encoder:
                        xa, eb, ef = self.student.encoder.forward_features(mel)
                        enc_feats = ef if m.feature == "ffn" else eb
                    else:
                        xa = self.student.encoder(mel)
            self.student.decoder.subset_logits = True
            try:
                if want_match:
                    logits, ffn, blocks = self.student.decoder.forward_features(tokens_in, xa)
                    s_feats = ffn if m.feature == "ffn" else blocks
                else:
                    logits = self.student.decoder(tokens_in, xa)
            finally:
                self.student.decoder.subset_logits = False

        out = {"ce": losses.ce(logits, targets, cfg.loss.label_smoothing, normalizer=norm_tok)}
        if cfg.loss.beta > 0 and self.student.ctc_head is not None:
            enc_lengths = batch["enc_lengths"].clamp(max=xa.shape[1])
            out["ctc"] = losses.ctc(self.student.ctc_logits(xa), enc_lengths.to(dev),
                                    batch["ctc_targets"].to(dev), batch["ctc_target_lengths"].to(dev),
                                    normalizer=norm_ctc)
        info: dict = {}
        if distil:
            if "t_logits" in batch:
                t = {k: (v.to(dev).float() if k != "t_index" else v.to(dev))
                     for k, v in batch.items() if k in ("t_logits", "t_index")}
                if want_match:
                    t["t_feats"] = [f.to(dev).float() for f in batch["t_feats"]]
            else:
                if "t_enc" in batch:
                    t_xa = batch["t_enc"].to(dev).float()
                elif "enc" in batch and self.teacher_enc_cache is None:
                    t_xa = xa.detach()
                else:
                    with torch.no_grad(), self._autocast():
                        t_xa = self.teacher.encoder(batch["mel"].to(dev).to(self.teacher_dtype))
                t = self._teacher_outputs(tokens_in, t_xa)
                if want_match:
                    t["t_feats"] = list(t["t_feats"])
            out["kd"] = losses.kd_logits(logits, t["t_logits"], mask, cfg.loss.kd_temperature,
                                         teacher_index=t.get("t_index"), normalizer=norm_tok)
            if want_match:
                reduce = all_reduce_sum if self.dist.enabled and self.student.training else None
                match, chosen, dist = match_loss(s_feats, t["t_feats"], mask, m.mode, m.distance, m.temperature,
                                                 self.adapter, normalizer=norm_tok, all_reduce=reduce)
                info["chosen"] = chosen
                if enc_feats is not None:
                    with torch.no_grad():
                        _, tb, tf = self.teacher.encoder.forward_features(batch["mel"].to(dev))
                    frames = torch.arange(xa.shape[1], device=dev)[None] < batch["enc_lengths"].to(dev)[:, None]
                    enc_match, enc_chosen, _ = match_loss(enc_feats, tf if m.feature == "ffn" else tb, frames,
                                                          m.mode, m.distance, m.temperature, self.enc_adapter,
                                                          all_reduce=reduce)
                    match = 0.5 * (match + enc_match)
                    info["enc_chosen"] = enc_chosen
                out["match"] = match
        named = losses.combine(out.get("ce"), out.get("ctc"), out.get("kd"), out.get("match"),
                               alpha=cfg.loss.alpha if distil else 0.0, beta=cfg.loss.beta,
                               lambda_match=cfg.loss.lambda_match)
        info["n_tokens"] = int(n_tok)
        return named, info

    # ----------------------------------------------------------------------------------------------- the loop
    def _loader(self, ds: TrainingSet, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        pad = self.tokenizer.eot
        return torch.utils.data.DataLoader(
            ds, batch_sampler=batches, collate_fn=lambda items: collate_training(items, pad),
            num_workers=self.cfg.data.collector.num_workers if ds.enc_cache is None else 0)

    def _sampler(self) -> BatchSampler:
        c = self.cfg.data.collector
        return BatchSampler(self.train_set.lengths, c.minibatch_size, c.max_frames or None, shuffle=c.shuffle,
                            seed=self.cfg.trainer.seed, drop_last=False, rank=self.dist.rank,
                            world_size=self.dist.world_size)

    def _sync_grads(self) -> None:
        if not self.dist.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
            offset += n

    def train_step(self, batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step over `accum_grad` micro-batches. Returns the logged values, None when skipped."""
        self.student.train()
        if self.cfg.student.freeze_encoder:
            self.student.encoder.eval()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = defaultdict(float)
        finite = True
        info: dict = {}
        for batch in batches:
            named, info = self.compute_losses(batch)
            loss = named["loss"] / len(batches)
            flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
            if all_reduce_sum(flag).item() > 0:
                finite = False
                break
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in named.items():
                totals[k] += float(v.detach()) / len(batches)
        if finite:
            self._sync_grads()
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            clip = self.cfg.optim.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
            finite = bool(torch.isfinite(norm))
            totals["grad_norm"] = float(norm)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", self.step + 1,
                        self.nonfinite)
            if self.scaler:
                self.scaler.update()
            if self.nonfinite > self.cfg.trainer.max_nonfinite:
                raise DQWhisperError(f"{self.nonfinite} non-finite steps (trainer.max_nonfinite="
                                     f"{self.cfg.trainer.max_nonfinite}): lower optim.lr or check the data")
            with warnings.catch_warnings():  # the skipped step keeps the schedule in step with the data
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            self.step += 1
            return None
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        if "chosen" in info:
            totals["chosen"] = info["chosen"]
            for i, j in enumerate(info["chosen"]):
                self.chosen_counts[i][j] += 1
        return dict(totals)

    def train(self) -> dict:
        """Run to trainer.max_steps (or max_epochs), validating and checkpointing; returns the summary."""
        cfg, tc = self.cfg, self.cfg.trainer
        if tc.resume and (self.expdir / "last.pt").exists():
            self.load_state(self.expdir / "last.pt")
        elif self.dist.main:  # a fresh run: the logs start empty
            for name in ("train_losses.jsonl", "dev_results.jsonl"):
                (self.expdir / name).unlink(missing_ok=True)
        if cfg.quant.enabled and cfg.quant.ptq:
            log.info("post-training quantization: no training steps")
            metric = self.validate_and_save()
            self.finish()
            return {"steps": 0, "dev_metric": metric}
        if self.dist.main and tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.expdir / "tensorboard"), purge_step=self.step or None)
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not (tc.progress and self.dist.main))
        accum = cfg.optim.accum_grad
        start_step = self.step
        t0 = time.time()
        sampler = self._sampler()
        done = self.step >= tc.max_steps
        while not done:
            if tc.max_epochs and self.epoch >= tc.max_epochs:
                break
            sampler.set_epoch(self.epoch)
            batches = list(sampler)
            n_usable = len(batches) - len(batches) % accum if len(batches) >= accum else len(batches)
            loader = iter(self._loader(self.train_set, batches[self.batch_in_epoch: n_usable]))
            while self.batch_in_epoch < n_usable:
                group = [next(loader) for _ in range(min(accum, n_usable - self.batch_in_epoch))]
                self.batch_in_epoch += len(group)
                values = self.train_step(group)
                bar.update(1)
                if values is not None:
                    self._log_train(values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}")
                if tc.valid_every and self.step % tc.valid_every == 0 and self.step < tc.max_steps:
                    self.validate_and_save()
                if tc.stop_after_steps and self.step - start_step >= tc.stop_after_steps:
                    log.info("stopping after %d steps (trainer.stop_after_steps), without a checkpoint", self.step)
                    bar.close()
                    return {"steps": self.step, "stopped": True}
                if self.step >= tc.max_steps:
                    done = True
                    break
            if not done:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        elapsed = time.time() - t0
        metric = self.validate_and_save()
        self.finish()
        summary = {"steps": self.step, "epochs": self.epoch, "train_seconds": round(elapsed, 2),
                   "seconds_per_step": round(elapsed / max(1, self.step - start_step), 4),
                   "dev_metric": metric, "best_metric": self.best_metric, "nonfinite_steps": self.nonfinite,
                   "chosen_layers": {i: dict(c) for i, c in self.chosen_counts.items()}}
        if self.dist.main:
            (self.expdir / "train_summary.json").write_text(json.dumps(summary, indent=1))
            log.info("done: %s", json.dumps(summary))
        return summary

    def _log_train(self, values: dict) -> None:
        chosen = values.pop("chosen", None)
        record = {"step": self.step, **{k: round(v, 6) for k, v in values.items()}}
        if chosen is not None:
            record["chosen"] = chosen
        self.loss_log.append(record)
        if not self.dist.main:
            return
        with open(self.expdir / "train_losses.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, self.step)
            if chosen is not None:
                for i, j in enumerate(chosen):
                    self.writer.add_scalar(f"match/teacher_layer_of_student_layer_{i}", j, self.step)
        if self.step % self.cfg.trainer.log_every == 0:
            log.info("step %d: %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in values.items()) +
                     (f" chosen={chosen}" if chosen is not None else ""))

    # --------------------------------------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        """Dev loss (CE + beta CTC, no teacher) and greedy WER/CER. Rank 0 only."""
        self.student.eval()
        tot, n_tok = defaultdict(float), 0
        batches = [list(range(i, min(i + self.cfg.trainer.valid_batch_size, len(self.dev_set))))
                   for i in range(0, len(self.dev_set), self.cfg.trainer.valid_batch_size)]
        hyps: dict[str, str] = {}
        with torch.no_grad():
            for batch in self._loader(self.dev_set, batches):
                named, info = self.compute_losses(batch, with_teacher=False)
                for k, v in named.items():
                    tot[k] += float(v) * info["n_tokens"]
                n_tok += info["n_tokens"]
                if self.cfg.trainer.valid_decode:
                    hyps.update(self._greedy(batch))
        result = {k: v / max(1, n_tok) for k, v in tot.items() if k in ("loss", "loss_ce", "loss_ctc")}
        if self.cfg.trainer.valid_decode:
            langs = {u.utt_id: u.lang for u, _, _, _ in self.dev_base.items}
            result.update(score(hyps, self.dev_refs, langs))
            if self.dist.main:  # the latest dev hypotheses, Kaldi text format
                atomic_write_bytes(self.expdir / "dev_hyp.txt",
                                   "".join(f"{u} {' '.join(h.split())}\n" for u, h in sorted(hyps.items())).encode())
        return result

    def _greedy(self, batch: dict) -> dict[str, str]:
        import whisper

        from dqwhisper.decoding import decode_batch

        if "enc" in batch:
            xa = batch["enc"].to(self.device).float()
        else:
            with self._autocast():
                xa = self.student.encoder(batch["mel"].to(self.device)).float()
        out = {}
        by_lang = defaultdict(list)
        for b, lang in enumerate(batch["langs"]):
            by_lang[lang].append(b)
        longest = int((batch["targets"] != losses.IGNORE).sum(1).max()) + 4
        for lang, idx in by_lang.items():
            opts = whisper.DecodingOptions(task="transcribe", language=lang, without_timestamps=True, fp16=False,
                                           temperature=0.0, sample_len=min(224, 2 * longest + 10))
            with self._autocast():
                res = decode_batch(self.student, xa[idx], opts)
            for b, r in zip(idx, res):
                out[batch["utt_ids"][b]] = r.text
        return out

    def validate_and_save(self) -> float:
        metric_value = float("nan")
        if self.dist.main:
            t0 = time.time()
            result = self.validate()
            key = "error" if "error" in result else "loss"
            metric_value = result[key]
            log.info("step %d dev (%.1f s): %s", self.step, time.time() - t0,
                     " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
            if self.writer is not None:
                for k, v in result.items():
                    if isinstance(v, (int, float)):
                        self.writer.add_scalar(f"dev/{k}", v, self.step)
                self.writer.flush()
            with open(self.expdir / "dev_results.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **result}) + "\n")
            self._save_step(metric_value)
            self.save_state(self.expdir / "last.pt")
        barrier(self.dist)
        return metric_value

    # ------------------------------------------------------------------------------------------- checkpoints
    def _config_dict(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True) if OmegaConf.is_config(self.cfg) else None

    def _save_step(self, metric_value: float) -> None:
        k = self.cfg.trainer.keep_top_k
        path = self.expdir / f"step_{self.step}.pt"
        candidates = sorted(self.kept + [[metric_value, self.step, str(path)]], key=lambda x: (x[0], -x[1]))
        keep = [c for c in candidates if not math.isnan(c[0])][:k] if k > 0 else []
        if any(c[1] == self.step for c in keep):
            save_checkpoint(self.student, path, config=self._config_dict(), step=self.step, dev_metric=metric_value)
        for c in self.kept:
            if c not in keep:
                Path(c[2]).unlink(missing_ok=True)
        self.kept = keep
        if keep and (keep[0][0] < self.best_metric or not (self.expdir / "best.pt").exists()):
            self.best_metric = keep[0][0]
            tmp = self.expdir / ".best.pt.tmp"
            shutil.copyfile(keep[0][2], tmp)
            os.replace(tmp, self.expdir / "best.pt")
        elif not keep:
            save_checkpoint(self.student, self.expdir / "best.pt", config=self._config_dict(), step=self.step)

    def save_state(self, path: Path) -> None:
        save_checkpoint(self.student, path, config=self._config_dict(), optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), step=self.step, epoch=self.epoch,
                        batch_in_epoch=self.batch_in_epoch, rng=rng_state(), best_metric=self.best_metric,
                        kept=self.kept, nonfinite=self.nonfinite,
                        adapter=None if self.adapter is None else self.adapter.state_dict(),
                        scaler=None if self.scaler is None else self.scaler.state_dict())

    def load_state(self, path: Path) -> None:
        ckpt = read_checkpoint(path, self.device)
        missing, unexpected = self.student.load_state_dict(ckpt["model_state_dict"], strict=False)
        if missing or unexpected:
            raise DQWhisperError(f"{path} does not match this experiment's student: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]} (was the config changed?)")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.adapter is not None and ckpt.get("adapter") is not None:
            self.adapter.load_state_dict(ckpt["adapter"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.best_metric, self.kept, self.nonfinite = ckpt["best_metric"], ckpt["kept"], ckpt["nonfinite"]
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    def finish(self) -> None:
        """Average the kept checkpoints into avg.pt (rank 0)."""
        if self.dist.main and self.cfg.trainer.average and self.kept:
            average_checkpoints([Path(c[2]) for c in self.kept], self.expdir / "avg.pt")
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        barrier(self.dist)


def average_checkpoints(paths: list[Path], out: Path) -> None:
    """Element-wise mean of the float tensors of `paths`' model states (others from the first); atomic write."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return
    first = read_checkpoint(paths[0])
    state = {k: v.clone().double() if v.is_floating_point() else v for k, v in first["model_state_dict"].items()}
    for p in paths[1:]:
        sd = read_checkpoint(p)["model_state_dict"]
        for k, v in state.items():
            if v.is_floating_point():
                v += sd[k].double()
    ref = first["model_state_dict"]
    avg = {k: (v / len(paths)).to(ref[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    ckpt = {k: v for k, v in first.items() if k not in TRAIN_STATE_KEYS}
    ckpt["model_state_dict"] = avg
    ckpt["averaged"] = [str(p.name) for p in paths]
    atomic_torch_save(ckpt, out)
    log.info("averaged %d checkpoints into %s", len(paths), out)


def score(hyps: dict[str, str], refs: dict[str, str], langs: dict[str, str]) -> dict[str, float]:
    """Pooled error over the dev set (WER; CER for scripts without spaces) and per language (dqwhisper.scoring)."""
    from dqwhisper.scoring import score_utterances, summarize

    summary = summarize(score_utterances(refs, hyps, langs)[0])
    result = {"error": summary["overall"]["error"]}
    result.update({f"error_{lang}": v["error"] for lang, v in summary["per_language"].items()})
    return result


def train(cfg: Any) -> dict:
    """Build and run a Trainer from a composed config (the Hydra entry point's body)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        if trainer.dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
