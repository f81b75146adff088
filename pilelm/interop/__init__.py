"""Moving models to and from Hugging Face transformers."""
