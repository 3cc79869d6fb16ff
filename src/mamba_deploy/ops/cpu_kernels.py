"""Fast CPU ops: small C kernels compiled on first use with the system C compiler and loaded
through ctypes (no torch headers, so the build takes about a second). Each has its pure-PyTorch
twin in reference.py with the same signature; without a compiler the references are used.

Set MAMBA_DEPLOY_NO_CPU_KERNELS=1 to disable them, and MAMBA_DEPLOY_CPU_ARCH to build them for
another -march than `native` (a portable x86-64-v2 build for a cache shared by several CPUs; the
tests build with x86-64 to run the plain loops that AVX2 machines otherwise never execute).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import reference as ref
from . import torch_fused

_SRCS = [Path(__file__).with_name(f) for f in ("cpu_scan.c", "cpu_step.c", "cpu_decode.c", "cpu_gemv.c")]
_HEADER = Path(__file__).with_name("cpu_common.h")  # included by cpu_step.c, cpu_decode.c, cpu_gemv.c
# Compile with -ffast-math (vectorised expf) but link without it: linking a shared object with
# -ffast-math pulls in crtfastmath.o, which sets flush-to-zero for the whole process at load
# time and silently changes every other library's float math (seen breaking OpenVINO).
_CFLAGS = ["-O3", "-ffast-math", "-fPIC", "-fopenmp"]  # + -march, built where it runs (_march)
_LDFLAGS = ["-shared", "-fopenmp"]
ARCH_ENV = "MAMBA_DEPLOY_CPU_ARCH"  # -march value: native (default), or e.g. x86-64-v2 for a portable build
MAX_D_STATE = 256  # stack buffer in cpu_scan.c
F32 = torch.float32  # every buffer the C code writes (never torch's default dtype, which users can change)


def _cache_dir() -> Path:
    root = os.environ.get("MAMBA_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "mamba_deploy")
    # set without a shell (a Dockerfile ENV, a systemd unit) "~/x" arrives as it is: a folder named ~
    return Path(os.path.expanduser(root))


def _cpu_id() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))})).encode()
    except OSError:
        import platform

        return (platform.machine() + platform.processor()).encode()


def _march() -> str:
    """-march from $MAMBA_DEPLOY_CPU_ARCH; a value that is not a plain architecture name is refused
    (it would reach the compiler's command line)."""
    arch = os.environ.get(ARCH_ENV, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arch):
        raise ConfigError(f"{ARCH_ENV}={arch!r} is not an architecture name; set it to one the C compiler's "
                          "-march takes (native, x86-64, x86-64-v2, x86-64-v3, armv8-a, ...) or unset it")
    return f"-march={arch}"


def simd_level() -> int:
    """What the built C kernels were compiled with: 1 = the explicit AVX2 + FMA loops, 0 = the
    plain loops (left to the compiler's vectoriser), -1 = no C kernels (PyTorch references)."""
    lib = _lib()
    return -1 if lib is None else int(lib.md_simd_level())


def _fallback(why: str) -> None:
    warnings.warn(f"{why}; using the PyTorch reference ops (about 2x slower on CPU)", stacklevel=3)


@functools.lru_cache(maxsize=1)
def _lib():
    if os.environ.get("MAMBA_DEPLOY_NO_CPU_KERNELS", "") not in ("", "0"):  # "0" is off, as for every switch
        return None
    cflags = [*_CFLAGS, _march()]
    # $CC may carry arguments ("ccache gcc", "gcc -std=c11"), as make takes it
    try:
        cc = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    except ValueError as e:  # an unbalanced quote
        _fallback(f"CC={os.environ.get('CC')!r} cannot be split into a command ({e}); fix or unset $CC")
        return None
    if not cc:
        _fallback("no C compiler (cc or gcc on PATH, or $CC) to build the CPU kernels; install one (e.g. "
                  "`apt install gcc`) or set MAMBA_DEPLOY_NO_CPU_KERNELS=1 to silence this")
        return None
    if shutil.which(cc[0]) is None:
        _fallback(f"the C compiler {cc[0]!r} (from $CC) is not found; install it, or fix or unset $CC")
        return None
    try:
        src = b"".join(f.read_bytes() for f in (*_SRCS, _HEADER))  # the header is part of every build
    except OSError as e:
        _fallback(f"the CPU kernel sources are missing from the installed package ({e}); reinstall mamba-deploy")
        return None
    # -march=native: the key includes the CPU, so a shared home folder never loads another CPU's build
    flags = " ".join([*cflags, "|", *_LDFLAGS])
    key = hashlib.sha256(src + flags.encode() + sys.platform.encode() + _cpu_id()).hexdigest()[:16]
    so = _cache_dir() / f"cpu_scan-{key}.so"
    try:
        lib = _load_or_build(cc, cflags, so)
    except subprocess.CalledProcessError as e:
        _fallback(f"could not build the CPU kernels with {' '.join(cc)} ({e} {e.stderr.decode(errors='replace')[:200]})")
        return None
    except (subprocess.SubprocessError, OSError) as e:  # no compiler, an unwritable or noexec cache folder
        _fallback(f"could not build or load the CPU kernels in {so.parent} ({type(e).__name__}: {e}); set "
                  "MAMBA_DEPLOY_CACHE to a writable folder on a file system that allows executables")
        return None
    P, L, F32, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    for name, argtypes in (("selective_scan_f32", [P] * 11 + [L] * 4),
                           ("conv_update_f32", [P] * 6 + [L] * 3 + [ctypes.c_int]),
                           ("selective_update_f32", [P] * 11 + [L] * 3),
                           ("ssd_update_f32", [P] * 8 + [L] * 5 + [F32, F32]),
                           ("rmsnorm_f32", [P] * 3 + [L] * 2 + [F32]),
                           ("mamba1_block_step_f32", [ctypes.POINTER(P)] + [P] * 4 + [L] * 6 + [F32, F32, I, I]),
                           ("mamba2_block_step_f32", [ctypes.POINTER(P)] + [P] * 4 + [L] * 7 + [F32] * 4 + [I, I]),
                           ("lm_head_step_f32", [P] * 5 + [L] * 3 + [F32, I]),  # P 1: a Lin *
                           ("gemv_f32", [P] * 4 + [L] * 3 + [I]),
                           ("int8_gemv_f32", [P] * 4 + [L] * 3 + [I]),
                           ("int4_gemv_f32", [P] * 6 + [L] * 4 + [I])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, argtypes
    lib.md_simd_level.restype, lib.md_simd_level.argtypes = ctypes.c_int, []
    return lib


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread at once)."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def _load_or_build(cc: list[str], cflags: list[str], so: Path):
    """The cached library, built first when absent. A damaged one (cut short by a full disk or a
    crash: loading it would kill the process with SIGBUS, or fail the same way on every run) is
    rebuilt."""
    if so.exists() and not _library_complete(so):
        warnings.warn(f"the cached CPU kernel library {so} is damaged (shorter than its own headers say); "
                      "rebuilding it", stacklevel=3)
        so.unlink()
    built = not so.exists()
    if built:
        _build(cc, cflags, so)
    try:
        return ctypes.CDLL(str(so))
    except OSError:
        if built:
            raise
        so.unlink(missing_ok=True)  # unloadable for another reason (a foreign file under our name)
        _build(cc, cflags, so)
        return ctypes.CDLL(str(so))


def _library_complete(so: Path) -> bool:
    """Does the file hold every byte its ELF headers point to? (Non-ELF platforms: non-empty.)"""
    import struct

    try:
        with open(so, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if not sys.platform.startswith("linux"):
                return size > 0
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF, as every build here
                return False
            e = "<" if head[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(e + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", head, 54)
            end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            if end > size:
                return False
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):  # each segment's bytes in the file: p_offset, p_filesz
                offset, = struct.unpack_from(e + "Q", table, i * phentsize + 8)
                filesz, = struct.unpack_from(e + "Q", table, i * phentsize + 32)
                end = max(end, offset + filesz)
            return end <= size
    except (OSError, struct.error):
        return False


def _build(cc: list[str], cflags: list[str], so: Path) -> None:
    """Compile the sources into `so` (the cache), renamed into place when complete, readable by
    every user the umask allows (a cache folder can be shared; mkstemp makes files 0600)."""
    from ..atomic import remove_stale_temps, temp_owner, temp_stem

    so.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(so.parent, so.name)  # a builder killed mid-compile (kill -9) left its files
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(so.name)}.{temp_owner()}.", suffix=".so", dir=so.parent)
    os.close(fd)
    objs = [f"{tmp[:-3]}-{i}.o" for i in range(len(_SRCS))]
    try:
        for src_file, obj in zip(_SRCS, objs):
            subprocess.run([*cc, *cflags, "-c", "-o", obj, str(src_file)], check=True, capture_output=True, timeout=120)
        subprocess.run([*cc, *_LDFLAGS, "-o", tmp, *objs, "-lm"], check=True, capture_output=True, timeout=120)
        os.chmod(tmp, 0o755 & ~_umask())
        with open(tmp, "rb") as f:  # on disk before the rename: a crash must not leave a short file under the name
            os.fsync(f.fileno())
        os.replace(tmp, so)  # atomic: concurrent builders never load a half-written library
    finally:
        Path(tmp).unlink(missing_ok=True)
        for obj in objs:
            Path(obj).unlink(missing_ok=True)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _usable(*tensors) -> bool:
    """The C kernels take contiguous float32 CPU tensors and do not track gradients."""
    ts = [t for t in tensors if t is not None]
    return (_lib() is not None and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def _c(t):
    return None if t is None else t.contiguous()


def selective_scan_cpu(x, dt, A, B, C, D, z, dt_bias, h0):
    """Same contract as reference.selective_scan_ref; float32 CPU tensors only."""
    b, l, d = x.shape
    n = A.shape[-1]
    if n > MAX_D_STATE or not _usable(x, dt, A, B, C, D, z, dt_bias, h0):
        return ref.selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, h0)
    lib = _lib()
    x, dt, A, B, C, D, dt_bias, z = (_c(t) for t in (x, dt, A, B, C, D, dt_bias, z))
    h = h0.clone().contiguous()
    y = torch.empty_like(x)
    work = torch.empty(l, d, dtype=F32)  # step sizes, one batch row at a time
    lib.selective_scan_f32(_ptr(x), _ptr(dt), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(dt_bias),
                           _ptr(h), _ptr(y), _ptr(work), b, l, d, n)
    return y, h


def causal_conv1d_update_cpu(x, weight, bias, conv_state, activation=True):
    """Same contract as reference.causal_conv1d_update_ref."""
    if not _usable(x, weight, bias, conv_state):
        return ref.causal_conv1d_update_ref(x, weight, bias, conv_state, activation)
    x, weight, bias, conv_state = (_c(t) for t in (x, weight, bias, conv_state))
    y, state_out = torch.empty_like(x), torch.empty_like(conv_state)
    b, c = x.shape
    _lib().conv_update_f32(_ptr(x), _ptr(weight), _ptr(bias), _ptr(conv_state), _ptr(state_out), _ptr(y),
                           b, c, weight.shape[1], int(activation))
    return y, state_out


def selective_state_update_cpu(x, dt, A, B, C, D, z, dt_bias, h):
    """Same contract as reference.selective_state_update_ref."""
    if not _usable(x, dt, A, B, C, D, z, dt_bias, h):
        return ref.selective_state_update_ref(x, dt, A, B, C, D, z, dt_bias, h)
    x, dt, A, B, C, D, z, dt_bias, h = (_c(t) for t in (x, dt, A, B, C, D, z, dt_bias, h))
    y, h_out = torch.empty_like(x), torch.empty_like(h)
    b, d = x.shape
    _lib().selective_update_f32(_ptr(x), _ptr(dt), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(dt_bias),
                                _ptr(h), _ptr(h_out), _ptr(y), b, d, A.shape[-1])
    return y, h_out


def ssd_step_cpu(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, dt_limit=(0.0, float("inf"))):
    """Same contract as reference.ssd_step_ref: conv update then the SSD state update, two calls."""
    if not _usable(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h):
        return ref.ssd_step_ref(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, dt_limit)
    xBC, conv_state_out = causal_conv1d_update_cpu(xBC, conv_weight, conv_bias, conv_state, True)
    dt, A, D, dt_bias, h = (_c(t) for t in (dt, A, D, dt_bias, h))
    b, nh, p, n = h.shape
    g = (xBC.shape[1] - nh * p) // (2 * n)
    y, h_out = torch.empty(b, nh, p, dtype=F32), torch.empty_like(h)
    _lib().ssd_update_f32(_ptr(xBC), _ptr(dt), _ptr(A), _ptr(D), _ptr(dt_bias), _ptr(h), _ptr(h_out), _ptr(y),
                          b, nh, p, g, n, float(dt_limit[0]), float(dt_limit[1]))
    return y, conv_state_out, h_out


def rmsnorm_cpu(x, weight, eps):
    """Same contract as reference.rmsnorm_ref (float32 only)."""
    if not _usable(x, weight):
        return ref.rmsnorm_ref(x, weight, eps)
    x, weight = _c(x), _c(weight)
    y = torch.empty_like(x)
    d = x.shape[-1]
    _lib().rmsnorm_f32(_ptr(x), _ptr(weight), _ptr(y), x.numel() // d, d, float(eps))
    return y


GEMV_MAX_ROWS = 8  # decode: the C GEMV reads each weight row once for all rows


def linear_cpu(x, weight, bias=None):
    """Same contract as F.linear. For a handful of rows (decode) torch runs a single-threaded
    GEMV, so a token is bound by one core's memory bandwidth. The C GEMV (cpu_decode.c) splits
    the rows over threads: 130m shapes on 2 threads, 1.8x a batched matmul when the weight is
    in cache and 1.15x on the 154 MB lm_head. Without a compiler, splitting the weight's rows into
    one slab per thread and using a batched matmul lets every thread stream its share."""
    k = torch.get_num_threads()  # more slabs than threads measured no faster
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        return F.linear(x, weight, bias)  # its shape error
    rows = x.numel() // in_f
    if rows <= GEMV_MAX_ROWS and weight.is_contiguous() and _usable(x, weight, bias):
        xc = x.reshape(rows, in_f).contiguous()
        y = torch.empty(*x.shape[:-1], out_f, dtype=F32)
        _lib().gemv_f32(_ptr(weight), _ptr(_c(bias)), _ptr(xc), _ptr(y), rows, out_f, in_f, k)
        return y
    if k < 2 or rows > 4 or out_f % k or not weight.is_contiguous() or weight.requires_grad and torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, in_f).t().unsqueeze(0).expand(k, in_f, rows)  # (k, in, rows)
    y = torch.bmm(weight.view(k, out_f // k, in_f), xt)  # (k, out/k, rows)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], out_f)
    return y + bias if bias is not None else y


QUANT_GEMV_MAX_ROWS = 8  # decode; longer inputs (prefill) take the reference's dequantize + GEMM


def _quant_gemv_ok(x, qweight, k: int) -> bool:
    """Decode-sized float32 CPU input of the weight's width (anything else: the reference, which
    also raises the shape errors)."""
    return (x.dim() == 2 and x.shape[1] == k and x.shape[0] <= QUANT_GEMV_MAX_ROWS
            and qweight.device.type == "cpu" and _usable(x) and not x.requires_grad)


def int8_linear_cpu(x, qweight, scales):
    """Same contract as reference.int8_linear_ref; decode-sized inputs read only the int8 codes."""
    if not _quant_gemv_ok(x, qweight, qweight.shape[1]):
        return ref.int8_linear_ref(x, qweight, scales)
    x, qweight = x.contiguous(), qweight.contiguous()
    s = scales.reshape(-1).float().contiguous()
    n, k = qweight.shape
    y = torch.empty(x.shape[0], n, dtype=F32)
    _lib().int8_gemv_f32(_ptr(qweight), _ptr(s), _ptr(x), _ptr(y), x.shape[0], n, k, torch.get_num_threads())
    return y


def int4_groups_ok(group_size: int, k: int) -> bool:
    """Whether the C int4 GEMV reads these groups: whole bytes per group (an even size) that
    tile the row. Also asked by cpu_decode's plan."""
    return group_size % 2 == 0 and k % group_size == 0


def int4_linear_cpu(x, qweight, scales, zeros, group_size, symmetric):
    """Same contract as reference.int4_linear_ref; decode-sized inputs read only the packed codes."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if not _quant_gemv_ok(x, qweight, k) or not int4_groups_ok(group_size, k):
        return ref.int4_linear_ref(x, qweight, scales, zeros, group_size, symmetric)
    x, qweight = x.contiguous(), qweight.contiguous()
    b = x.shape[0]
    s = scales.float().contiguous()
    z = None if symmetric else zeros.float().contiguous()
    y = torch.empty(b, n, dtype=F32)
    scratch = torch.empty(b * (k + k // group_size), dtype=F32)  # x split into even / odd columns, group sums
    _lib().int4_gemv_f32(_ptr(qweight), _ptr(s), _ptr(z), _ptr(x), _ptr(y), _ptr(scratch), b, n, k, group_size,
                         torch.get_num_threads())
    return y


CPU_SSD_MAX_CHUNK = 128  # measured fastest on CPU (130m shapes, l=512: 15 ms vs 39 ms at 256)


def ssd_cpu(x, dt, A, B, C, D, dt_bias, h0, chunk_size, dt_limit):
    """The reference SSD with the chunk length capped for CPU caches. The chunk length is an
    implementation choice, not part of the model: any length gives the same function (up to
    rounding; tests/test_ops.py checks the reference at several)."""
    return ref.ssd_ref(x, dt, A, B, C, D, dt_bias, h0, min(chunk_size, CPU_SSD_MAX_CHUNK), dt_limit)


KERNELS = {"selective_scan": selective_scan_cpu, "linear": linear_cpu, "ssd": ssd_cpu,
           "causal_conv1d_update": causal_conv1d_update_cpu,
           "selective_state_update": selective_state_update_cpu, "ssd_step": ssd_step_cpu,
           "rmsnorm": rmsnorm_cpu, "int8_linear": int8_linear_cpu, "int4_linear": int4_linear_cpu,
           "w8a8_linear": torch_fused.w8a8_linear}  # torch._int_mm where it runs: not C, but faster than the twin


def available() -> bool:
    return _lib() is not None
