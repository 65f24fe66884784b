"""Building and loading the packed-weight kernel (packed.cpp) once per machine.

The kernel is compiled for the CPU it runs on (-march=native) with PyTorch's extension builder
(a C++ compiler and ninja), on first use, into the cache dir; later starts load the built
library in well under a second. Where it cannot be built, `load_kernel` logs why and returns
None, and the model stays dense.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Protocol

import platformdirs
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("packed.cpp")
# -fopenmp: at::parallel_for splits rows over torch's threads only in code built with OpenMP.
# "native" is what serving builds; the others are what other CPUs get (AVX-512 without VNNI,
# AVX2, neither), which the tests build too, to check them here.
FLAGS = {
    "native": ["-O3", "-march=native", "-fopenmp"],
    "avx512": ["-O3", "-march=x86-64-v4", "-fopenmp"],  # AVX-512 without VNNI (e.g. Skylake-X)
    "avx2": ["-O3", "-march=x86-64", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
    "portable": ["-O2", "-march=x86-64", "-fopenmp"],
}

_lock = threading.Lock()
_loaded: dict[str, PackedKernel | None] = {}


class PackedKernel(Protocol):
    def q4_linear(
        self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor: ...
    def q8_linear(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor: ...
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...
    def simd(self) -> str: ...
    def DecodeLayer(self, *args: object) -> DecodeLayerKernel: ...


class DecodeLayerKernel(Protocol):
    def attention_in(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]: ...
    def attention_out(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor: ...


def cache_root() -> Path:
    env = os.environ.get("MEMSERVE_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("memserve"))


def build_key(flags: list[str]) -> str:
    """What the built library depends on: the source, the flags, torch, and this CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    digest.update(platform.machine().encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def load_kernel(cache_dir: Path | None = None, *, variant: str = "native") -> PackedKernel | None:
    """The built kernel, building it on first use; None (and a logged reason) if it cannot be.
    `variant`: "native" (this CPU's best), or "avx2" / "portable", as other CPUs build it."""
    flags = FLAGS[variant]
    key = build_key(flags)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        _loaded[key] = kernel = _build(key, flags, (cache_dir or cache_root()) / "kernels" / key)
        return kernel


def _build(key: str, flags: list[str], directory: Path) -> PackedKernel | None:
    _put_ninja_on_path()
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        log.warning("packed weights off: no %s here (the kernel is built on first use)", " or ".join(missing))
        return None
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    fresh = not any(directory.glob("*.so"))
    if fresh:
        log.info("building the packed-weight kernel for this CPU (first start only, about a minute)")
    started = time.perf_counter()
    try:
        module = load(
            name=f"memserve_packed_{key}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as exc:  # a compiler error, a missing header: serve dense, say why
        log.warning("packed weights off: the kernel did not build in %s: %s", directory, exc)
        return None
    if fresh:
        log.info("packed-weight kernel built in %.0f s (%s)", time.perf_counter() - started, module.simd())
    return module


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the `ninja` package's binary is there only in an activated
    virtualenv."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
