"""Built-in models and the ``mmer demo`` job: tiny checkpoints built in code, and the demo run."""
