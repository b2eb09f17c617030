"""Kernel tests run Triton in its interpreter when there is no GPU.

Triton picks interpreted vs compiled when it is imported (its own library functions
are jit-decorated then), so the switch must be set before anything imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
