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

from dqwhisper.data.dataset import MEL_PADDINGS
from dqwhisper.distill.matching import DISTANCES as MATCH_DISTANCES
from dqwhisper.distill.matching import MODES as MATCH_MODES
from dqwhisper.quant.config import QuantConfig
from dqwhisper.quant.kernels import CHOICES as KERNELS
from dqwhisper.utils import DQWhisperError

MATCH_FEATURES = ("ffn", "block")


@dataclass
class CollectorConfig:
    minibatch_size: int = 8  # utterances per batch (per rank)
    max_frames: int = 0  # optional cap on sum of encoder frames per batch; 0 = no cap
    shuffle: bool = True  # seeded shuffle of the training order, new permutation every epoch
    num_workers: int = 0  # DataLoader workers for the uncached (audio) path


@dataclass
class FeatureMaskConfig:
    """Time masks on the frozen encoder's outputs (cached or not) where a student's decoder reads them in training.
    SpecAugment's time masking moved to the features, for students whose encoder is frozen (SpecAugment on the mel
    would need the encoder run every step)."""

    num_time_masks: int = 0  # masks per utterance; 0 = off
    time_mask_param: int = 25  # max width of one mask, encoder positions (20 ms each)
    teacher: bool = False  # the teacher's targets from the same masked output (consistent teaching); False: unmasked


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
    # S seconds: each utterance's encoder window = its audio + S, rounded up to whole seconds (at most audio_window),
    # as decode.batch_window=S decodes; needs the frozen, cached encoder; null = whole window
    batch_window: Optional[float] = None
    # with batch_window: false = training and dev batches mix windows (padded; each row's cross-attention masked to
    # its own window); true = each batch holds one window (no padding; batches of similar length, which cost dev
    # accuracy)
    group_windows: bool = False
    bpe_vocab_size: int = 500  # sentencepiece units of the CTC head (soft limit)
    max_bad_fraction: float = 0.1  # more bad utterances than this fraction is an error
    max_train_utts: int = 0  # train on N utterances evenly spaced over the set (by id); 0 = all
    max_dev_utts: int = 0  # validate on N dev utterances evenly spaced over the set (by id); 0 = all
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    feature_mask: FeatureMaskConfig = field(default_factory=FeatureMaskConfig)
    prefix_noise: float = 0.0  # training: share of the decoder's input text tokens replaced by others of the batch
    collector: CollectorConfig = field(default_factory=CollectorConfig)


@dataclass
class TeacherConfig:
    name: Optional[str] = "base"  # model store name or .pt path; null = no teacher (CE only)
    # with data.batch_window: true = the teacher's targets come from the same short windows (a teacher trained on
    # them); false = from its whole window (a teacher trained on whole windows)
    batch_window: bool = False


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
    dropout: float = 0.0  # residual-branch dropout in the decoder while training (0: none, as Whisper)
    train_weights: bool = True  # false: only the fake quantizers' LSQ scales (and zero points) train, every weight
    # stays as quantized at the start (GPTQ or rounded): QAT as a calibration of the step sizes


@dataclass
class MatchConfig:
    enabled: bool = False  # layer matching term (the paper's dynamic matching distillation)
    mode: str = "dynamic_limit"  # static | dynamic_nolimit | dynamic_limit
    feature: str = "ffn"  # ffn: FFN intermediate activation (paper) | block: block output
    distance: str = "softmax_mse"  # softmax_mse (paper) | mse | cosine
    temperature: float = 1.0  # softmax temperature of softmax_mse
    encoder: bool = False  # also match encoder layers (only when the encoder trains)


@dataclass
class OnPolicyConfig:
    weight: float = 0.0  # share of the KD term taken on the student's own hypotheses (0 = none): the student decodes
    # each training utterance (no gradient), then learns the teacher's next-token distribution at every position of
    # what it decoded: KD = (1 - weight) * KD on the labels + weight * KD on its own hypotheses
    temperature: float = 0.0  # 0: greedy hypotheses (what decoding does); > 0: sampled at this temperature
    extra_tokens: int = 5  # a hypothesis stops at end-of-text or at its own label's length + this many tokens
    start_step: int = 0  # the term starts at this optimizer step (before it: KD on the labels only); a cut student
    # decodes noise at first, and each on-policy step costs about 2.3x a label-only one


