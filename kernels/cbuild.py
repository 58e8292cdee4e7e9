"""Compile a C or CUDA kernel of this package at first use and load it with ctypes (the analogue of Triton's JIT).

A kernel is specialized by preprocessor constants (e.g. the LoRA rank and the element type), compiled — a ``.c``
source with the system's C compiler (``$CC`` when set, and then only it; else ``cc``/``gcc``/``clang``) for the
host CPU (``-O3 -march=native``), a ``.cu`` source with ``nvcc`` (``$NVCC`` when set, and then only it; else on
``PATH``, under ``$CUDA_HOME`` or ``/usr/local/cuda``) for one GPU architecture — and cached as a shared library
under ``$FEDPRIV_KERNEL_CACHE`` (default
``~/.cache/fedpriv/kernels``), keyed by a hash of the source, the constants, the flags, the compiler binary and
the CPU's feature flags — so a later process, e.g. a SuperNode's next ClientApp, loads it in about a
millisecond. Several processes may build the same library at once: each writes its own temporary file and
renames it into place.

Where no compiler works (or the cache cannot be written) :func:`load` returns ``None`` and the reason, and
callers fall back to their torch implementation. This module imports the standard library only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "load"]

FLAGS = ("-O3", "-march=native", "-mtune=generic", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared",
         "-std=c11")  # -mtune=generic: gcc 12 takes this VM's EPYC for Zen 1 and splits 256-bit accesses (7 % slower)
CUDA_FLAGS = ("-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17")  # + -gencode for the device's architecture
HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FEDPRIV_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/fedpriv/kernels``."""
    env = os.environ.get("FEDPRIV_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedpriv" / "kernels"


def _compiler() -> tuple[str | None, str]:
    """The C compiler to use and ``""``, or None and why not. ``$CC``, when set, is the only candidate (as for
    make): a typo there must not silently build with another compiler."""
    chosen = os.environ.get("CC", "").strip()
    if chosen:
        if shutil.which(shlex.split(chosen)[0]):
            return chosen, ""
        return None, f"CC={chosen!r} is not an executable on PATH (unset CC to use cc, gcc or clang)"
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name, ""
    return None, "no C compiler found (set CC, or install gcc)"


def _nvcc() -> tuple[str | None, str]:
    """nvcc and ``""``, or None and why not. ``$NVCC``, when set, is the only candidate."""
    chosen = os.environ.get("NVCC", "").strip()
    if chosen:
        if shutil.which(shlex.split(chosen)[0]):
            return chosen, ""
        return None, f"NVCC={chosen!r} is not an executable on PATH (unset NVCC to look for nvcc)"
    found = shutil.which("nvcc")
    if found:
        return found, ""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return str(Path(home) / "bin" / "nvcc"), ""
    return None, "nvcc not found (install the CUDA toolkit, or set NVCC or CUDA_HOME)"


@functools.cache
def _fingerprint(compiler: str) -> str:
    """The compiler binary and the CPU's features (a library built with -march=native is only valid on the same
    kind of CPU). The compiler is identified by its resolved path, size and mtime — an upgrade changes them —
    rather than by running it: a SuperNode starts a process per message, and this runs in each one."""
    try:
        exe = os.path.realpath(shutil.which(shlex.split(compiler)[0]) or compiler)
        st = os.stat(exe)
        version = f"{compiler}:{exe}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        version = compiler
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        cpu = platform.processor()
    return f"{version}|{cpu}|{platform.machine()}|{platform.system()}"


@functools.cache
def load(source: str, defines: tuple[tuple[str, str], ...], arch: str = "") -> tuple[ctypes.CDLL | None, str]:
    """Compile (or find in the cache) kernel ``source`` (a file name in this package) with ``-D`` ``defines``.

    ``arch``: for a ``.cu`` source, the GPU's compute capability as digits (``"90"`` for sm_90).

    Returns
    -------
    (library, reason)
        The loaded library and ``""``, or ``None`` and why it could not be built (for a log line).
    """
    cuda = source.endswith(".cu")
    compiler, why = _nvcc() if cuda else _compiler()
    if compiler is None:
        return None, why
    path = HERE / source
    try:
        text = path.read_bytes()
    except OSError as exc:
        return None, f"kernel source {path} unreadable: {exc}"
    args = [f"-D{k}={v}" for k, v in defines]
    args += [*CUDA_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"] if cuda else list(FLAGS)
    key = hashlib.sha256(b"\0".join([text, " ".join(args).encode(), _fingerprint(compiler).encode()])).hexdigest()
    target = cache_dir() / f"{path.stem}-{key[:24]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
        except OSError as exc:
            return None, f"kernel cache {target.parent} not writable: {exc}"
        try:
            proc = subprocess.run([*shlex.split(compiler), *args, str(path), "-o", tmp, *([] if cuda else ["-lm"])],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                return None, f"{compiler} failed on {path.name}: {proc.stderr.strip()[-500:]}"
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"{compiler} could not build {path.name}: {exc}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(target)), ""
    except OSError as exc:
        return None, f"could not load {target}: {exc}"
