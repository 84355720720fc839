"""The demo kit: really trained small multimodal checkpoints (a Llama base and LLaVA / Video-LLaVA
fine-tunes of it), built on the CPU in minutes, seeded, bit-reproducible and cached.

- ``build_kit(cache_dir=None, size="demo", seed=0) -> Kit``: paths, tasks, accuracies (:mod:`.build`);
- ``evaluate(checkpoint_dir, task=None, split="test", n=None, llm=None) -> float``: the
  plain-transformers reference accuracy; ``predict(...)`` the replies (:mod:`.evaluate`);
- ``TASKS`` / ``get_task(name)``: splits of raw samples, questions, answers, chat messages (:mod:`.tasks`).
"""

from mmer_dist.demo.kit.build import SIZES, Kit, KitModel, build_kit, default_cache_dir, load_kit
from mmer_dist.demo.kit.evaluate import evaluate, load_checkpoint, predict
from mmer_dist.demo.kit.tasks import TASKS, Sample, Split, Task, get_task

__all__ = ["SIZES", "TASKS", "Kit", "KitModel", "Sample", "Split", "Task", "build_kit", "default_cache_dir",
           "evaluate", "get_task", "load_checkpoint", "load_kit", "predict"]
