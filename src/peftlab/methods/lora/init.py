"""LoRA initialisations that read the base weight: PiSSA, OLoRA, and orthogonal factors.

* PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): the top-r singular triplets of
  ``W = U S V^T`` become the factors, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``, and the
  base keeps the residual ``W - s B A`` (the minor components). ``"pissa_niter_K"`` takes the
  triplets from ``torch.svd_lowrank`` with K subspace iterations (random, much faster on big layers).
* OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): ``W = Q R``; ``B = Q[:, :r]``,
  ``A = R[:r]``, and the base keeps ``W - s B A``.
* orthogonal (https://datta0.github.io/posts/rethink-lora-init/): A and B are random but built
  from complementary rows of one random orthogonal matrix, so ``B A = 0`` up to rounding and the
  base is left alone.

The first two change the base weight: the adapter subtracts ``s B0 A0`` when it is installed (all
adapters of an add are built first, so a refused layer leaves the model untouched) and adds it
back when a failed add is undone. As in peft, they apply to linear layers (Linear, Conv1D); an
Embedding gets the default init and a Conv2d is refused. Every factorisation runs in fp32 on the
``(out, in)`` weight, as peft does, so the same base and seed give the same factors.
"""

from __future__ import annotations

import re

import torch

from peftlab.errors import PeftConfigError

# Values of init_lora_weights that need the base weight (beside True, False and "gaussian").
WEIGHT_INITS = ("pissa", "olora", "orthogonal")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(init: object, ranks: list[int]) -> None:
    """Refuse an ``init_lora_weights`` value peftlab does not implement, or one its ranks cannot use."""
    if isinstance(init, bool) or (isinstance(init, str) and (init in ("gaussian", *WEIGHT_INITS) or _PISSA_NITER.fullmatch(init))):
        if init == "orthogonal" and any(r % 2 for r in ranks):
            raise PeftConfigError(
                f"LoraConfig: init_lora_weights='orthogonal' needs even ranks (r and rank_pattern), got {sorted(set(ranks))}."
            )
        return
    raise PeftConfigError(
        f"LoraConfig: init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora' or "
        f"'orthogonal', got {init!r}."
    )


def changes_base(init: object) -> bool:
    """Whether this init moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init == "olora" or init.startswith("pissa"))


def needs_base(init: object) -> bool:
    return isinstance(init, str) and (init in WEIGHT_INITS or init.startswith("pissa"))


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with ``s B A`` the best rank-r part of the fp32 ``weight`` (out, in)."""
    match = _PISSA_NITER.fullmatch(init)
    if match is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, r, niter=int(match.group(1)))
        vh = v.t()
    root = (s / scaling).sqrt()
    return root[:, None] * vh, u * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of the QR decomposition of the fp32 ``weight`` (out, in)."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r].contiguous(), q[:, :r].contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (A, B) whose rows come from the odd and even rows of one random orthogonal r x r matrix.

    ``B A = X_B^T Q_even Q_odd^T X_A^T`` and distinct rows of an orthogonal matrix are orthogonal,
    so the product is zero. The draws follow peft's order (Q, then A's, then B's Gaussian), so a
    seeded run gives peft's factors.
    """
    q, _ = torch.linalg.qr(torch.randn(r, r))
    odd, even = q[0::2], q[1::2]
    lora_a = (torch.randn(in_features, r // 2) @ odd).T / 10.0
    lora_b = torch.randn(r // 2, out_features).T @ even / 10.0
    return lora_a.contiguous(), lora_b.contiguous()
