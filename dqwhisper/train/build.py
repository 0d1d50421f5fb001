"""build(cfg) -> Parts: every object a training run needs, made in a fixed order (models, sentencepiece units,
data, caches, the DistillModel, optimiser, scheduler). The order is part of the result: each step that draws random
numbers (new layers, adapters) draws them in this order after `set_seed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from whisper.tokenizer import Tokenizer

from dqwhisper.config import validate as validate_config
from dqwhisper.data.bpe import BPE, train_bpe
from dqwhisper.data.dataset import N_VOCAB_ENGLISH, WhisperDataset, default_tokenizer, is_multilingual, text_tokens
from dqwhisper.data.kaldi import DataDir
from dqwhisper.distill.model import DistillModel, feature_adapter
from dqwhisper.distill.teacher import CachedTargets, LiveTargets, TeacherTargets
from dqwhisper.models.load import load_model
from dqwhisper.models.student import DQWhisper, from_whisper, vocab_from_token_lists, window_frames
from dqwhisper.quant import prepare
from dqwhisper.quant.prepare import widen_embedding_rows
from dqwhisper.train.calibrate import embedding_rows_by_use, gptq_calibrate
from dqwhisper.train.cache_set import CacheFiller, Caches, TrainingSet, check_usable, window_margins
from dqwhisper.train.dist import DistInfo, all_reduce_sum, barrier, init_distributed, rank_device
from dqwhisper.utils import DQWhisperError, get_logger, resolve_device, set_seed

log = get_logger(__name__)


@dataclass
class Parts:
    tokenizer: Tokenizer
    bpe: BPE | None
    model: DistillModel  # student, teacher targets, adapters
    train_base: WhisperDataset
    dev_base: WhisperDataset
    caches: Caches
    train_set: TrainingSet
    dev_set: TrainingSet
    params: list[nn.Parameter]  # what the optimiser trains, in its order
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None

    @property
    def student(self) -> DQWhisper:
        return self.model.student


def load_source(name: str, n_audio_ctx: int) -> DQWhisper:
    """Any Whisper (store name, openai/DQ-Whisper .pt) as a DQWhisper on the CPU with the training window."""
    model = load_model(name, device="cpu")
    keep = getattr(model.decoder, "vocab_keep", None)
    if getattr(model, "quant_config", None):
        raise DQWhisperError(f"{name}: a fake-quantized model cannot be a teacher or a source to cut from")
    if n_audio_ctx > model.dims.n_audio_ctx:
        raise DQWhisperError(
            f"{name} was trained with a {model.dims.n_audio_ctx / 50:g} s window; data.audio_window "
            f"= {n_audio_ctx / 50:g} s is larger"
        )
    out = from_whisper(
        model,
        ctc_units=getattr(model, "ctc_units", 0),
        vocab_keep=None if keep is None else keep.tolist(),
        n_audio_ctx=n_audio_ctx,
    )
    return out.eval()


def check_languages(tokenizer: Tokenizer, model_name: str, train_dir: Path, languages: list[str] | None) -> None:
    """An English-only model (*.en) trains on English only: say so at set-up, not as a run of bad utterances."""
    if is_multilingual(tokenizer):
        return
    others = [lang for lang in DataDir.load(train_dir).filter(languages=languages).languages if lang != "en"]
    if others:
        raise DQWhisperError(
            f"{model_name} is an English-only model (vocabulary of {N_VOCAB_ENGLISH} ids, no language "
            f"tokens) but {train_dir} has languages {others}: set data.languages=[en] or use a "
            "multilingual model"
        )


def check_compatible(teacher: DQWhisper, source: DQWhisper, teacher_name: str, source_name: str) -> None:
    """Teacher and student (the model it is cut from) must read the same mel and speak the same vocabulary."""
    t, s = teacher.dims, source.dims

    def kind(n_vocab: int) -> str:
        return "English-only" if n_vocab == N_VOCAB_ENGLISH else f"multilingual, {n_vocab - 51765 - 1} languages"

    problems = []
    if t.n_mels != s.n_mels:
        problems.append(f"the teacher takes {t.n_mels}-bin log-mels, the student {s.n_mels}")
    if t.n_vocab != s.n_vocab:
        problems.append(
            f"the teacher's vocabulary has {t.n_vocab} ids ({kind(t.n_vocab)}), the student's "
            f"{s.n_vocab} ({kind(s.n_vocab)})"
        )
    if t.n_text_ctx < s.n_text_ctx:
        problems.append(f"the teacher reads {t.n_text_ctx} text positions, the student {s.n_text_ctx}")
    if problems:
        raise DQWhisperError(
            f"teacher {teacher_name} cannot teach a student cut from {source_name}: "
            + "; ".join(problems)
            + " (choose a teacher of the same Whisper family)"
        )


def check_teacher_vocab(teacher: DQWhisper, student: DQWhisper, teacher_name: str) -> None:
    """A teacher with a pruned vocabulary must keep every id the student keeps (KD reads its logits there)."""
    t_keep = teacher.decoder.vocab_keep
    if t_keep is None:
        return
    s_keep = student.decoder.vocab_keep
    missing = (set(range(student.dims.n_vocab)) if s_keep is None else set(s_keep.tolist())) - set(t_keep.tolist())
    if missing:
        raise DQWhisperError(
            f"teacher {teacher_name} has a pruned vocabulary without {len(missing)} token id(s) the "
            f"student keeps (e.g. {min(missing)}): use a teacher with the full vocabulary, or prune "
            "the student on the same training text"
        )


def build_student(
    cfg: Any, source: DQWhisper, vocab_keep: list[int] | None, ctc_units: int, n_audio_ctx: int
) -> DQWhisper:
    s = cfg.student
    enc = None if s.encoder_layers is None else list(s.encoder_layers)
    dec = None if s.decoder_layers is None else list(s.decoder_layers)
    if s.init == "copy" and (enc is not None or dec is not None):
        raise DQWhisperError("student.init=copy keeps every layer: leave student.encoder_layers/decoder_layers null")
    return from_whisper(
        source,
        ctc_units=ctc_units,
        vocab_keep=vocab_keep,
        encoder_layers=enc,
        decoder_layers=dec,
        n_audio_ctx=n_audio_ctx,
    )


def set_trainable(student: DQWhisper, cfg: Any) -> list[nn.Parameter]:
    for p in student.encoder.parameters():
        p.requires_grad_(not cfg.student.freeze_encoder)
    for p in student.decoder.parameters():
        p.requires_grad_(not cfg.student.freeze_decoder)
    if cfg.student.freeze_embedding:  # the token embedding (= the tied output projection); its quantizer still trains
        student.decoder.token_embedding.weight.requires_grad_(False)
    if student.ctc_head is not None:
        for p in student.ctc_head.parameters():
            p.requires_grad_(bool(cfg.student.train_ctc_head))
    if not cfg.student.train_weights:  # the quantizers' scales only (of the parts not frozen above)
        for name, p in student.named_parameters():
            if not is_quantizer_param(name):
                p.requires_grad_(False)
    return [p for p in student.parameters() if p.requires_grad]


def lr_lambda(step: int, warmup: int, total: int, kind: str, floor: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


def make_bpe(cfg: Any, source: DQWhisper, train_dir: Path, languages: list[str] | None) -> BPE | None:
    """CTC units: the source's own sentencepiece model when it has a CTC head (the student inherits the head), else
    one trained on the training text."""
    if not cfg.student.ctc:
        return None
    if source.ctc_bpe is not None and source.ctc_units > 0:
        return BPE.load(source.ctc_bpe)
    data = DataDir.load(train_dir).filter(languages=languages)
    return train_bpe([u.text for u in data.utts], cfg.data.bpe_vocab_size)


def make_datasets(
    cfg: Any, tokenizer: Tokenizer, bpe: BPE | None, n_mels: int, n_audio_ctx: int, languages: list[str] | None
) -> tuple[WhisperDataset, WhisperDataset]:
    data_dir = Path(cfg.data.data_dir)
    spec = cfg.data.spec_augment if not cfg.student.freeze_encoder else None
    if cfg.data.spec_augment.enabled and cfg.student.freeze_encoder:
        log.info("data.spec_augment is off: the encoder is frozen (its outputs are features, not trained)")
    common = dict(
        tokenizer=tokenizer,
        n_mels=n_mels,
        n_audio_ctx=n_audio_ctx,
        bpe=bpe,
        max_bad_fraction=cfg.data.max_bad_fraction,
        languages=languages,
    )
    train = WhisperDataset(data_dir / cfg.data.train_set, spec_augment=spec, **common)
    dev = WhisperDataset(data_dir / cfg.data.dev_set, **common)
    for ds, n in ((train, cfg.data.max_train_utts), (dev, cfg.data.max_dev_utts)):
        if 0 < n < len(ds.items):  # evenly spaced over the id-sorted set, so every language stays
            ds.items = [ds.items[int(i * len(ds.items) / n)] for i in range(n)]
    return train, dev


def is_quantizer_param(name: str) -> bool:
    """A fake quantizer's own parameter (LSQ scale or zero point), not a weight."""
    return ".weight_fake_quantizer." in f".{name}"


