"""vllm-slora's worker classes, selected through `parallel_config.worker_cls`.

One mixin over vLLM's platform workers (CPU and CUDA), so every executor that builds
workers from `worker_cls` (mp, Ray, uniproc) runs them. The worker's one job beyond
stock is to give its model runner the paged-LoRA behaviour right after creating it
(vllm_slora/paged/runner.py); everything per step happens in the runner, because the
legacy Ray DAG calls the runner's execute_model without going through the worker.
"""

from __future__ import annotations

from vllm_slora import trace
from vllm_slora.compat import cpu_worker_cls, gpu_worker_cls, logger
from vllm_slora.config import SLoRAConfig
from vllm_slora.paged.runner import install_runner_mixin
from vllm_slora.patches import apply_patches
from vllm_slora.patches.patch_cpu_gemm import keep_dense_linear_weights

FINETUNE_DISABLED = (
    "training on the engine's weights needs the dense base weights kept: start the engine "
    "with slora.finetune=true (--additional-config '{\"slora\": {\"finetune\": true}}')"
)


class SLoRAWorkerMixin:
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.slora_config = SLoRAConfig.from_additional_config(vllm_config.additional_config)
        if self._slora_finetune:
            # Before load_model: the CPU backend must keep the dense linear weights.
            apply_patches("slora_finetune")
        trace.record("worker_init", cls=type(self).__name__, rank=getattr(self, "rank", None))

    @property
    def _slora_finetune(self) -> bool:
        return self.slora_config is not None and self.slora_config.finetune

    def load_model(self, *args, **kwargs) -> None:
        with keep_dense_linear_weights(self._slora_finetune):
            return super().load_model(*args, **kwargs)

    def determine_available_memory(self) -> int:
        """KV cache bytes: vLLM's figure, less what co-served training will take later
        (finetune/memory.py), unless the operator gave the KV cache size explicitly."""
        available = super().determine_available_memory()
        if not self._slora_finetune:
            return available
        reserve = self.slora_training_reserve_bytes()
        if self.cache_config.kv_cache_memory_bytes is not None:
            logger.info("vllm-slora: --kv-cache-memory-bytes is explicit; co-served training takes up to "
                        "%.0f MiB on top of it", reserve / 2**20)
            return available
        if available - reserve <= 0:
            raise ValueError(
                f"vllm-slora: co-served training needs {reserve / 2**20:.0f} MiB kept out of the KV cache "
                f"(one job's state at --max-lora-rank, a loss unit, a micro-batch's activations up to "
                f"--max-model-len tokens for each of slora.finetune_max_jobs={self.slora_config.finetune_max_jobs} "
                f"jobs and, on GPU, slora.finetune_activation_mb="
                f"{self.slora_config.finetune_activation_mb}) but only {available / 2**20:.0f} MiB are left "
                "for the KV cache: lower --max-lora-rank, --max-model-len, slora.finetune_max_jobs or "
                "slora.finetune_activation_mb, "
                "or give the engine more memory"
            )
        logger.info("vllm-slora: %.0f MiB kept out of the KV cache for co-served training (%.0f MiB left for it)",
                    reserve / 2**20, (available - reserve) / 2**20)
        return available - reserve

    def slora_training_reserve_bytes(self) -> int:
        from vllm_slora.finetune.memory import training_reserve_bytes
        from vllm_slora.finetune.model_config import DecoderConfig
        from vllm_slora.pool.training_loan import graphs_borrow_pool_blocks

        model_config = self.vllm_config.model_config
        config = DecoderConfig.from_hf(model_config.hf_config.to_dict())
        lora_config = self.vllm_config.lora_config
        max_rank = lora_config.max_lora_rank if lora_config is not None else 0
        return training_reserve_bytes(config, max_rank, self.slora_config.finetune_activation_mb << 20,
                                      model_config.max_model_len, graphs_lent=graphs_borrow_pool_blocks(),
                                      max_jobs=self.slora_config.finetune_max_jobs)

    def init_device(self) -> None:
        super().init_device()  # creates self.model_runner; load_model comes later
        if self.slora_config is not None:
            install_runner_mixin(self.model_runner, self.slora_config)
            trace.record("runner_hooked", cls=type(self.model_runner).__name__)

    def slora_info(self) -> dict:
        """RPC target (`collective_rpc("slora_info")`): what this worker runs."""
        return {
            "worker_cls": type(self).__name__,
            "rank": self.rank,
            "slora_config": self.slora_config.__dict__ if self.slora_config else None,
            "adapters": self._slora_adapters(),
            "host_cache": self._slora_host_cache_stats(),
        }

    def slora_training_logits(self, token_ids: list[int], adapter_dir: str | None = None) -> list[list[float]]:
        """RPC target: the training forward's logits ([len(token_ids)][vocab]) for one sequence.

        Runs vllm_slora.finetune's functional forward on views of this worker's own model
        parameters (no copy: checked by data_ptr) plus, if given, the PEFT adapter at
        `adapter_dir` as trainable LoRA parameters. Tensor parallel size 1 only (the
        forward refuses shards). Needs slora.finetune=true (the CPU backend drops the dense
        linear weights otherwise).
        """
        import torch

        from vllm_slora.finetune.coserve_worker import engine_base_weights
        from vllm_slora.finetune.forward import forward_logits
        from vllm_slora.finetune.lora_params import LoraParams

        if not self._slora_finetune:
            raise RuntimeError(FINETUNE_DISABLED)
        base = engine_base_weights(self.model_runner.model)  # views, checked by data_ptr
        lora = None if adapter_dir is None else LoraParams.from_peft_dir(adapter_dir, base.config, dtype=base.dtype)
        ids = torch.tensor(token_ids, dtype=torch.long, device=base.embed_tokens.device)
        # Workers may run under inference mode; the forward is the training one (autograd-capable
        # tensors), only no gradient is taken here.
        with torch.inference_mode(False), torch.no_grad():
            logits = forward_logits(base, lora, ids)
        return logits.float().cpu().tolist()

    def _slora_host_cache_stats(self) -> dict:
        manager = getattr(self.model_runner, "slora", None)
        cache = manager.host_cache if manager is not None else None
        if cache is None:
            return {}
        return {"hits": cache.hits, "misses": cache.misses, "warmed": cache.warmed, "bytes": cache.nbytes,
                "entries": len(cache)}

    def _slora_adapters(self) -> dict[int, dict]:
        """Per resident adapter on this rank: its blocks and the bytes of its shard."""
        manager = getattr(self.model_runner, "slora", None)
        if manager is None or manager.host_cache is None:
            return {}
        found = {}
        for lora_int_id, resident in manager.resident.items():
            name, path, version = manager.known[lora_int_id]
            packed = manager.host_cache.get(name, path, version)
            found[lora_int_id] = {
                "name": name,
                "block_ids": list(resident.block_ids),
                # Weight elements of this rank's shard, and the page bytes they fill.
                "shard_elements": packed.spec.num_elements(manager.tp_size, manager.tp_rank),
                "packed_pages": packed.num_pages,
                "page_bytes": manager.page_elems * manager.dtype.itemsize,
            }
        return found


class SLoRACPUWorker(SLoRAWorkerMixin, cpu_worker_cls()):
    pass


class SLoRAGPUWorker(SLoRAWorkerMixin, gpu_worker_cls()):
    pass
