"""torch.compile options shared by training and evaluation: which backends exist, and what inductor needs.

Both are checked before any model loads: torch itself finds an unknown backend, a missing C++ compiler (inductor on
a CPU) or a missing Triton (inductor on a GPU) only at the first compiled call, after loading and encoding.
"""

from __future__ import annotations

import importlib.util

import torch


def check_backend(name: str, option: str = "compile") -> None:
    """Raises ValueError unless `name` is "" (no compiling) or a torch.compile backend."""
    if name and name not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"{option} must be a torch.compile backend ({', '.join(torch.compiler.list_backends())}; "
                         f"'' for none), found {name!r}")  # fmt: skip


def check_requirements(name: str, device_type: str) -> None:
    """Raises ValueError if backend `name` cannot compile on `device_type` ("cpu", "cuda") on this machine."""
    if name != "inductor":
        return
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--compile inductor on a GPU needs Triton (pip install triton); found it not installed")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: leave the check to torch
        return
    try:
        get_cpp_compiler()
    except RuntimeError as error:
        raise ValueError(f"--compile inductor on a CPU needs a C++ compiler (g++ or clang++ on PATH, or "
                         f"torch._inductor.config.cpp.cxx); found none ({error})") from error  # fmt: skip
