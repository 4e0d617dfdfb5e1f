"""The compiled CPU kernels (`hf_extras/models/mixer_cpu_kernels.py`) against the PyTorch forms they replace, one run.

Each row times forward + backward of one piece at the Mamba-2 benchmark's sizes (width 256, expand 2, 8 heads of 64,
state 128, 1 group, conv 4, T = `--seq-len`, batch 1), float32, with the kernels on and off (`HF_EXTRAS_CPU_KERNEL`,
read at each call), interleaved round by round in one process so that background load hits both alike. Reported: the
minimum over `--rounds` rounds (after one warm-up each) and off / on (> 1: the kernel is faster).

    python benchmarks/cpu_kernels.py --threads 1

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def pieces(seq_len: int):
    """name -> a closure running forward + backward of that piece on fresh leaves."""
    from hf_extras.models.conv_ops import causal_depthwise_conv
    from hf_extras.models.modeling_mamba2 import GatedRMSNorm
    from hf_extras.models.norms import RMSNorm
    from hf_extras.models.retention_ops import grouped_decayed_linear_attention

    torch.manual_seed(0)
    T, inner, heads, state = seq_len, 512, 8, 128
    zxbcdt = torch.randn(1, T, inner + inner + 2 * state + heads)  # in_proj's output: z | x B C | dt
    conv_weight, conv_bias = torch.randn(inner + 2 * state, 1, 4) * 0.3, torch.randn(inner + 2 * state)
    grad_conv = torch.randn(1, T, inner + 2 * state)
    y, z = torch.randn(1, T, inner), torch.randn(1, T, inner)
    gated = GatedRMSNorm(inner, inner)
    hidden = torch.randn(1, T, 256)
    rms = RMSNorm(256)
    q, k = torch.randn(1, T, 1, state) * 0.1, torch.randn(1, T, 1, state) * 0.1
    v = torch.randn(1, T, heads, 64)
    dt = torch.rand(1, T, heads) * 0.1
    D = torch.randn(heads, 64)  # Mamba-2's D x skip, added inside the scan
    log_decay = -dt * torch.arange(1, heads + 1)

    def leaves(*tensors):
        return [t.clone().requires_grad_() for t in tensors]

    xbc = zxbcdt[..., inner : 2 * inner + 2 * state]  # a view: read in place by the kernel

    def conv():
        w, b = leaves(conv_weight, conv_bias)
        x_leaf = xbc.detach().requires_grad_()
        out, _ = causal_depthwise_conv(x_leaf, w, b, keep_tail=False, activation="silu")
        out.backward(grad_conv)

    def gated_norm():
        a, g = leaves(y, z)
        gated(a, g).sum().backward()

    def rms_norm():
        (h,) = leaves(hidden)
        rms(h).sum().backward()

    def ssd():
        a, b, c, g, s, d = leaves(q, k, v, log_decay, dt, D)
        o, _ = grouped_decayed_linear_attention(a, b, c, g, s, chunk_size=64, skip_scale=d)
        o.backward(torch.ones_like(o))

    return {
        "conv + SiLU (1, T, 768), a column slice": conv,
        "gated RMS norm (1, T, 512)": gated_norm,
        "RMS norm (1, T, 256)": rms_norm,
        "SSD + D x, chunk 64, 8 heads x 64, state 128": ssd,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hf_extras.models.mixer_cpu_kernels import load_kernel

    if load_kernel() is None:
        raise SystemExit("the kernels did not build here (no C compiler?): nothing to compare")
    print(
        f"# T={args.seq_len}, {torch.get_num_threads()} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}"
    )
    print("\n| piece, forward + backward | kernels | PyTorch | PyTorch / kernels |\n| --- | ---: | ---: | ---: |")
    for name, run in pieces(args.seq_len).items():
        times = {"1": [], "0": []}
        for _ in range(args.rounds + 1):
            for flag in times:
                os.environ["HF_EXTRAS_CPU_KERNEL"] = flag
                start = time.perf_counter()
                run()
                times[flag].append(time.perf_counter() - start)
        on, off = min(times["1"][1:]), min(times["0"][1:])
        print(f"| {name} | {on * 1e3:.2f} ms | {off * 1e3:.2f} ms | {off / on:.2f}x |")
    os.environ.pop("HF_EXTRAS_CPU_KERNEL", None)


if __name__ == "__main__":
    main()
