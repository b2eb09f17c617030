"""The page-layout module, wherever it is importable from.

Installed, `kernels/` is the subpackage `vllm_slora.kernels`; in a bare checkout (tests
with PYTHONPATH at the repository root) it is the top-level package `kernels`.
"""

try:
    from vllm_slora.kernels.page_layout import (  # noqa: F401
        AdapterPageLayout,
        MatrixSpec,
        dense_pages,
        plan_layout,
    )
except ImportError:  # not installed: running from the repository root
    from kernels.page_layout import (  # noqa: F401
        AdapterPageLayout,
        MatrixSpec,
        dense_pages,
        plan_layout,
    )
