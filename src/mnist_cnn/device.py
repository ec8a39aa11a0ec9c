"""Where and how a run computes: device, precision, threads, seeding.

device = pick_device("auto")                        # cuda when present, else cpu
precision = resolve_precision("auto", device)       # "bf16" only where it is native
with autocast(device, precision): out = model(x)
seed_everything(0, deterministic=True)
with process_settings_kept():                       # a library call leaves torch as it found it
    seed_everything(0, deterministic=True); set_threads(1); ...
"""

from __future__ import annotations

import functools
import os
import platform
import random
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, ParamSpec, TypeVar

import numpy as np
import torch

from mnist_cnn.errors import ConfigError

P = ParamSpec("P")
R = TypeVar("R")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("flags", "model name"), "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(field)), "")
    except OSError:  # not Linux
        return ""
    return line.split(":", 1)[1].strip() if ":" in line else ""


def cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware. Emulated bf16 is slower than fp32, so
    a GPU that only emulates it (torch counts emulation by default) does not qualify."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the training step; the loss is taken in fp32 outside it."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """The one place that seeds python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"  # seed_everything(deterministic=True) sets it for cuBLAS


@contextmanager
def process_settings_kept() -> Iterator[None]:
    """torch's process-wide settings as the caller had them, restored on return and on error (as
    torch.random.fork_rng does for generators): deterministic algorithms (and warn-only), cuDNN's
    benchmark flag, the cuBLAS workspace variable, the thread count, the default dtype and the
    global generators of python, numpy and torch (CPU, and CUDA where it was started)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, workspace = torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_WORKSPACE)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    python_rng, numpy_rng, torch_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)
        else:
            os.environ[CUBLAS_WORKSPACE] = workspace
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def keeps_process_settings(fn: Callable[P, R]) -> Callable[P, R]:
    """fn run inside process_settings_kept(): what the Python API's entry points are wrapped in."""

    @functools.wraps(fn)
    def kept(*args: P.args, **kwargs: P.kwargs) -> R:
        with process_settings_kept():
            return fn(*args, **kwargs)

    return kept


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    """The device's human name: the GPU's, or the CPU model's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpuinfo("model name") or platform.processor() or platform.machine()
