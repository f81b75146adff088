"""Embeddings, vector indexes, search, topics and retrieval-augmented prompts."""
