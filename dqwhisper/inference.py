"""Decode and score: `dqwhisper decode MODEL TARGET [key=value ...]`, or in the paper's form
`python inference.py MODEL TARGET [key=value ...]` (the top-level inference.py runs this module's main).

MODEL   the Whisper size the checkpoint belongs to (tiny, base, small, medium, large-v3, turbo, *.en, ...).
TARGET  an experiment dir (its config.yaml is read; `decode.checkpoint` picks best | last | avg | export | a path)
        or a checkpoint file (e.g. exp/models/base.pt, a bare teacher: no experiment dir needed).
Overrides use Hydra's syntax on the experiment's config (`decode.test_sets=[data/demo/test]`, `decode.beam_size=5`,
`decode.device=cuda`, `decode.num_threads=2`, `decode.out_dir=DIR`); unknown keys are errors.

Per test set it writes `decode_<set>_<tag>/` (in TARGET, or next to a checkpoint file; `decode.out_dir` replaces
it): hyp.txt, ref.txt, utt_errors.tsv, alignment.txt, results.json, summary.txt. It prints each summary.
Settings, test sets (every selected audio header) and output dirs are checked before the model loads; hyp.txt
grows batch by batch (an interrupted run keeps what it decoded); unreadable utterances are skipped and listed in
results.json (`skipped`; more than decode.max_bad_fraction is an error), empty references are decoded but not
scored (`empty_references`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from whisper.model import ModelDimensions


from dqwhisper.decoding import (
    DETECT,
    DecodeConfig,
    apply_audio_window,
    check_decode_config,
    decode_utterances,
    search_tag,
)
from dqwhisper.decoding.sets import (
    HypWriter,
    check_bad_fraction,
    check_out_dir,
    load_test_set,
    set_names,
    write_utt_decode,
)
from dqwhisper.interop.hf import is_hf_dir
from dqwhisper.models.load import load_model
from dqwhisper.quant.quantized import select_kernels
from dqwhisper.scoring import (
    UTT_DECODE,
    empty_references,
    score_utterances,
    summarize,
    write_kaldi_text,
    write_results,
)
from dqwhisper.utils import DQWhisperError, command, get_logger, resolve_device

log = get_logger("dqwhisper.inference")

NAMED_CHECKPOINTS = {"best": "best.pt", "last": "last.pt", "avg": "avg.pt", "export": "export/model.dqw"}

# openai-whisper's released sizes: (n_mels, n_vocab, n_audio_state, n_audio_head, n_audio_layer,
#                                   n_text_state, n_text_head, n_text_layer)
WHISPER_DIMS = {
    "tiny": (80, 51865, 384, 6, 4, 384, 6, 4),
    "base": (80, 51865, 512, 8, 6, 512, 8, 6),
    "small": (80, 51865, 768, 12, 12, 768, 12, 12),
    "medium": (80, 51865, 1024, 16, 24, 1024, 16, 24),
    "large-v1": (80, 51865, 1280, 20, 32, 1280, 20, 32),
    "large-v2": (80, 51865, 1280, 20, 32, 1280, 20, 32),
    "large-v3": (128, 51866, 1280, 20, 32, 1280, 20, 32),
    "large-v3-turbo": (128, 51866, 1280, 20, 32, 1280, 20, 4),
}
for _size in ("tiny", "base", "small", "medium"):
    WHISPER_DIMS[f"{_size}.en"] = (80, 51864) + WHISPER_DIMS[_size][2:]
WHISPER_DIMS["large"] = WHISPER_DIMS["large-v3"]
WHISPER_DIMS["turbo"] = WHISPER_DIMS["large-v3-turbo"]
_DIM_NAMES = (
    "n_mels",
    "n_vocab",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)
_MAX_LAYERS = {"n_audio_layer", "n_text_layer"}


def check_model_name(name: str, dims: ModelDimensions, source: str) -> None:
    """MODEL agrees with a checkpoint when the widths, heads, mel bins and vocabulary equal the named size's and the
    layer counts, audio window and text context are at most its own (a student cut from it keeps fewer layers and
    may have a shorter window). Otherwise raise, saying what the checkpoint has and which size it looks like."""
    if name not in WHISPER_DIMS:
        raise DQWhisperError(f"MODEL '{name}' is not a Whisper size; one of: {', '.join(WHISPER_DIMS)}")

    def mismatches(size: str) -> list[str]:
        out = []
        for key, want in zip(_DIM_NAMES, WHISPER_DIMS[size]):
            got = getattr(dims, key)
            if (got > want) if key in _MAX_LAYERS else (got != want):
                out.append(f"{key}={got} ({'at most ' if key in _MAX_LAYERS else ''}{want} for {size})")
        if dims.n_audio_ctx > 1500 or dims.n_text_ctx > 448:
            out.append(f"n_audio_ctx={dims.n_audio_ctx}, n_text_ctx={dims.n_text_ctx} (at most 1500, 448)")
        return out

    bad = mismatches(name)
    if bad:
        like = [s for s in WHISPER_DIMS if not mismatches(s)]
        hint = f"; it looks like {' / '.join(like)}" if like else "; it matches no Whisper size"
        raise DQWhisperError(f"MODEL '{name}' does not match checkpoint {source}: {', '.join(bad)}{hint}")


def parse_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply Hydra command-line overrides to `cfg` in struct mode: a key that does not exist is an error."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise DQWhisperError(f"bad override: {e}") from None
    OmegaConf.set_struct(cfg, True)
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.is_add() or o.is_force_add() or o.package:
            raise DQWhisperError(f"override '{o.input_line}': only key=value is supported")
        if not _has_key(cfg, key):
            raise DQWhisperError(f"override '{o.input_line}': unknown key '{key}'")
        try:
            OmegaConf.update(cfg, key, o.value(), merge=False)
        except OmegaConfBaseException as e:
            raise DQWhisperError(f"override '{o.input_line}': {str(e).splitlines()[0]}") from None
    return cfg


def _has_key(cfg: DictConfig, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = None if OmegaConf.is_interpolation(node, part) else node[part]
    return True


def _is_model_dir(path: Path) -> bool:
    """A model directory (Hugging Face or CTranslate2) rather than an experiment dir."""
    return not (path / "config.yaml").is_file() and (is_hf_dir(path) or (path / "model.bin").is_file())


def load_config(target: Path, overrides: list[str]) -> tuple[DictConfig, bool]:
    """(config, is_experiment): the experiment's saved config (or a bare one) with a typed `decode` section."""
    schema = OmegaConf.structured(DecodeConfig)
    if target.is_dir() and not _is_model_dir(target):
        path = target / "config.yaml"
        if not path.is_file():
            raise DQWhisperError(
                f"{target}: not an experiment dir (no config.yaml); "
                "give an experiment dir written by training, or a checkpoint file"
            )
        saved = OmegaConf.load(path)
        try:
            decode = OmegaConf.merge(schema, saved.get("decode") or {})
        except OmegaConfBaseException as e:
            raise DQWhisperError(f"{path}: bad decode section: {str(e).splitlines()[0]}") from None
        saved.decode = decode
        return parse_overrides(saved, overrides), True
    if not target.exists():
        raise DQWhisperError(f"{target}: no such experiment dir or checkpoint file")
    return parse_overrides(OmegaConf.create({"decode": schema}), overrides), False


