"""Decoding: sampling, KV-cached batches, beam search, text streaming, the generate stage."""
