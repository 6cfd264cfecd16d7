"""The facts a sidecar records about where and from what a run came: the machine (CPU, GPU, the
numerics switches, the environment variables that move timings), the software and the code (git
sha and dirty flag, the command line), and UTC times and run ids. Only reads; writes nothing."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional



def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_sha() -> str:
    return _git("rev-parse", "HEAD")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """A file-name-safe UTC time, e.g. ``20260101T120000Z`` (default output names)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def new_run_id(sha: Optional[str] = None) -> str:
    """``<UTC stamp>-<short sha>``: what ties a run's rows together."""
    sha = git_sha() if sha is None else sha
    return f"{utc_stamp()}-{sha[:7]}" if sha else utc_stamp()


_PERF_ENV_PREFIXES = ("MALLOC_", "LD_PRELOAD", "OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "TORCH_", "THP_", "C10_",
                      "PYTORCH_", "CUDA_", "CUBLAS_", "CUDNN_", "NCCL_", "NVIDIA_TF32", "TRITON_")


def numerics() -> dict:
    """The switches that change what a GPU matmul or attention computes and how fast: TF32, the
    fp32 matmul precision, and which SDPA backends torch may pick."""
    import torch

    b = torch.backends
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": b.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": b.cudnn.allow_tf32,
        "cuda_matmul_allow_bf16_reduced_precision_reduction": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cuda_matmul_allow_fp16_reduced_precision_reduction": b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "sdpa_flash_enabled": b.cuda.flash_sdp_enabled(),
        "sdpa_mem_efficient_enabled": b.cuda.mem_efficient_sdp_enabled(),
        "sdpa_math_enabled": b.cuda.math_sdp_enabled(),
        "sdpa_cudnn_enabled": b.cuda.cudnn_sdp_enabled(),
    }


def gpu() -> Optional[dict]:
    """The GPU this process sees (None without CUDA): name, capability, memory, driver and CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    driver = None
    try:  # the driver version is not exposed by torch; nvidia-smi ships with every driver
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count(),
            "driver_version": driver, "cuda_runtime": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version()}


def machine() -> dict:
    """The facts about this machine and its software that move timings: what a row measured on
    another node of a cluster needs beside it (``compare --executor ray`` records one per ``host``)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_model(),
        "gpu": gpu(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "numerics": numerics(),
        # settings outside the command line that change timings (allocator, thread pools, CUDA, compiler)
        "perf_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_PERF_ENV_PREFIXES)},
    }


def environment() -> dict:
    """Software, machine and code facts for the sidecar."""
    sha = git_sha()
    env = machine()
    from evals.registry import plugins_in_use

    env.update({
        "plugins": plugins_in_use(),
        "git_sha": sha or None,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if sha else None,
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
    })
    return env
