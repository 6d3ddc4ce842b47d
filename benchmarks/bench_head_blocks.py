"""A chunk's logits ``h W^T`` in one product vs in blocks of head rows (what ``causal_loss._logits`` does on CPU).

The chunked causal-LM loss computes (rows, H) x (H, V) logits per chunk. On this CPU one BLAS
call for the whole vocabulary ran well below the speed of the same product's backward
(``dz W``); writing the output in blocks of a few hundred head rows recovered most of it. This
script times both forms, alternating, for SmolLM2's head (341-row chunks, H = 576, V = 49,152)
and for heads of other common shapes, and the block sizes around the chosen 512.

    PYTHONPATH=src python benchmarks/bench_head_blocks.py --rounds 8
"""

from __future__ import annotations

import argparse

import _common as C
import torch

SHAPES = [  # (vocab, hidden, rows): SmolLM2 chunk and a short batch, Llama-2-ish, Qwen2-0.5B, GPT-2
    (49152, 576, 341), (49152, 576, 64), (32000, 2048, 128), (151936, 896, 70), (50257, 768, 341),
]


def one_product(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor):
    def run() -> None:
        torch.mm(h, weight.t(), out=out)

    return run


def blocked(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, block: int):
    def run() -> None:
        for start in range(0, weight.shape[0], block):
            torch.mm(h, weight[start : start + block].t(), out=out[:, start : start + block])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs="*", default=[256, 512, 1024])
    args = parser.parse_args()
    torch.manual_seed(0)
    results, rows = {}, []
    for vocab, hidden, n in SHAPES:
        weight, h = torch.randn(vocab, hidden) * 0.05, torch.randn(n, hidden)
        out = torch.empty(n, vocab)
        fns = {"one product": one_product(h, weight, out)}
        fns.update({f"blocks of {b}": blocked(h, weight, out, b) for b in args.blocks})
        times = C.alternate(fns, rounds=args.rounds, warmup=1)
        key = f"V{vocab}_H{hidden}_rows{n}"
        results[key] = {name: {"median_s": C.median(t), "x_one_product": C.paired_ratio(times, name, "one product")}
                        for name, t in times.items()}
        rows.append([key] + [f"{results[key][name]['median_s'] * 1000:.1f} ({results[key][name]['x_one_product']:.2f})"
                             for name in fns])
    C.print_table(["shape", "one product ms"] + [f"blocks of {b} ms (x one)" for b in args.blocks], rows)
    C.write_results("head_blocks", {"rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
