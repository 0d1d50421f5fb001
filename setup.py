from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dqwhisper",
    version="0.1.0",
    description="DQ-Whisper: joint distillation and quantization of multilingual Whisper",
    packages=find_packages(include=["dqwhisper", "dqwhisper.*"]),
    package_data={"dqwhisper": ["conf/*.yaml", "conf/*/*.yaml"]},  # dqwhisper/conf -> ../conf in the repository
    python_requires=">=3.11,<3.12",  # what is tested (3.11, requirements.txt)
    install_requires=[
        "torch",
        "torchaudio",
        "torchcodec",
        "openai-whisper",
        "hydra-core",
        "omegaconf",
        "sentencepiece",
        "jiwer",
        "tensorboard",
        "soundfile",
        "tqdm",
        "numpy",
        "matplotlib",
        "ctranslate2",
        "faster-whisper",  # Silero VAD for transcribe
    ],
    extras_require={  # optional runtimes: dqwhisper.interop (export-hf, export-ggml); the core needs neither
        "hf": ["transformers==5.23.0", "safetensors==0.8.0"],
        "ggml": ["pywhispercpp==1.5.1", "gguf==0.19.0"],
        "demo": [
            line
            for line in (Path(__file__).parent / "requirements-demo.txt").read_text().splitlines()
            if line and not line.startswith("#")
        ],
    },
    entry_points={"console_scripts": ["dqwhisper = dqwhisper.cli:main"]},
)
