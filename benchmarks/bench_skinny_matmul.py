"""The rank-r products of one LoRA layer, each in the two orders that give the same numbers.

A LoRA layer multiplies (N, d) activations by rank-r matrices, and each product can be written
two ways: e.g. ``g^T h`` -> (out, r) or ``(h^T g)^T``. BLAS speed depends on the order; this
script times both forms of every product (medians over alternating calls, caches cold after a
``gc.collect()``) for one MiniLM-sized layer, and what ``peftlab.kernels.LoraLinearFunction``
uses (the faster order of each). Measured on the 2-core CPU (docs/benchmarks.md): the B
gradient as (h^T g)^T takes half the time of g^T h; x A^T is up to ~1.3x faster than
(A x^T)^T; the other two are within noise of each other. The last row
is the fold ``W + s B A`` (an alternative to adding ``s h B^T`` without dropout, not used:
it costs more than the addmm it would replace).

    PYTHONPATH=src python benchmarks/bench_skinny_matmul.py --rows 1024 --in 384 --out 384
"""

from __future__ import annotations

import argparse

import _common as C
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="tokens in the batch (batch x sequence)")
    parser.add_argument("--in", dest="in_features", type=int, default=384)
    parser.add_argument("--out", dest="out_features", type=int, default=384)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d_in, d_out, r = args.rows, args.in_features, args.out_features, args.rank
    x, g = torch.randn(n, d_in), torch.randn(n, d_out)
    a, b, w = torch.randn(r, d_in), torch.randn(d_out, r), torch.randn(d_out, d_in)
    h, h_t = torch.randn(n, r), torch.randn(r, n)
    out = torch.randn(n, d_out)

    # (product, the other order, the order peftlab uses); h = x A^T's other order is (A x^T)^T
    pairs = {
        "h = x A^T (N, r)": (lambda: torch.mm(a, x.t()), lambda: torch.mm(x, a.t())),
        "grad_B = g^T h (out, r)": (lambda: torch.mm(g.t(), h), lambda: torch.mm(h.t(), g)),
        "grad_h = g B (N, r)": (lambda: torch.mm(g, b), lambda: torch.mm(b.t(), g.t())),
        "grad_A = grad_h^T x (r, in)": (lambda: torch.mm(h.t(), x), lambda: torch.mm(h_t, x)),
        "adapter out: out += s h B^T vs fold W + s B A (fold not used)": (
            lambda: out.addmm_(h, b.t(), alpha=0.5), lambda: torch.addmm(w, b, a, alpha=0.5)),
    }
    fns = {}
    for name, (other, ours) in pairs.items():
        fns[f"{name} | other order"] = other
        fns[f"{name} | peftlab"] = ours
    fns["reference: base matmul x W^T (N, out)"] = lambda: torch.mm(x, w.t())
    times = C.alternate(fns, rounds=args.rounds, warmup=5)
    rows, table = [], {}
    base = C.median(times["reference: base matmul x W^T (N, out)"])
    for name in pairs:
        slow, fast = C.median(times[f"{name} | other order"]), C.median(times[f"{name} | peftlab"])
        table[name] = {"other_order_ms": slow * 1e3, "peftlab_ms": fast * 1e3,
                       "peftlab_vs_other_order": C.paired_ratio(times, f"{name} | peftlab", f"{name} | other order"),
                       "peftlab_vs_base_matmul": fast / base}
        rows.append([name, f"{slow * 1e3:.3f}", f"{fast * 1e3:.3f}", f"{table[name]['peftlab_vs_other_order']:.2f}",
                     f"{fast / base:.3f}"])
    rows.append(["reference: base matmul x W^T", f"{base * 1e3:.3f}", "", "", "1.000"])
    C.print_table(["product", "other order ms", "peftlab ms", "peftlab/other order", "peftlab/base matmul"], rows)
    C.write_results(f"skinny_matmul_n{n}_in{d_in}_out{d_out}", {"args": vars(args), "results": table})


if __name__ == "__main__":
    main()
