"""Run a whisper.cpp model file through pywhispercpp's bindings (the `ggml` extra), decoded as our decoder does:
greedy, temperature 0 without fallback, no timestamps, language forced, openai-whisper's non-speech suppression.

Two inputs: `decode_pcm` lets whisper.cpp make the log-mel itself (what its users run: the audio followed by the
log-mel of 30 s of silence), `decode_mel` feeds our own log-mel (`whisper_set_mel`; frames after the audio are
zeros in the encoder window, as in training), so the model export is compared without the feature difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dqwhisper.utils import DQWhisperError


class WhisperCpp:
    def __init__(self, path: str | Path, n_threads: int = 1, flash_attn: bool | None = None):
        """flash_attn: whisper.cpp's flash attention; None: off unless the audio window is a multiple of 256
        positions. whisper.cpp's flash-attention graphs attend over the window padded to a multiple of 256 with
        no mask (encoder self-attention and decoder cross-attention): the padding's zero keys take softmax weight,
        which at the demo's 8 s window (400 -> 512) flips greedy tokens (demo teacher f16, our log-mel: our tokens on
        21 of 40 utterances with it, 40 of 40 without)."""
        try:
            import _pywhispercpp as pw
        except ImportError as e:
            raise DQWhisperError("running whisper.cpp needs the 'ggml' extra (pip install -e .[ggml])") from e
        self.pw = pw
        self.path = Path(path)
        if not self.path.is_file():
            raise DQWhisperError(f"whisper.cpp model {self.path} does not exist")
        sidecar = Path(str(self.path) + ".json")
        self.audio_ctx = json.loads(sidecar.read_text()).get("audio_ctx", 0) if sidecar.is_file() else 0
        cparams = pw.whisper_context_default_params()
        if flash_attn is None:
            flash_attn = (self.audio_ctx or pw.WHISPER_CHUNK_SIZE * 50) % 256 == 0 and bool(cparams.flash_attn)
        cparams.flash_attn = flash_attn
        self.flash_attn = bool(cparams.flash_attn)
        self.ctx = pw.whisper_init_from_file_with_params(str(self.path), cparams)
        if self.ctx is None:
            raise DQWhisperError(f"whisper.cpp could not load {self.path}")
        self.n_threads = n_threads
        self.n_mels = pw.whisper_model_n_mels(self.ctx)
        self.eot = pw.whisper_token_eot(self.ctx)

    def _params(self, language: str, audio_ctx: int | None, max_tokens: int):
        pw = self.pw
        p = pw.whisper_full_default_params(pw.whisper_sampling_strategy.WHISPER_SAMPLING_GREEDY)
        p.n_threads = self.n_threads
        p.language = language
        p.translate = False
        p.no_timestamps = True
        p.single_segment = True
        p.no_context = True
        p.temperature = 0.0
        p.temperature_inc = 0.0  # no fallback: one greedy pass, as ours
        p.suppress_blank = True
        p.suppress_nst = True  # openai-whisper's default "-1" suppression of non-speech symbols
        p.no_speech_thold = 1.0  # never drop a segment as "no speech" (ours does not)
        p.max_tokens = max_tokens
        p.audio_ctx = self.audio_ctx if audio_ctx is None else audio_ctx
        p.print_progress = False
        p.print_realtime = False
        return p

    def _tokens(self) -> list[int]:
        pw = self.pw
        out = []
        for seg in range(pw.whisper_full_n_segments(self.ctx)):
            for i in range(pw.whisper_full_n_tokens(self.ctx, seg)):
                t = pw.whisper_full_get_token_id(self.ctx, seg, i)
                if t < self.eot:
                    out.append(int(t))
        return out

    def decode_pcm(
        self, audio: np.ndarray, language: str, audio_ctx: int | None = None, max_tokens: int = 0
    ) -> list[int]:
        """16 kHz float32 audio -> text token ids (whisper.cpp's own log-mel)."""
        a = np.ascontiguousarray(audio, dtype=np.float32)
        rc = self.pw.whisper_full(self.ctx, self._params(language, audio_ctx, max_tokens), a, len(a))
        if rc != 0:
            raise DQWhisperError(f"whisper.cpp ({self.path}) failed with code {rc}")
        return self._tokens()

    def decode_mel(
        self, mel: np.ndarray, language: str, audio_ctx: int | None = None, max_tokens: int = 0
    ) -> list[int]:
        """Our log-mel (n_mels, audio frames), without the window's zero padding -> text token ids."""
        m = np.ascontiguousarray(mel, dtype=np.float32)
        if m.shape[0] != self.n_mels:
            raise DQWhisperError(f"mel has {m.shape[0]} bands, {self.path} expects {self.n_mels}")
        rc = self.pw.whisper_set_mel(self.ctx, m.reshape(-1), m.shape[1], m.shape[0])
        if rc != 0:
            raise DQWhisperError(f"whisper.cpp ({self.path}) refused the mel (code {rc})")
        rc = self.pw.whisper_full(self.ctx, self._params(language, audio_ctx, max_tokens), np.zeros(0, np.float32), 0)
        if rc != 0:
            raise DQWhisperError(f"whisper.cpp ({self.path}) failed with code {rc}")
        return self._tokens()

    def close(self) -> None:
        if self.ctx is not None:
            self.pw.whisper_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
