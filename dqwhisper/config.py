"""Training configuration: dataclass schemas registered in Hydra's ConfigStore.

`conf/config.yaml` composes on top of `TrainConfig`, so every YAML file and every command-line override is checked
against these fields: a misspelt key is an error, not a silent no-op. The paper's command needs `checkpoint_dir`,
`data.data_dir`, `optim.lr`, `data.collector.minibatch_size` and `loss.alpha` under exactly those names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dqwhisper.decoding import DecodeConfig
from dqwhisper.quant.config import QuantConfig
from dqwhisper.utils import DQWhisperError

MATCH_MODES = ("static", "dynamic_nolimit", "dynamic_limit")
MATCH_FEATURES = ("ffn", "block")
MATCH_DISTANCES = ("softmax_mse", "mse", "cosine")


@dataclass
class CollectorConfig:
    minibatch_size: int = 8  # utterances per batch (per rank)
    max_frames: int = 0  # optional cap on sum of encoder frames per batch; 0 = no cap
    shuffle: bool = True  # seeded shuffle of the training order, new permutation every epoch
    num_workers: int = 0  # DataLoader workers for the uncached (audio) path


@dataclass
class SpecAugmentConfig:  # field names as dqwhisper.data.dataset.SpecAugment takes them
    enabled: bool = False  # only applies when the encoder runs (never on cached features)
    freq_mask_param: int = 27  # max width of a frequency mask (mel bins)
    num_freq_masks: int = 2
    time_mask_param: int = 40  # max width of a time mask (mel frames, 10 ms)
    num_time_masks: int = 2


@dataclass
class DataConfig:
    data_dir: str = "data/demo"  # holds train_set/, dev_set/, test_sets/ subdirs
    train_set: str = "train"
    dev_set: str = "dev"
    test_sets: list[str] = field(default_factory=lambda: ["test"])
    languages: Optional[list[str]] = None  # keep only these utt2lang codes; null = all
    audio_window: float = 30.0  # encoder window in seconds (30 = Whisper's own; the paper used 15)
    bpe_vocab_size: int = 500  # sentencepiece units of the CTC head (soft limit)
    max_bad_fraction: float = 0.1  # more bad utterances than this fraction is an error
    max_train_utts: int = 0  # train on N utterances evenly spaced over the set (by id); 0 = all
    max_dev_utts: int = 0  # validate on N dev utterances evenly spaced over the set (by id); 0 = all
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)


@dataclass
class TeacherConfig:
    name: Optional[str] = "base"  # model store name or .pt path; null = no teacher (CE only)


@dataclass
class StudentConfig:
    init: str = "cut"  # cut: layers copied from the teacher | copy: same-size copy | pretrained: student.name
    name: Optional[str] = None  # with init=pretrained (or to cut from a model other than the teacher)
    encoder_layers: Optional[list[int]] = None  # source encoder layers kept; null = all
    decoder_layers: Optional[list[int]] = None  # source decoder layers kept; null = all
    prune_vocab: bool = False  # keep only the token ids the training text uses (+ all special tokens)
    ctc: bool = True  # CTC head on the encoder over sentencepiece units
    freeze_encoder: bool = True  # the paper froze the encoder; frozen + cached is the CPU path
    freeze_decoder: bool = False
    freeze_embedding: bool = False  # keep the token embedding (the tied output projection) as the source has it
    train_ctc_head: bool = True  # the CTC head trains even when the encoder is frozen


@dataclass
class MatchConfig:
    enabled: bool = False  # layer matching term (the paper's dynamic matching distillation)
    mode: str = "dynamic_limit"  # static | dynamic_nolimit | dynamic_limit
    feature: str = "ffn"  # ffn: FFN intermediate activation (paper) | block: block output
    distance: str = "softmax_mse"  # softmax_mse (paper) | mse | cosine
    temperature: float = 1.0  # softmax temperature of softmax_mse
    encoder: bool = False  # also match encoder layers (only when the encoder trains)


@dataclass
class LossConfig:
    alpha: float = 0.0  # weight of distillation: (1-alpha)*CE + alpha*(KD + lambda_match*match)
    beta: float = 0.1  # weight of the CTC loss on the encoder
    kd_temperature: float = 1.0  # T of T^2 * KL(teacher || student)
    kd_topk: int = 0  # keep only the teacher's top-k logits (cache size); 0 = all kept-vocab logits
    lambda_match: float = 1.0  # weight of layer matching inside the distillation term
    label_smoothing: float = 0.0
    match: MatchConfig = field(default_factory=MatchConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw
    lr: float = 1e-4
    head_lr: Optional[float] = 1e-3  # lr of the layers training adds (CTC head, matching adapters); null = lr
    quant_lr: Optional[float] = None  # lr of the quantizers' LSQ scales (no weight decay on them); null = lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    scheduler: str = "linear"  # linear | cosine | constant (each after a linear warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # decay floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    accum_grad: int = 1  # batches per optimizer step


@dataclass
class TrainerConfig:
    seed: int = 1234
    max_steps: int = 100  # optimizer steps
    max_epochs: int = 0  # 0 = no epoch limit (max_steps decides)
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16 (GPU only; ignored on the CPU)
    num_threads: int = 0  # torch intra-op threads per rank; 0 = torch default
    log_every: int = 10
    valid_every: int = 50  # steps between validations (and checkpoints); 0 = only at the end
    valid_decode: bool = True  # greedy-decode dev for WER/CER (else the dev loss is the metric)
    valid_batch_size: int = 16
    keep_top_k: int = 3  # step_<N>.pt kept by dev metric
    early_stop: int = 0  # stop when dev has not improved for this many validations in a row; 0 = off
    average: bool = True  # write avg.pt, the average of the kept checkpoints
    resume: bool = False  # continue from checkpoint_dir/last.pt (an error when there is none)
    overwrite: bool = False  # start over in a checkpoint_dir that holds an experiment (its outputs are removed)
    save_every_steps: int = 0  # also write last.pt every N steps, between validations; 0 = only at validations
    save_every_minutes: float = 10.0  # also write last.pt when this much time passed since the last one; 0 = off
    cache_encoder: bool = True  # frozen encoder: compute its outputs once, on disk
    cache_teacher: bool = True  # frozen teacher: its decoder outputs once, on disk
    cache_dir: Optional[str] = None  # null = exp/cache (shared between experiments; keyed by audio + model)
    cache_dtype: str = "float16"  # storage dtype of cached features
    max_nonfinite: int = 20  # abort after this many skipped non-finite steps
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar (rank 0)
    stop_after_steps: int = 0  # stop (as if killed) after this many steps of this run; 0 = off; for tests


@dataclass
class TrainConfig:
    checkpoint_dir: str = "exp/default"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def validate(cfg: TrainConfig | DictConfig) -> None:
    """Checks of values (names are already checked by the schema)."""
    m = cfg.loss.match
    checks = [
        (m.mode in MATCH_MODES, f"loss.match.mode={m.mode}: one of {MATCH_MODES}"),
        (m.feature in MATCH_FEATURES, f"loss.match.feature={m.feature}: one of {MATCH_FEATURES}"),
        (m.distance in MATCH_DISTANCES, f"loss.match.distance={m.distance}: one of {MATCH_DISTANCES}"),
        (0.0 <= cfg.loss.alpha <= 1.0, f"loss.alpha={cfg.loss.alpha}: must be in [0, 1]"),
        (cfg.loss.beta >= 0, f"loss.beta={cfg.loss.beta}: must be >= 0"),
        (cfg.loss.kd_temperature > 0, "loss.kd_temperature must be > 0"),
        (cfg.student.init in ("cut", "copy", "pretrained"), f"student.init={cfg.student.init}: cut|copy|pretrained"),
        (cfg.optim.name in ("adam", "adamw"), f"optim.name={cfg.optim.name}: adam|adamw"),
        (cfg.optim.scheduler in ("linear", "cosine", "constant"), f"optim.scheduler={cfg.optim.scheduler}"),
        (cfg.optim.accum_grad >= 1, "optim.accum_grad must be >= 1"),
        (cfg.trainer.amp in ("none", "bf16", "fp16"), f"trainer.amp={cfg.trainer.amp}: none|bf16|fp16"),
        (cfg.trainer.cache_dtype in ("float16", "bfloat16", "float32"), "trainer.cache_dtype"),
        (cfg.data.collector.minibatch_size >= 1, "data.collector.minibatch_size must be >= 1"),
        (not (cfg.trainer.resume and cfg.trainer.overwrite), "trainer.resume and trainer.overwrite: choose one"),
        (cfg.trainer.save_every_steps >= 0 and cfg.trainer.save_every_minutes >= 0,
         "trainer.save_every_steps / save_every_minutes must be >= 0"),
        (cfg.student.init != "pretrained" or cfg.student.name, "student.init=pretrained needs student.name"),
        (cfg.loss.alpha == 0 or cfg.teacher.name or cfg.quant.ptq,
         "loss.alpha > 0 distils from a teacher: set teacher.name"),
        (cfg.student.init == "pretrained" or cfg.teacher.name or cfg.student.name,
         f"student.init={cfg.student.init} copies from teacher.name (or student.name): set one"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DQWhisperError(f"bad config: {msg}")


def to_container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
