"""mmer-dist: merge many fine-tuned multimodal LLMs (MMER) into one versioned store.

Layers, imports pointing one way: ``method`` (pure torch math) <- ``formats`` / ``store``
(bytes on disk) <- ``merge`` (orchestration, local or Ray) <- ``cli``.
"""

__version__ = "0.1.0"