def make_optimizer(
    cfg: Any, params: list[nn.Parameter], head: list[nn.Module | None], named: dict[int, str] | None = None
):
    """AdamW/Adam with the new layers (`head`: CTC head, adapters) at optim.head_lr, the quantizers' LSQ scales
    (found by name in `named`: id -> parameter name) at optim.quant_lr without weight decay (decay would shrink the
    quantization step); the warm-up + decay schedule."""
    oc = cfg.optim
    opt_cls = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
    head_ids = {id(p) for m in head if m is not None for p in m.parameters()}
    quant_ids = {i for i, n in (named or {}).items() if is_quantizer_param(n)}
    groups = [
        {"params": [p for p in params if id(p) not in head_ids | quant_ids]},
        {
            "params": [p for p in params if id(p) in head_ids and id(p) not in quant_ids],
            "lr": oc.head_lr if oc.head_lr is not None else oc.lr,
        },
        {
            "params": [p for p in params if id(p) in quant_ids],
            "lr": oc.quant_lr if oc.quant_lr is not None else oc.lr,
            "weight_decay": 0.0,
        },
    ]
    optimizer = opt_cls(
        [g for g in groups if g["params"]], lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay
    )
    total = cfg.trainer.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, oc.warmup_steps, total, oc.scheduler, oc.min_lr_ratio)
    )
    return optimizer, scheduler


