"""The one batch order of every training loop: epochs are seeded permutations, and the examples
of a step are a pure function of ``(seed, step)``, so a resumed run reads exactly what the
uninterrupted one would have read and needs no loader state but the step.

Epoch ``e`` visits ``n`` items in ``np.random.default_rng([seed, e]).permutation(n)``; global
sample ``g`` is item ``perm_e[g mod n]`` with ``e = g div n``. Pretraining windows
(``loader.WindowSampler``), fine-tuning examples and SFT rows (``batch_indices``) and contrastive
pairs (``batch_indices(..., drop_last=True)``: a batch never holds one pair twice, since a pair
repeated in its own batch would be its own negative) all follow it.
"""

from __future__ import annotations

import numpy as np

# Length grouping draws each batch from a window of this many batches of the epoch's shuffled
# order sorted by length (transformers' ``LengthGroupedSampler`` uses the same 50): batches of
# similar lengths pad little, and the order stays random at the scale of windows.
GROUP_BATCHES = 50


def epoch_order(epoch: int, n: int, seed: int, lengths: np.ndarray | None = None,
                batch_size: int = 1) -> np.ndarray:
    """The items of one epoch in training order: a seeded permutation, or with ``lengths``
    the permutation grouped by length (windows of ``GROUP_BATCHES`` batches, each sorted by
    length and cut into batches, the batches of a window in seeded random order)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if lengths is None:
        return perm
    rng = np.random.default_rng([seed, epoch, 1])
    window = batch_size * GROUP_BATCHES
    out = []
    for start in range(0, n, window):
        part = perm[start:start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches = [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        out += [batches[j] for j in rng.permutation(len(batches))]
    return np.concatenate(out)


def batch_indices(step: int, batch_size: int, n: int, seed: int, lengths: np.ndarray | None = None,
                  drop_last: bool = False) -> list[int]:
    """The items of optimizer step ``step`` (0-based): consecutive slices of per-epoch orders
    (``epoch_order``; grouped by length when ``lengths`` is given). With ``drop_last`` an epoch
    is its first ``n // batch_size`` whole batches, so no batch spans two epochs."""
    per_epoch = (n // batch_size) * batch_size if drop_last else n
    if per_epoch < 1:
        raise ValueError(f"{n} items make no whole batch of {batch_size}; lower the batch size")
    out = []
    orders: dict[int, np.ndarray] = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, per_epoch)
        if epoch not in orders:
            orders[epoch] = epoch_order(epoch, n, seed, lengths, batch_size)
        out.append(int(orders[epoch][i]))
    return out


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> float:
    """Optimizer steps that visit ``n`` items once."""
    return (n // batch_size) if drop_last else n / batch_size