@dataclass
class LossConfig:
    alpha: float = 0.0  # weight of distillation: (1-alpha)*CE + alpha*(KD + lambda_match*match)
    beta: float = 0.1  # weight of the CTC loss on the encoder
    kd_temperature: float = 1.0  # T of T^2 * KL(teacher || student)
    kd_topk: int = 0  # keep only the teacher's top-k logits (cache size); 0 = all kept-vocab logits
    lambda_match: float = 1.0  # weight of layer matching inside the distillation term
    label_smoothing: float = 0.0
    match: MatchConfig = field(default_factory=MatchConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)


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
    save_start: bool = False  # a quantized student: also write start.pt, the model before the first step (its PTQ:
    # the quantizer's scales, GPTQ codes and wide embedding rows as QAT starts from them)
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
class DecodeConfig:
    test_sets: list[str] = field(default_factory=list)  # data dirs; [] = the experiment's data.data_dir/<test_sets>
    out_dir: Optional[str] = None  # output folder; null = TARGET's decode_<set>_<tag>/
    tag: Optional[str] = None  # output folder tag; null = <checkpoint>_<greedy|beamN|ctc>
    checkpoint: str = "best"  # best | last | avg | export | path to a .pt file
    export_mode: str = "int8"  # how export/model.dqw runs: int8 (the `kernel` below) | dequant (exact float reference)
    # auto (fastest per shape that runs what was trained) | fbgemm | onednn | int_mm | float_codes | weight_only | float
    kernel: str = "auto"
    beam_size: int = 1  # 1 = greedy; N > 1 = beam search with N beams
    patience: Optional[float] = None  # beam search patience; null = 1.0
    length_penalty: Optional[float] = None  # alpha in [0, 1] for ranking finished beams; null = length normalization
    max_new_tokens: Optional[int] = None  # tokens sampled per utterance at most; null = n_text_ctx // 2
    language: Optional[str] = None  # null = each utterance's utt2lang; "detect" = Whisper language ID; or one code
    ctc: bool = False  # CTC greedy decoding over the CTC head's sentencepiece units (no autoregressive decoder)
    audio_window: Optional[float] = None  # encoder window in seconds; null = the model's own (n_audio_ctx / 50)
    mel_padding: str = "zeros"  # zeros (transcribe-style, what training uses) | audio; see window_log_mel
    # S: each batch's encoder window is its longest utterance + S seconds, in whole seconds (at most the window
    # above): less encoder work on short audio (whisper.cpp's audio_ctx), at some accuracy; null = the whole window
    batch_window: Optional[float] = None
    # with batch_window: false = a batch mixes windows (padded to its longest; each row encoded and cross-attended
    # on its own window, so larger batches); true = a batch holds one window (what models other than DQWhisper get)
    group_windows: bool = False
    batch_size: int = 8  # utterances per whisper decoding call (one language per batch)
    device: str = "cpu"  # cpu | cuda | auto
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    fp16: bool = False  # half-precision decoding (CUDA only; ignored on the CPU)
    raw: bool = False  # score the text as is: no Whisper normalizers (case and punctuation count)
    cer_languages: list[str] = field(default_factory=lambda: ["ja", "zh", "yue", "th", "lo", "my", "km", "bo"])  # CER
    languages: Optional[list[str]] = None  # decode only these utt2lang languages; null = all
    max_utts: Optional[int] = None  # decode only the first N utterances (by id) of each set; null = all
    shard: Optional[str] = None  # "k/n": decode only the k-th (1-based) of n interleaved parts (scripts/decode.sh)
    # openai-whisper transcribe's rules (see decode_mels)
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # [0.0] = no fallback
    compression_ratio_threshold: Optional[float] = 2.4  # fall back when gzip ratio of the text is above; null = never
    logprob_threshold: Optional[float] = -1.0  # fall back when the average token log-probability is below; null = never
    no_speech_threshold: Optional[float] = 0.6  # no fallback when P(no speech) is above and the logprob test failed
    best_of: int = 5  # samples per fallback temperature (the most likely is kept)
    # true: rows that fail the first temperature wait until batch_size of them (or the language's last batch) are
    # pending, then fall back together (inference.py and training validation; the same hypotheses, fewer and fuller
    # sampling calls); false: each batch falls back on its own rows
    pool_fallback: bool = True
    # true: greedy and sampled batches drop an utterance's rows once all have ended (beam search never); false:
    # whisper's loop, every row stepped until the batch's last one ends (the same transcripts, more steps)
    drop_finished: bool = True
    tokens_per_second: Optional[float] = 12.0  # token cap per utterance: tokens_per_second * seconds + token_cap_margin
    token_cap_margin: int = 10  # (and at most max_new_tokens); null tokens_per_second = only max_new_tokens
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this many tokens is produced twice in one hypothesis
    seed: int = 0  # seed of the fallback sampling (the same input decodes the same way)
    max_bad_fraction: float = 0.1  # unreadable utterances are skipped and counted; more than this fraction: error


