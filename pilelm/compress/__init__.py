"""Model compression: pruning, quantization, and the table that compares them."""
