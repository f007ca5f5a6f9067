"""Built-in handlers: ``embedding`` (sentence-transformers folders) and ``image-classifier`` (ViT)."""
