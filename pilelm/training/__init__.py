"""The training loop and what it is built from: loader, optimizers, precision, distribution, checkpoints."""
