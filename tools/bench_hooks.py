"""Backend-specific probes for `loopgolf bench`: device sync, the matmul peak in the training dtype,
peak memory and versions. The frameworks are imported only inside the hook for the backend in use."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

def _rss_peak() -> tuple[int, str]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(peak * scale), "ru_maxrss (whole process, since start)"


def _time_matmul(run_once, sync, n: int, seconds: float) -> dict:
    """Time n x n x n products: warm up, pick a repeat count so one sample lasts >= 20 ms, then take samples
    for `seconds` (at least 5). Returns the best and the median FLOP/s."""
    flops = 2.0 * n ** 3
    for _ in range(3):
        run_once()
    sync()
    t0 = time.perf_counter()
    run_once()
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(0.02 / one))
    samples = []
    start, cpu0 = time.perf_counter(), time.process_time()
    while len(samples) < 5 or (time.perf_counter() - start < seconds and len(samples) < 1000):
        t0 = time.perf_counter()
        for _ in range(reps):
            run_once()
        sync()
        samples.append(flops * reps / (time.perf_counter() - t0))
    cpu = time.process_time() - cpu0
    return {"n": n, "flops_per_s": max(samples), "median_flops_per_s": statistics.median(samples),
            "samples": len(samples), "reps_per_sample": reps,
            "flops_per_cpu_s": flops * reps * len(samples) / max(cpu, 1e-9)}


class _TorchHooks:
    def __init__(self, backend):
        import torch

        self.torch, self.device, self.dtype = torch, backend.torch_device, backend.dtype
        self.cuda = self.device.type == "cuda"
        self.on_cpu = not self.cuda
        self.dtype_name = str(self.dtype).split(".")[-1]

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self):
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated(self.device)), "torch.cuda.max_memory_allocated"
        return _rss_peak()

    def matmul_peak(self, n: int, seconds: float) -> dict:
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=self.device).to(self.dtype)
        b = torch.randn(n, n, generator=g, device=self.device).to(self.dtype)
        out = torch.empty(n, n, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            res = _time_matmul(lambda: torch.matmul(a, b, out=out), self.sync, n, seconds)
        return {**res, "dtype": self.dtype_name, "device": str(self.device), "framework": "torch"}

    def versions(self):
        v = {"python": platform.python_version(), "numpy": np.__version__, "torch": self.torch.__version__}
        if self.cuda:
            v["cuda"] = self.torch.version.cuda
            v["gpu"] = self.torch.cuda.get_device_name(self.device)
        return v

    def blas(self):
        return "cuBLAS" if self.cuda else "torch CPU (MKL/oneDNN or OpenBLAS, as built)"

    def threads(self):
        return self.torch.get_num_threads()


class _MLXHooks:
    def __init__(self, backend):
        import mlx.core as mx

        self.mx, self.dtype = mx, backend.dtype
        self.on_cpu = not mx.metal.is_available()
        self.dtype_name = str(self.dtype).split(".")[-1]
        self._mem = getattr(mx, "get_peak_memory", None) or getattr(getattr(mx, "metal", None), "get_peak_memory", None)
        self._reset = getattr(mx, "reset_peak_memory", None) or getattr(getattr(mx, "metal", None), "reset_peak_memory", None)

    def sync(self):
        if hasattr(self.mx, "synchronize"):
            self.mx.synchronize()

    def reset_peak(self):
        if self._reset is not None:
            self._reset()

    def peak_memory(self):
        if self._mem is not None:
            return int(self._mem()), "mx.get_peak_memory (MLX allocations)"
        return _rss_peak()

    def matmul_peak(self, n: int, seconds: float) -> dict:
        mx = self.mx
        key = mx.random.key(0)
        ka, kb = mx.random.split(key)
        a = mx.random.normal((n, n), key=ka).astype(self.dtype)
        b = mx.random.normal((n, n), key=kb).astype(self.dtype)
        mx.eval(a, b)
        res = _time_matmul(lambda: mx.eval(a @ b), self.sync, n, seconds)
        device = "metal" if mx.metal.is_available() else "cpu"
        return {**res, "dtype": self.dtype_name, "device": device, "framework": "mlx"}

    def versions(self):
        return {"python": platform.python_version(), "numpy": np.__version__, "mlx": self.mx.__version__}

    def blas(self):
        if sys.platform == "darwin":
            return "Metal / Accelerate"
        pre = os.environ.get("LD_PRELOAD", "")
        return f"OpenBLAS via LD_PRELOAD ({pre})" if "openblas" in pre else "MLX's bundled reference BLAS (no OpenBLAS preloaded)"

    def threads(self):
        return os.cpu_count()


def hooks_for(backend):
    return _MLXHooks(backend) if backend.name == "mlx" else _TorchHooks(backend)
