"""Fast CPU ops: small C kernels compiled on first use with the system C compiler and loaded
through ctypes (no torch headers, so the build takes about a second). Each has its pure-PyTorch
twin in reference.py with the same signature; without a compiler the references are used.

Set MAMBA_DEPLOY_NO_CPU_KERNELS=1 to disable them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import reference as ref

_SRC = Path(__file__).with_name("cpu_scan.c")
# Compile with -ffast-math (vectorised expf) but link without it: linking a shared object with
# -ffast-math pulls in crtfastmath.o, which sets flush-to-zero for the whole process at load
# time and silently changes every other library's float math (seen breaking OpenVINO).
_CFLAGS = ["-O3", "-ffast-math", "-fPIC", "-fopenmp"]
_LDFLAGS = ["-shared", "-fopenmp"]
_FLAGS = _CFLAGS + ["|"] + _LDFLAGS  # part of the cache key
MAX_D_STATE = 256  # stack buffer in cpu_scan.c


def _cache_dir() -> Path:
    root = os.environ.get("MAMBA_DEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mamba_deploy")
    return Path(root)


@functools.lru_cache(maxsize=1)
def _lib():
    if os.environ.get("MAMBA_DEPLOY_NO_CPU_KERNELS"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + sys.platform.encode()).hexdigest()[:16]
    so = _cache_dir() / f"cpu_scan-{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
        os.close(fd)
        obj = tmp[:-3] + ".o"
        try:
            subprocess.run([cc, *_CFLAGS, "-c", "-o", obj, str(_SRC)], check=True, capture_output=True, timeout=120)
            subprocess.run([cc, *_LDFLAGS, "-o", tmp, obj, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, so)  # atomic: concurrent builders never load a half-written library
        except (subprocess.SubprocessError, OSError) as e:
            Path(tmp).unlink(missing_ok=True)
            detail = getattr(e, "stderr", b"") or b""
            warnings.warn(f"could not build the CPU scan kernel with {cc} ({e} {detail.decode(errors='replace')[:200]}); "
                          "using the PyTorch reference (slower)")
            return None
        finally:
            Path(obj).unlink(missing_ok=True)
    lib = ctypes.CDLL(str(so))
    f = lib.selective_scan_f32
    f.restype = None
    f.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_long] * 4
    return lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def selective_scan_cpu(x, dt, A, B, C, D, z, dt_bias, h0):
    """Same contract as reference.selective_scan_ref; float32 CPU tensors only."""
    lib = _lib()
    b, l, d = x.shape
    n = A.shape[-1]
    f32 = [x, dt, A, B, C, D, dt_bias, h0] + ([z] if z is not None else [])
    if (lib is None or n > MAX_D_STATE or torch.is_grad_enabled() and any(t.requires_grad for t in f32)
            or any(t.dtype != torch.float32 for t in f32)):
        return ref.selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, h0)
    x, dt, A, B, C, D, dt_bias = (t.contiguous() for t in (x, dt, A, B, C, D, dt_bias))
    z = z.contiguous() if z is not None else None
    h = h0.clone().contiguous()
    y = torch.empty_like(x)
    lib.selective_scan_f32(_ptr(x), _ptr(dt), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(dt_bias),
                           _ptr(h), _ptr(y), b, l, d, n)
    return y, h


def linear_cpu(x, weight, bias=None):
    """Same contract as F.linear. For a handful of rows (decode) torch runs a single-threaded
    GEMV, so a token is bound by one core's memory bandwidth; splitting the weight's rows into
    one slab per thread and using a batched matmul lets every thread stream its share."""
    k = torch.get_num_threads()
    out_f, in_f = weight.shape
    rows = x.numel() // in_f
    if k < 2 or rows > 4 or out_f % k or not weight.is_contiguous() or weight.requires_grad and torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, in_f).t().unsqueeze(0).expand(k, in_f, rows)  # (k, in, rows)
    y = torch.bmm(weight.view(k, out_f // k, in_f), xt)  # (k, out/k, rows)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], out_f)
    return y + bias if bias is not None else y


KERNELS = {"selective_scan": selective_scan_cpu, "linear": linear_cpu}


def available() -> bool:
    return _lib() is not None
