"""Post-training quantization: the float student through the same quantizer as QAT, no training.

    python -m dqwhisper.quant.ptq STUDENT.pt QUANT_CFG OUT.pt [key=value ...] [--calib DATA_DIR]

QUANT_CFG: a YAML file or the name of one in conf/quant/ (w8, w4, w4g64, ...); overrides use dotted keys of
QuantConfig (e.g. weight.bits=3 scope=all). OUT.pt is a fake-quantized checkpoint (the same format QAT writes):
export it with `python -m dqwhisper.quant.export OUT.pt model.dqw`, decode it with inference.py. With LSQ configs
the scales are the LSQ initialisation (per-scale MSE-optimal clipping when scale_init=mse) — PTQ with the
quantizer's best static scales. With `gptq=true` (and `--calib`, a Kaldi-style data dir of training audio) every
linear and convolution is rounded by GPTQ on `gptq_utts` of its utterances instead of to the nearest code.
`embedding_hi_rows=N` (with `--calib`) widens the N token-embedding rows the float student uses most on
`embedding_rank_utts` of them to `embedding_hi_bits`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from dqwhisper.models.student import load_checkpoint, read_checkpoint, save_checkpoint
from dqwhisper.quant.config import QuantConfig, resolve_config
from dqwhisper.data.dataset import WhisperDataset, default_tokenizer
from dqwhisper.quant.prepare import prepare, widen_embedding_rows
from dqwhisper.train.calibrate import embedding_rows_by_use, gptq_calibrate
from dqwhisper.utils import CONF_DIR, DQWhisperError, command, get_logger

log = get_logger(__name__)
QUANT_CONF_DIR = CONF_DIR / "quant"


def load_quant_config(name_or_path: str, overrides: list[str] | None = None) -> QuantConfig:
    """A conf/quant name or YAML path, plus dotted overrides -> validated QuantConfig (enabled, ptq set)."""

    path = Path(name_or_path)
    if not path.is_file():
        path = QUANT_CONF_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in QUANT_CONF_DIR.glob("*.yaml"))
        raise DQWhisperError(f"quant config {name_or_path!r} is neither a file nor one of conf/quant: {names}")
    cfg = OmegaConf.merge(OmegaConf.structured(QuantConfig), OmegaConf.load(path))
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except Exception as e:  # omegaconf raises its own validation errors for unknown keys / wrong types
            raise DQWhisperError(f"quant override {overrides}: {e}") from e
    cfg.enabled = True
    cfg.ptq = True
    return resolve_config(cfg)


def ptq(
    student_path: str | Path,
    cfg: QuantConfig,
    out: str | Path,
    calib: str | Path | None = None,
    drop_ctc: bool = False,
):

    ckpt = read_checkpoint(student_path)
    meta = ckpt.get("dqwhisper") or {}
    if meta.get("quant"):
        raise DQWhisperError(
            f"{student_path} is already quantized ({meta['quant'].get('weight')}); PTQ needs a float student"
        )
    for key, on in (("gptq=true", cfg.gptq), ("embedding_hi_rows > 0", cfg.embedding_hi_rows)):
        if on and calib is None:
            raise DQWhisperError(f"PTQ with {key} needs calibration audio: --calib DATA_DIR (e.g. data/demo/train)")
    model = load_checkpoint(student_path)
    if drop_ctc and model.ctc_head is not None:  # decoding never uses it: not in the quantized file
        log.info("PTQ: the CTC head (%d units) and its sentencepiece model are dropped", model.ctc_units)
        model.ctc_head, model.ctc_units, model.ctc_bpe = None, 0, None
    config = dict(meta.get("config") or {})
    ds = None
    margin = (config.get("data") or {}).get("batch_window")  # the windows the student was trained on
    if calib is not None and (cfg.gptq or cfg.embedding_hi_rows):
        languages = (config.get("data") or {}).get("languages")
        ds = WhisperDataset(
            calib, default_tokenizer(model.dims.n_vocab), model.dims.n_mels, model.dims.n_audio_ctx, languages=languages
        )
    order = embedding_rows_by_use(model, ds, cfg.embedding_rank_utts, margin, "cpu") if cfg.embedding_hi_rows else None
    prepare(model, cfg)
    if order is not None:
        widen_embedding_rows(model, order, cfg)
    if cfg.gptq:
        gptq_calibrate(model, ds, cfg.gptq_utts, "", "cpu", margin, cfg.gptq_act_order)
    if drop_ctc and isinstance(config.get("student"), dict):
        config["student"] = {**config["student"], "ctc": False}
    config["quant"] = cfg.to_dict()
    save_checkpoint(model, out, config=config)
    log.info(
        "PTQ: %s -> %s (%d-bit %s, scope %s)", student_path, out, cfg.weight.bits, cfg.weight.granularity, cfg.scope
    )
    return model


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqwhisper.quant.ptq", description=__doc__.split("\n\n")[0])
    p.add_argument("student", help="float student checkpoint (.pt)")
    p.add_argument("quant", help="conf/quant name (w8, w4, w4g64, ...) or a YAML path")
    p.add_argument("out", help="output fake-quantized checkpoint (.pt)")
    p.add_argument("overrides", nargs="*", help="QuantConfig overrides, e.g. weight.bits=3 scope=all gptq=true")
    p.add_argument(
        "--calib", help="data dir of calibration audio for gptq=true or embedding_hi_rows (e.g. data/demo/train)"
    )
    p.add_argument("--no-ctc", action="store_true", help="drop the CTC head (decoding does not use it; 0.5 MB at base)")
    args = p.parse_intermixed_args(argv)  # overrides may come after the options too
    ptq(args.student, load_quant_config(args.quant, args.overrides), args.out, args.calib, args.no_ctc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