def check_decode_config(cfg: DecodeConfig) -> None:
    """Value checks that need no model, so a bad setting fails before anything loads."""
    checks = [
        (cfg.beam_size >= 1, f"decode.beam_size={cfg.beam_size}: must be >= 1"),
        (cfg.batch_size >= 1, f"decode.batch_size={cfg.batch_size}: must be >= 1"),
        (
            cfg.max_new_tokens is None or cfg.max_new_tokens >= 1,
            f"decode.max_new_tokens={cfg.max_new_tokens}: must be >= 1 (or null)",
        ),
        (cfg.patience is None or cfg.patience > 0, f"decode.patience={cfg.patience}: must be > 0 (or null)"),
        (
            cfg.length_penalty is None or 0 <= cfg.length_penalty <= 1,
            f"decode.length_penalty={cfg.length_penalty}: must be in [0, 1] (or null)",
        ),
        (cfg.audio_window is None or cfg.audio_window > 0, f"decode.audio_window={cfg.audio_window}: must be > 0"),
        (cfg.batch_window is None or cfg.batch_window >= 0, f"decode.batch_window={cfg.batch_window}: must be >= 0"),
        (cfg.mel_padding in MEL_PADDINGS, f"decode.mel_padding={cfg.mel_padding}: one of {', '.join(MEL_PADDINGS)}"),
        (cfg.export_mode in ("int8", "dequant"), f"decode.export_mode={cfg.export_mode}: int8 | dequant"),
        (cfg.kernel in KERNELS, f"decode.kernel={cfg.kernel}: one of {' | '.join(KERNELS)}"),
        (0 <= cfg.max_bad_fraction <= 1, f"decode.max_bad_fraction={cfg.max_bad_fraction}: must be in [0, 1]"),
        (cfg.num_threads >= 0, f"decode.num_threads={cfg.num_threads}: must be >= 0"),
        (cfg.best_of >= 1, f"decode.best_of={cfg.best_of}: must be >= 1"),
        (len(cfg.temperatures) > 0, "decode.temperatures: give at least one ([0.0] = no fallback)"),
        (cfg.no_repeat_ngram_size >= 0, f"decode.no_repeat_ngram_size={cfg.no_repeat_ngram_size}: must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DQWhisperError(msg)


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
        (0.0 <= cfg.loss.on_policy.weight <= 1.0, f"loss.on_policy.weight={cfg.loss.on_policy.weight}: in [0, 1]"),
        (cfg.loss.on_policy.temperature >= 0, "loss.on_policy.temperature must be >= 0"),
        (cfg.loss.on_policy.extra_tokens >= 1, "loss.on_policy.extra_tokens must be >= 1"),
        (cfg.loss.on_policy.start_step >= 0, "loss.on_policy.start_step must be >= 0"),
        (0.0 <= cfg.student.dropout < 1.0, f"student.dropout={cfg.student.dropout}: must be in [0, 1)"),
        (0.0 <= cfg.data.prefix_noise < 1.0, f"data.prefix_noise={cfg.data.prefix_noise}: must be in [0, 1)"),
        (cfg.student.init in ("cut", "copy", "pretrained"), f"student.init={cfg.student.init}: cut|copy|pretrained"),
        (cfg.optim.name in ("adam", "adamw"), f"optim.name={cfg.optim.name}: adam|adamw"),
        (cfg.optim.scheduler in ("linear", "cosine", "constant"), f"optim.scheduler={cfg.optim.scheduler}"),
        (cfg.optim.accum_grad >= 1, "optim.accum_grad must be >= 1"),
        (cfg.trainer.amp in ("none", "bf16", "fp16"), f"trainer.amp={cfg.trainer.amp}: none|bf16|fp16"),
        (cfg.trainer.cache_dtype in ("float16", "bfloat16", "float32"), "trainer.cache_dtype"),
        (cfg.data.collector.minibatch_size >= 1, "data.collector.minibatch_size must be >= 1"),
        (not (cfg.trainer.resume and cfg.trainer.overwrite), "trainer.resume and trainer.overwrite: choose one"),
        (
            cfg.trainer.save_every_steps >= 0 and cfg.trainer.save_every_minutes >= 0,
            "trainer.save_every_steps / save_every_minutes must be >= 0",
        ),
        (cfg.student.init != "pretrained" or cfg.student.name, "student.init=pretrained needs student.name"),
        (
            cfg.loss.alpha == 0 or cfg.teacher.name or cfg.quant.ptq,
            "loss.alpha > 0 distils from a teacher: set teacher.name",
        ),
        (
            cfg.student.init == "pretrained" or cfg.teacher.name or cfg.student.name,
            f"student.init={cfg.student.init} copies from teacher.name (or student.name): set one",
        ),
        (
            cfg.data.batch_window is None or cfg.data.batch_window >= 0,
            f"data.batch_window={cfg.data.batch_window}: seconds >= 0, or null",
        ),
        (
            cfg.data.batch_window is None or (cfg.student.freeze_encoder and cfg.trainer.cache_encoder),
            f"data.batch_window={cfg.data.batch_window} needs the frozen, cached encoder (student.freeze_encoder=true, "
            "trainer.cache_encoder=true); to train the encoder, or without the cache, set data.batch_window=null",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise DQWhisperError(f"bad config: {msg}")


def to_container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
