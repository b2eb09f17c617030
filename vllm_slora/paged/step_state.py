"""What every paged LoRA layer reads during one forward: set once per step, shared."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapter_tables import StepTables
from .ops import PagedLoRAMeta, TokenPlan, plan_tokens


@dataclass
class StepState:
    device: torch.device
    # Per decoder layer: the layer's KV tensor viewed as a flat [num_blocks * page_elems]
    # array of the adapter dtype. Empty until the KV cache exists (profile runs).
    pools: list[torch.Tensor] = field(default_factory=list)
    # int32 [capacity]: adapter row of every token of the step, -1 for none. Persistent
    # and updated in place; entries past the step's tokens are -1, so padded batches
    # (longer than the scheduled tokens) never pick up an adapter.
    token_adapter: torch.Tensor | None = None
    tables: StepTables | None = None
    has_lora: bool = False  # False: layers return the base output untouched
    # The kernels' per-step token grouping (by adapter row), prepared once per step and
    # shared by every layer; sized for `max_adapters` rows.
    meta: PagedLoRAMeta | None = None
    max_adapters: int = 1
    # True: Triton ops on CUDA tensors (slora config kernel_backend auto/triton); False: the
    # torch path everywhere (kernel_backend=torch, e.g. to compare or to debug).
    use_triton: bool = True
    # CPU path: the meta's grouping as host-side spans, built once per prepare.
    _plan: TokenPlan | None = None
    _plan_tokens: int = -1

    def ensure_capacity(self, num_tokens: int) -> None:
        if self.token_adapter is None or self.token_adapter.numel() < num_tokens:
            grown = torch.full((num_tokens,), -1, dtype=torch.int32, device=self.device)
            if self.token_adapter is not None:  # keep the current step's mapping
                grown[: self.token_adapter.numel()] = self.token_adapter
            self.token_adapter = grown

    def tokens(self, num_tokens: int) -> torch.Tensor:
        """int32 [num_tokens] view of the token->adapter-row map."""
        self.ensure_capacity(num_tokens)
        return self.token_adapter[:num_tokens]

    def prepared_meta(self, num_tokens: int, num_adapters: int | None = None) -> PagedLoRAMeta:
        """The grouping of the first ``num_tokens`` tokens (recomputed only when stale)."""
        self.ensure_capacity(num_tokens)
        if num_adapters is not None:
            self.max_adapters = max(self.max_adapters, num_adapters)
        meta = self.meta
        if meta is None or meta.max_tokens < self.token_adapter.numel() or meta.max_adapters < self.max_adapters:
            meta = self.meta = PagedLoRAMeta(self.token_adapter.numel(), self.max_adapters, self.device)
            meta.num_tokens = -1  # nothing prepared yet
        if num_adapters is not None or meta.num_tokens != num_tokens:
            meta.prepare(self.token_adapter[:num_tokens])
            self._plan = None
        return meta

    def token_plan(self, num_tokens: int) -> TokenPlan:
        """Host-side grouping of the first ``num_tokens`` tokens (CPU path), once per step."""
        meta = self.prepared_meta(num_tokens)
        if self._plan is None or self._plan_tokens != num_tokens:
            self._plan = plan_tokens(self.token_adapter[:num_tokens], meta.max_adapters, meta.token_order,
                                     meta.adapter_starts)
            self._plan_tokens = num_tokens
        return self._plan

    def clear(self) -> None:
        self.tables = None
        self.has_lora = False
        if self.token_adapter is not None:
            self.token_adapter.fill_(-1)
        if self.meta is not None:
            self.meta.num_tokens = -1  # stale: the next step prepares again
        self._plan = None
