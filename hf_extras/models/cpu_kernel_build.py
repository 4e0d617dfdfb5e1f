"""Builds and loads the small C kernels of hf_extras (compiled on first use, called through ``ctypes``).

Why C: on a CPU, PyTorch runs a chain of elementwise operations as one pass over memory each; the memory-bound parts
of the recurrent mixers (a selective scan, a short convolution with its activation, a gated norm) need one. No
maintained library ships these for CPUs (``mamba_ssm`` and flash-linear-attention are GPU-only).

Build: ``cc -O3 -march=native -fopenmp-simd`` into ``$HF_EXTRAS_CACHE/kernels`` (default
``~/.cache/hf_extras/kernels``), named by a hash of the source, the flags, the compiler and the CPU, written to a
temporary name and renamed (safe when several processes start at once). A machine with no C compiler, or a failed
build, gets ``None`` and the callers use their PyTorch forms; ``HF_EXTRAS_CPU_KERNEL=0`` turns every kernel off (read
at each call).

This file is copied into saved checkpoints: it imports only the standard library.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]

# C helpers shared by the kernels' sources (pasted in front of each).
C_COMMON = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* e^g for |g| <= ln 2 / 2, degree 7 (Taylor): scalar or GCC vector `g` */
#define HFX_EXP_POLY(g) (1.0f + (g) * (1.0f + (g) * (0.5f + (g) * (0.16666666666666666f + (g) * (0.041666666666666664f \
    + (g) * (0.008333333333333333f + (g) * (0.001388888888888889f + (g) * 0.0001984126984126984f)))))))

static inline float exp2_neg(float x) {
    /* 2^x for x in [-126.5, 127] (a degree-7 polynomial on 2^f, so that loops over it vectorise); 0 below. */
    x = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);
    const float xi = floorf(x + 0.5f);
    const float g = (x - xi) * 0.69314718055994531f;
    const float p = HFX_EXP_POLY(g);
    const int32_t bits = ((int32_t)xi + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* Runs fn(job, tid, nt) for tid = 0..nt-1 on POSIX threads (not OpenMP: a second OpenMP runtime beside torch's would
   fight it for cores); a thread that cannot start has its share run on the calling thread. */
typedef struct { void (*fn)(const void *, int, int); const void *job; int tid, nt; } hfx_thread_t;
static void *hfx_thread_main(void *p) { hfx_thread_t *t = (hfx_thread_t *)p; t->fn(t->job, t->tid, t->nt); return 0; }
static void hfx_parallel(void (*fn)(const void *, int, int), const void *job, int nt) {
    if (nt > 64) nt = 64;
    if (nt < 1) nt = 1;
    hfx_thread_t th[64];
    pthread_t ids[64];
    int started[64] = {0};
    for (int i = 0; i < nt; i++) { th[i].fn = fn; th[i].job = job; th[i].tid = i; th[i].nt = nt; }
    for (int i = 1; i < nt; i++) started[i] = pthread_create(&ids[i], 0, hfx_thread_main, &th[i]) == 0;
    fn(job, 0, nt);
    for (int i = 1; i < nt; i++) {
        if (started[i]) pthread_join(ids[i], 0);
        else fn(job, i, nt);
    }
}
"""


def kernel_enabled() -> bool:
    """Whether the kernels may be used (`HF_EXTRAS_CPU_KERNEL` unset, or anything but 0/false/no/off)."""
    return os.environ.get("HF_EXTRAS_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def build_library(stem: str, source: str, what: str) -> ctypes.CDLL | None:
    """Compile ``source`` (C) into a shared library named ``{stem}_{hash}.so`` in the kernel cache, once per machine,
    and load it; ``None`` (with a warning naming ``what``) where there is no compiler or the build fails."""
    try:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None or platform.system() == "Windows":
            return None
        key = hashlib.sha256("\0".join([source, " ".join(FLAGS), compiler, _cpu_signature()]).encode()).hexdigest()
        root = os.environ.get("HF_EXTRAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_extras")
        folder = os.path.join(root, "kernels")
        path = os.path.join(folder, f"{stem}_{key[:16]}.so")
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, out = os.path.join(tmp, f"{stem}.c"), os.path.join(tmp, f"{stem}.so")
                with open(src, "w") as f:
                    f.write(source)
                done = subprocess.run(
                    [compiler, *FLAGS, src, "-o", out, "-lm", "-lpthread"], capture_output=True, text=True, timeout=120
                )
                if done.returncode != 0:  # e.g. a compiler without -march=native support
                    logger.warning(
                        "hf_extras: the %s did not build (%s); using the PyTorch forms. Compiler output:\n%s",
                        what,
                        compiler,
                        done.stderr[-2000:],
                    )
                    return None
                os.replace(out, path)  # atomic: a concurrent process sees the old state or the whole file
        return ctypes.CDLL(path)
    except Exception as err:  # no compiler, read-only home, sandbox: the PyTorch forms still work
        logger.warning("hf_extras: the %s is unavailable (%s); using the PyTorch forms", what, err)
        return None
