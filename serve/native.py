"""This project's int8 library (serve/int8_kernel.cpp): Int8Linear's whole forward pass in one C++ call, with an
int8 kernel of its own for the few rows of a decoding step and fbgemm's for more, built at first use with the
machine's C++ compiler against the installed torch, cached on disk, and loaded as torch.ops.shakespeare_native.

Every path computes bit for bit what Int8Linear's torch operations around fbgemm compute (the same quantised
input, an exact integer sum, the same float roundings after it): serving switches to the library the moment it
loads, between two tokens of an answer, and no token changes. Where it cannot be built (no compiler, a CPU
without AVX2 and FMA), Int8Linear keeps the torch operations and one log line says why.

The build takes about 10 s on 2 cores and runs on a thread of its own (start()), so nothing waits for it; the
library is kept in cache_dir(), named by the source, torch and the flags, so a later start loads it in
milliseconds, without a compiler.
The library also has a decoding step's attention (torch.ops.shakespeare_native.attend, model.gpt.Attend): each
row over its own positions only, every (row, head) a task of its own; the compiled step uses it once loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from model.device import capabilities

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_kernel.cpp")
SIMD = {"avx512_vnni": 2, "avx2": 1}  # the kernel's paths, by the CPU feature each needs
TILE, GROUP = 16, 4  # output rows and inputs per packed tile (int8_kernel.cpp's kTile, kGroup)
# the most rows a call may have to take the kernel, per path; calls with more (prompt chunks, big batches) go to
# fbgemm, which is faster there and gives the same bits (measured by bench/int8_kernel.py)
MOST_ROWS = {2: 8, 1: 4}


class _Build:
    """The library's state in this process: built and loaded once, by whichever caller comes first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # starting the thread
        self.loading = threading.Lock()  # building and loading
        self.failed: str | None = None
        self.path: int | None = None  # the path calls take once loaded (simd() then)
        self.thread: threading.Thread | None = None


_BUILD = _Build()


def simd() -> int | None:
    """The kernel path for this CPU (capabilities().simd), as int8_kernel.cpp numbers it, or None for none."""
    return SIMD.get(capabilities().simd or "")


def ready() -> bool:
    """Whether the library is loaded (Int8Linear then runs through it)."""
    return _BUILD.path is not None


def failure() -> str | None:
    """Why the kernel could not be built or loaded, once that was tried and failed."""
    return _BUILD.failed


def start() -> threading.Thread | None:
    """Build or load the kernel on a thread of its own (once per process); None where this CPU has no path."""
    with _BUILD.lock:
        if _BUILD.thread is None and simd() is not None:
            _BUILD.thread = threading.Thread(target=load, name="build-int8-kernel", daemon=True)
            _BUILD.thread.start()
        return _BUILD.thread


def load() -> bool:
    """Build (or find cached) and load the library on this thread; True once torch.ops.shakespeare_native is
    callable, False (with one log line, once) where it cannot be."""
    with _BUILD.loading:  # the background build and a caller that waits for it: one loads, the other sees it
        if _BUILD.path is None and _BUILD.failed is None and simd() is not None:
            _load()
        return _BUILD.path is not None


def _load() -> None:
    try:
        torch.ops.load_library(str(_library()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _BUILD.failed = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        log.warning("own int8 kernel unavailable, int8 layers stay on fbgemm (%s)", _BUILD.failed)
        return
    path = simd()
    torch.ops.shakespeare_native.configure(path, MOST_ROWS[path])
    torch.library.register_fake("shakespeare_native::linear")(_linear_shape)  # for a compiled graph's tracing
    torch.library.register_fake("shakespeare_native::attend")(_attend_shape)
    _BUILD.path = path  # last: Int8Linear takes the library from here on
    log.info("int8 layers use this project's kernel (%s) for up to %d rows", capabilities().simd, MOST_ROWS[path])


def _linear_shape(x: torch.Tensor, layer: int, out_features: int, path: int = -1, with_bias: bool = True):
    return x.new_empty(*x.shape[:-1], out_features)


def _attend_shape(q: torch.Tensor, keys, values, slots, positions, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def cache_dir() -> Path:
    """Where built kernels are kept: the first writable of $SHAKESPEARE_CACHE, $XDG_CACHE_HOME/shakespeare-gpt,
    ~/.cache/shakespeare-gpt, else a temporary folder (a Space's disk does not outlive a restart, so each
    restart there builds once more)."""
    candidates = []
    if os.environ.get("SHAKESPEARE_CACHE"):
        candidates.append(Path(os.environ["SHAKESPEARE_CACHE"]))
    candidates.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shakespeare-gpt")
    candidates.append(Path(tempfile.gettempdir()) / f"shakespeare-gpt-{os.getuid()}")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError("no writable folder for the built kernel: set SHAKESPEARE_CACHE to one")


def _library() -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers, serial without it; the library then needs
    # libgomp.so.1, which the loader finds already loaded by torch, so both share torch's one thread pool
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w"]
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
    flags += [f"-I{path}" for path in include_paths()] + [f"-L{path}" for path in library_paths()]
    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, " ".join(flags), sysconfig.get_platform()):
        key.update(part.encode())
    target = cache_dir() / f"int8_kernel-{key.hexdigest()[:16]}.so"
    if target.exists():  # built before, by any compiler: the source and torch are what it depends on
        return target
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler found (install g++, or set CXX)")
    partial = target.with_suffix(f".{os.getpid()}.tmp")  # renamed once whole: a crash leaves no broken library
    command = [compiler, *flags, str(SOURCE), "-o", str(partial), "-lc10", "-ltorch_cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = done.stderr.strip().splitlines() or ["?"]
        first_error = next((line for line in lines if "error" in line), lines[-1])
        raise OSError(f"compiling {SOURCE.name} failed: {first_error.strip()}")
    partial.replace(target)
    log.info("built the int8 kernel into %s", target)
    return target


class PackedInt8:
    """An int8 weight [N, K] (one scale per row) and its bias in the kernel's layout: unsigned (w + 128), in tiles
    of 16 rows x 4 inputs, the bias padded to whole tiles."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, input_scale: float):
        n, k = weight.shape
        n_pad, k_pad = -(-n // TILE) * TILE, -(-k // GROUP) * GROUP
        padded = torch.zeros(n_pad, k_pad, dtype=torch.int16)
        padded[:n, :k] = weight
        tiles = (padded + 128).to(torch.uint8).view(n_pad // TILE, TILE, k_pad // GROUP, GROUP)
        self.weight = tiles.transpose(1, 2).contiguous()
        self.n, self.input_scale = n, input_scale
        self.bias = None if bias is None else torch.cat([bias.float(), bias.new_zeros(n_pad - n, dtype=torch.float32)])
        # fbgemm's order: the input scale times each row's scale, in fp32, then times the integer sum
        self.multipliers = torch.zeros(n_pad, dtype=torch.float32)
        self.multipliers[:n] = torch.tensor(input_scale, dtype=torch.float32) * scales.float()

    def register(self, fbgemm) -> int:
        """This layer's number in the library, with fbgemm's packed weights beside these (once loaded)."""
        op = torch.ops.shakespeare_native.register_layer
        return op(fbgemm, self.weight, self.multipliers, self.bias, self.n, self.input_scale)
