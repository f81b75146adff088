"""Decoding: ``sampling`` (settings, the batched sampler), ``context`` (prompt fitting),
``decode_batch`` (the KV-cached running batch, continuous batching), ``beam`` (beam search),
``textstream`` (token ids to streamed text, stop strings), ``generate`` (the generate stage)."""
