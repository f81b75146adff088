"""Model compression: distillation, pruning, quantization, and the table that compares them."""
