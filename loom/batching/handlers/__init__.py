"""Built-in handlers: ``embedding`` (sentence-transformers folders), ``reranker`` (cross-encoders) and
``image-classifier`` (ViT)."""
