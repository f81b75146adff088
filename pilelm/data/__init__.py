"""Data preparation: readers, filters, dedup, PII, decontamination, executors (``pilelm prepare``)."""
