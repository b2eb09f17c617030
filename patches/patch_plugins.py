"""Serve the OpenAI Files and Fine-tuning endpoints from the slora plugin, with no env var.

The routes (vllm_slora/finetune/api.py) are a vLLM endpoint plugin: `FinetuneEndpointPlugin`
implements vLLM's EndpointPlugin contract (vllm/plugins/endpoint_plugins/interface.py:
`attach_router` during `build_app`, `init_state` during `init_app_state`). But
`vllm.plugins.load_endpoint_plugins` (vllm/plugins/__init__.py:93) loads endpoint plugins
only from the `vllm.endpoint_plugins` entry-point group AND only when `VLLM_PLUGINS` names
them, and `VLLM_PLUGINS` also filters the general plugins: naming only the endpoint
plugin switches vllm-slora off. The one flag (`--additional-config '{"slora": ...}'`)
must be enough.

The wrapper calls the original (plugins the user allowlisted load as before) and adds one
`FinetuneEndpointPlugin` when the server supports "generate" and none is loaded yet. The
plugin is inert for servers without the `slora` key: `attach_router` adds no route and
`init_state` builds nothing. `vllm.plugins` is already imported wherever vLLM calls
`register()`, so applying this costs nothing; the plugin module (FastAPI imports) is
imported only in an API server, when `build_app` asks for endpoint plugins.

Removal: when vLLM loads endpoint plugins without a `VLLM_PLUGINS` allowlist that also
gates general plugins (or lets a general plugin register routes per engine config),
register `FinetuneEndpointPlugin` under `vllm.endpoint_plugins` in setup.py and drop this.
See PATCHES in __init__.
"""

from __future__ import annotations

import functools

_ORIGINAL_ATTR = "_vllm_slora_original"


def apply() -> None:
    from vllm_slora.compat import vllm_plugins

    current = vllm_plugins.load_endpoint_plugins
    if hasattr(current, _ORIGINAL_ATTR):
        return

    @functools.wraps(current)
    def load_endpoint_plugins(supported_tasks=None):
        plugins = current(supported_tasks)
        if supported_tasks is None or "generate" not in supported_tasks:
            return plugins
        from vllm_slora.finetune.api import PLUGIN_NAME, FinetuneEndpointPlugin

        if not any(getattr(plugin, "name", None) == PLUGIN_NAME for plugin in plugins):
            plugins = [*plugins, FinetuneEndpointPlugin()]
        return plugins

    setattr(load_endpoint_plugins, _ORIGINAL_ATTR, current)
    vllm_plugins.load_endpoint_plugins = load_endpoint_plugins