def resolve_checkpoint(target: Path, is_exp: bool, choice: str) -> Path:
    if not is_exp:
        if choice not in ("best", str(target)):
            log.warning("decode.checkpoint=%s ignored: TARGET %s is a checkpoint file", choice, target)
        return target
    if choice in NAMED_CHECKPOINTS:
        path = target / NAMED_CHECKPOINTS[choice]
    else:
        path = Path(choice)
    if not path.is_file():
        found = [n for n, f in NAMED_CHECKPOINTS.items() if (target / f).is_file()]
        have = ", ".join(found) if found else "no checkpoint (best.pt, last.pt, avg.pt, export/model.dqw)"
        raise DQWhisperError(
            f"{target}: checkpoint '{choice}' ({path}) does not exist; this experiment has {have}"
            " (choose with decode.checkpoint=...)"
        )
    return path


def test_set_dirs(cfg: DictConfig, is_exp: bool) -> list[Path]:
    sets = list(cfg.decode.test_sets)
    if not sets and is_exp and "data" in cfg and cfg.data.get("data_dir"):
        sets = [str(Path(cfg.data.data_dir) / s) for s in (cfg.data.get("test_sets") or [])]
    if not sets:
        raise DQWhisperError("no test set: give decode.test_sets=[DATA_DIR,...]")
    return [Path(s) for s in sets]


