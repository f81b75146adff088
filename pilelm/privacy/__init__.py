"""Privacy: differentially private training and a memorization audit.

- ``accountant``: Opacus' RDP/PRV accountant with JSON state; noise for a target epsilon.
- ``per_sample``: per-sample gradients (``torch.func`` or one pass per sample), clipped and summed.
- ``dpsgd``: the DP-SGD hook of ``pilelm train`` (sampling, noise, accounting, checkpoints).
- ``canaries``: random secrets planted in prepared training data (``pilelm prepare privacy.canaries=N``).
- ``exposure``: a canary's exposure among random candidates, greedy extraction.
- ``audit``: the ``pilelm audit`` stage (canaries and the originals of scrubbed PII).
"""