def setup(cfg: Any) -> tuple[torch.device, DistInfo, torch.dtype | None]:
    """Checked config -> (this rank's device, the process group, the AMP dtype); threads, experiment dir."""
    validate_config(cfg)
    device = resolve_device(cfg.trainer.device)
    dist = init_distributed(device)
    device = rank_device(device, dist)
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.amp) if device.type == "cuda" else None
    return device, dist, amp_dtype


def build(cfg: Any, device: torch.device, dist: DistInfo, amp_dtype: torch.dtype | None = None) -> Parts:
    set_seed(cfg.trainer.seed)
    expdir = Path(cfg.checkpoint_dir)
    n_audio_ctx = window_frames(cfg.data.audio_window)
    languages = None if cfg.data.languages is None else list(cfg.data.languages)

    need_teacher = cfg.loss.alpha > 0 and bool(cfg.teacher.name)
    src_name = cfg.student.name or cfg.teacher.name
    source = load_source(src_name, n_audio_ctx)
    tokenizer = default_tokenizer(source.dims.n_vocab)  # the model's own: multilingual or English-only, 99/100 langs
    check_languages(tokenizer, src_name, Path(cfg.data.data_dir) / cfg.data.train_set, languages)
    teacher = None
    if need_teacher:
        teacher = source if src_name == cfg.teacher.name else load_source(cfg.teacher.name, n_audio_ctx)
        check_compatible(teacher, source, cfg.teacher.name, src_name)
        teacher.requires_grad_(False)
        teacher.to(device).eval()

    bpe = make_bpe(cfg, source, Path(cfg.data.data_dir) / cfg.data.train_set, languages)
    if bpe is not None and dist.main:
        bpe.save(expdir / "bpe.model")
    train_base, dev_base = make_datasets(cfg, tokenizer, bpe, source.dims.n_mels, n_audio_ctx, languages)

    vocab_keep = None
    if cfg.student.prune_vocab:
        lists = text_tokens(train_base.data, tokenizer, languages).values()
        vocab_keep = vocab_from_token_lists(list(lists), source.dims.n_vocab, tokenizer.eot)
    ctc_units = bpe.vocab_size if bpe is not None else 0
    student = build_student(cfg, source, vocab_keep, ctc_units, n_audio_ctx)
    student.decoder.dropout = float(cfg.student.dropout)
    if teacher is not None:
        check_teacher_vocab(teacher, student, cfg.teacher.name)
    student.ctc_bpe = bpe.model_bytes if bpe is not None else None
    quant_cfg = OmegaConf.to_object(cfg.quant) if OmegaConf.is_config(cfg.quant) else cfg.quant
    order = None
    if cfg.quant.enabled and cfg.quant.embedding_hi_rows:  # ranked by the float student, before it is quantized
        order = embedding_rows_by_use(
            student.to(device), train_base, cfg.quant.embedding_rank_utts, window_margins(cfg)[0], device
        )
    if cfg.quant.enabled:
        prepare(student, quant_cfg)
        if order is not None:
            widen_embedding_rows(student, order, quant_cfg)
    student.to(device)
    del source
    if cfg.quant.enabled and cfg.quant.gptq:  # frozen layers keep these codes; trainable ones start from them
        gptq_calibrate(
            student, train_base, cfg.quant.gptq_utts, "", device, window_margins(cfg)[0], cfg.quant.gptq_act_order
        )
    params = set_trainable(student, cfg)

    adapter = enc_adapter = None
    m = cfg.loss.match
    if need_teacher and m.enabled:
        adapter = feature_adapter(student, teacher, m.feature).to(device)
        params += list(adapter.parameters())
        if m.encoder and not cfg.student.freeze_encoder:
            enc_adapter = feature_adapter(student, teacher, m.feature, side="encoder").to(device)
            params += list(enc_adapter.parameters())
    if not params:
        raise DQWhisperError("nothing to train: every parameter is frozen")

    tc = cfg.trainer
    filler = CacheFiller(
        Path(tc.cache_dir) if tc.cache_dir else Path("exp/cache"),
        getattr(torch, tc.cache_dtype),
        n_audio_ctx,
        device,
        tc.valid_batch_size,
        amp_dtype,
        tc.progress,
    )
    caches = filler.open(cfg, student, teacher)
    margin, t_margin = window_margins(cfg)
    train_set = TrainingSet(train_base, caches.enc, caches.teacher_enc, caches.teacher, margin, t_margin)
    dev_set = TrainingSet(dev_base, caches.enc, margin=margin)
    if margin is not None and cfg.decode.batch_window != margin:
        log.warning(
            "data.batch_window=%s but decode.batch_window=%s: dev (and inference.py) decode other windows than "
            "training feeds",
            margin,
            cfg.decode.batch_window,
        )
    targets: TeacherTargets | None = None
    if teacher is not None:
        kind = CachedTargets if caches.teacher_logits is not None else LiveTargets
        perturbed = cfg.data.prefix_noise > 0 or (
            cfg.data.feature_mask.num_time_masks > 0 and cfg.data.feature_mask.teacher
        )
        if kind is CachedTargets and (perturbed or cfg.loss.on_policy.weight > 0):
            raise DQWhisperError(
                "data.prefix_noise / data.feature_mask.teacher / loss.on_policy need the teacher's targets on each "
                "step's perturbed inputs or the student's hypotheses: set trainer.cache_teacher=false"
            )
        targets = kind(
            teacher, student.decoder.vocab_keep, cfg.loss.kd_topk, m.feature if m.enabled else None, amp_dtype
        )
    if dist.main:
        filler.fill(train_set, dev_set, caches, student, targets)
    barrier(dist)
    check_usable(train_set, dev_set)

    model = DistillModel(
        student,
        cfg.loss,
        targets,
        adapter,
        enc_adapter,
        cfg.student.freeze_encoder,
        amp_dtype,
        all_reduce=all_reduce_sum if dist.enabled else None,
        world_size=dist.world_size,
        feature_mask=(cfg.data.feature_mask.num_time_masks, cfg.data.feature_mask.time_mask_param),
        mask_teacher=cfg.data.feature_mask.teacher,
        prefix_noise=cfg.data.prefix_noise,
        eot=tokenizer.eot,
    )
    optimizer, scheduler = make_optimizer(
        cfg, params, [student.ctc_head, adapter, enc_adapter], {id(p): n for n, p in student.named_parameters()}
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    keep = student.decoder.vocab_keep
    log.info(
        "student: %d encoder / %d decoder layers, %.1fM parameters (%.1fM trainable), vocabulary %s, "
        "CTC units %d, window %.1f s%s; teacher: %s",
        student.dims.n_audio_layer,
        student.dims.n_text_layer,
        sum(p.numel() for p in student.parameters()) / 1e6,
        sum(p.numel() for p in params) / 1e6,
        "full" if keep is None else len(keep),
        ctc_units,
        n_audio_ctx / 50,
        "" if margin is None else f" (each utterance's: its audio + {margin:g} s, whole seconds)",
        cfg.teacher.name if teacher is not None else "none",
    )
    return Parts(
        tokenizer, bpe, model, train_base, dev_base, caches, train_set, dev_set, params, optimizer, scheduler, scaler
    )
