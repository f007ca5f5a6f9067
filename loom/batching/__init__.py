"""Dynamic batching for every non-LLM model: handler API, batch queue, worker processes, built-in handlers.

Serve a model with ``loom serve --serve minilm=embedding`` (see docs/model-server.md); write your own handler by
subclassing :class:`loom.batching.handler.Handler`.
"""

from loom.batching.config import ModelConfig
from loom.batching.handler import Context, Handler, ItemError

__all__ = ["Context", "Handler", "ItemError", "ModelConfig"]