@dataclass
class Plan:
    cfg: DecodeConfig
    is_exp: bool
    checkpoint: Path
    test_sets: list[Path]
    out_dirs: list[Path]  # one per test set
    tag: str


def plan(target: str | Path, overrides: list[str]) -> Plan:
    """What `run` would decode and where it would write, from TARGET and the overrides (nothing is loaded)."""
    target = Path(target)
    cfg, is_exp = load_config(target, overrides)
    dcfg: DecodeConfig = OmegaConf.to_object(cfg.decode)
    check_decode_config(dcfg)
    if dcfg.languages is None and is_exp and "data" in cfg and cfg.data.get("languages"):
        dcfg.languages = list(cfg.data.languages)
    sets = test_set_dirs(cfg, is_exp)
    ckpt = resolve_checkpoint(target, is_exp, dcfg.checkpoint)
    ckpt_tag = ckpt.stem if not is_exp or dcfg.checkpoint not in NAMED_CHECKPOINTS else dcfg.checkpoint
    tag = dcfg.tag or f"{ckpt_tag}_{search_tag(dcfg)}"
    root = target if is_exp else target.parent
    if dcfg.out_dir is None:
        outs = [root / f"decode_{name}_{tag}" for name in set_names(sets)]
    elif len(sets) == 1:
        outs = [Path(dcfg.out_dir)]
    else:
        outs = [Path(dcfg.out_dir) / f"decode_{name}_{tag}" for name in set_names(sets)]
    return Plan(dcfg, is_exp, ckpt, sets, outs, tag)


