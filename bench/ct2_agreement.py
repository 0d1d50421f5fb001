"""Our greedy transcripts vs faster-whisper's on our CT2 export of the same model, and both decoding speeds.

    python bench/ct2_agreement.py MODEL CT2_DIR --lang ja WAV [WAV ...] [--mode int8|dequant] [--json OUT]

MODEL: a checkpoint (.pt) or export (.dqw, loaded in --mode). Both sides: greedy, language forced, no timestamps,
temperature 0, one utterance at a time, full 30 s window (faster-whisper pads to 30 s). Agreement = exact match of
the decoded text. Time = wall seconds over all files (audio loading excluded), 2 threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import whisper


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("ct2_dir")
    p.add_argument("wavs", nargs="+")
    p.add_argument("--lang", required=True)
    p.add_argument("--mode", default="int8", choices=["int8", "dequant"])
    p.add_argument("--compute-type", default="int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from faster_whisper import WhisperModel

    from dqwhisper.models.load import load_model

    model = load_model(args.model, export_mode=args.mode)
    fw = WhisperModel(args.ct2_dir, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads)
    audios = [whisper.load_audio(w) for w in args.wavs]
    opts = whisper.DecodingOptions(language=args.lang, without_timestamps=True, fp16=False, temperature=0.0)
    ours, theirs = [], []
    t = time.perf_counter()
    for a in audios:
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(a), model.dims.n_mels)
        ours.append(whisper.decode(model, mel, opts).text.strip())
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    for a in audios:
        segs, _ = fw.transcribe(
            a,
            language=args.lang,
            beam_size=1,
            best_of=1,
            temperature=0.0,
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        theirs.append("".join(s.text for s in segs).strip())
    t_fw = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(ours, theirs))
    result = {
        "n": len(audios),
        "agree": agree,
        "agreement": agree / len(audios),
        "ours_s": t_ours,
        "faster_whisper_s": t_fw,
        "audio_s": sum(len(a) for a in audios) / 16000,
        "pairs": [{"wav": w, "ours": a, "faster_whisper": b} for w, a, b in zip(args.wavs, ours, theirs)],
    }
    for pair in result["pairs"]:
        mark = "=" if pair["ours"] == pair["faster_whisper"] else "!"
        print(f"{mark} {Path(pair['wav']).name}\n  ours: {pair['ours']}\n  fw:   {pair['faster_whisper']}")
    print({k: v for k, v in result.items() if k != "pairs"})
    if args.json:
        Path(args.json).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
