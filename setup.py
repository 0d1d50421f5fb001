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
)