def run(model_name: str, target: str | Path, overrides: list[str], progress: bool = True) -> list[dict]:
    """Decode and score every test set; return the results.json dicts (with "out_dir" added).

    Before the model loads: the decode settings, every test set (files, selected utterances' audio headers) and
    every output dir are checked. Unreadable utterances are skipped and counted (more than decode.max_bad_fraction
    of a set is an error); hypotheses reach hyp.txt batch by batch; empty references are decoded but not scored."""
    target = Path(target)
    p = plan(target, overrides)
    dcfg, is_exp, ckpt, tag = p.cfg, p.is_exp, p.checkpoint, p.tag
    sets = [load_test_set(s, dcfg) for s in p.test_sets]
    for out in p.out_dirs:
        check_out_dir(out)
    device = resolve_device(dcfg.device)
    if dcfg.num_threads > 0:
        torch.set_num_threads(dcfg.num_threads)
    model = load_model(ckpt, device, dcfg.export_mode, kernel=dcfg.kernel, select=False)
    check_model_name(model_name, model.dims, str(ckpt))
    apply_audio_window(model, dcfg.audio_window)
    if ckpt.suffix == ".dqw":
        select_kernels(model, batch=dcfg.batch_size * dcfg.beam_size)
    results = []
    for ts, out in zip(sets, p.out_dirs):
        path = ts.path
        utts = [u for u in ts.utts if u.utt_id not in ts.bad]
        bad = dict(ts.bad)

        def on_skip(utt_id: str, reason: str, bad=bad, n=len(ts.utts), path=path) -> None:
            bad[utt_id] = reason
            check_bad_fraction(path, bad, n, dcfg.max_bad_fraction)

        log.info("decoding %s (%d utterances) with %s -> %s", path, len(utts), ckpt, out)
        writer = HypWriter(out / "hyp.txt")
        try:
            dec = decode_utterances(
                model,
                ts.data,
                utts,
                dcfg,
                progress=progress,
                bpe_fallback=target / "bpe.model" if is_exp else None,
                durations=ts.durations,
                on_batch=writer,
                on_skip=on_skip,
            )
        except BaseException:
            writer.close()
            log.error(
                "%s: decoding stopped; the %d hypotheses decoded so far are in %s", path, writer.n, out / "hyp.txt"
            )
            raise
        writer.close()
        hyps = {h.utt_id: h.text for h in dec.hyps}
        refs = {u.utt_id: u.text for u in utts if u.utt_id in hyps}
        langs = {u.utt_id: u.lang for u in utts}
        write_kaldi_text(out / "hyp.txt", hyps)
        write_kaldi_text(out / "ref.txt", refs)
        write_utt_decode(out / UTT_DECODE, dec.hyps)
        if dcfg.language == DETECT:
            write_kaldi_text(out / "hyp_lang.txt", {h.utt_id: h.language for h in dec.hyps})
        empty = empty_references(refs, langs, dcfg.raw)
        try:
            scores, alignments = score_utterances(refs, hyps, langs, dcfg.raw, dcfg.cer_languages)
        except DQWhisperError as e:
            raise DQWhisperError(f"{path}: {e} (the hypotheses are in {out / 'hyp.txt'})") from None
        summary = summarize(scores)
        add_runaways(summary, dec)
        summary.update(
            {
                "rtf": dec.rtf,
                "tokens_per_second": dec.tokens_per_second,
                "wall_seconds": dec.wall_seconds,
                "audio_seconds": dec.audio_seconds,
                "n_tokens": dec.n_tokens,
                "n_trimmed": dec.n_trimmed,
                "n_selected": len(ts.utts),
                "n_skipped": len(bad),
                "skipped": bad,
                "empty_references": empty,
                "model": model_name,
                "checkpoint": str(ckpt),
                "test_set": str(path),
                "tag": tag,
                "normalized": not dcfg.raw,
                "device": str(device),
                "num_threads": torch.get_num_threads(),
                "decode": asdict(dcfg),
            }
        )
        title = f"{path} | {ckpt} | {tag}"
        if bad or empty:
            title += f" | {len(bad)} unreadable utterance(s) skipped, {len(empty)} empty reference(s) not scored"
        table = write_results(out, scores, alignments, summary, title=title)
        print(table, flush=True)
        results.append({**summary, "out_dir": str(out)})
    return results


def add_runaways(summary: dict, dec) -> None:
    """`n_runaways` per language and overall (hypotheses that still hit the token cap or fail the compression test
    after fallback), their ids, `n_fallbacks` (utterances decoded at more than one temperature) and
    `fallback_reasons` (those utterances counted by the tests their first hypothesis failed)."""
    for lang, entry in summary["per_language"].items():
        entry["n_runaways"] = sum(h.runaway for h in dec.hyps if h.lang == lang)
    summary["overall"]["n_runaways"] = len(dec.runaways)
    summary["overall"]["n_fallbacks"] = dec.n_fallbacks
    summary["overall"]["fallback_reasons"] = dec.fallback_counts()
    summary["runaway_utts"] = [h.utt_id for h in dec.runaways]


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dqwhisper decode",
        description=__doc__.split("\n\n")[0],
        epilog="example: python inference.py base exp/jp_demo decode.beam_size=5",
    )
    p.add_argument("model", help="Whisper size the checkpoint belongs to, e.g. base")
    p.add_argument("target", help="experiment dir or checkpoint file")
    p.add_argument("overrides", nargs="*", help="key=value (Hydra syntax), e.g. decode.test_sets=[data/demo/test]")
    args = p.parse_args(argv)
    run(args.model, args.target, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
