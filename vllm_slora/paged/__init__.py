"""Worker side of unified paging: paged LoRA layers, the pool views they read, the
host cache of page-packed adapters, and the model-runner hook that ties them together.

Flow per step (worker process):
    scheduler plan --> AdapterManager.apply_plan (evict metadata, pack + copy pages)
    token->lora_int_id mapping --> AdapterManager.set_token_mapping (adapter rows, tables)
    forward --> PagedLoRALinear: base(x) + paged shrink/expand for tokens with an adapter
"""
