"""Tokenizers, the tokenize stage and token shards."""
