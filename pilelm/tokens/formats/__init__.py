"""The token formats other tools use: Pythia's MMIDIDX files, nanoGPT's flat ``.bin``, LMDB and
TFRecord; ``pilelm shards export|import`` (``pilelm.tokens.exchange``) converts to and from them."""
