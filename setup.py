from setuptools import find_packages, setup

setup(
    name="dqwhisper",
    version="0.1.0",
    description="DQ-Whisper: joint distillation and quantization of multilingual Whisper",
    packages=find_packages(include=["dqwhisper", "dqwhisper.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch", "torchaudio", "openai-whisper", "hydra-core", "omegaconf", "sentencepiece", "jiwer",
        "tensorboard", "soundfile", "tqdm", "faster-whisper",  # faster-whisper: Silero VAD for transcribe
    ],
    extras_require={  # optional runtimes: dqwhisper.interop (export-hf, export-ggml); the core needs neither
        "hf": ["transformers==5.23.0", "safetensors==0.8.0"],
        "ggml": ["pywhispercpp==1.5.1", "gguf==0.19.0"],
    },
)
