"""Stage 1 of the recipe at real scale: train the projector on LLaVA-Pretrain, everything else frozen.

* ``data.py``   -- LLaVA-Pretrain's JSON and pictures -> training examples with answer-only labels
* ``stage1.py`` -- freezing, the accelerate training loop, saving the projector, the command line
  (``python -m llama3vision_min.training.stage1``)

The miniature (``llama3vision_min.miniature``) runs the same recipe at toy size on a CPU.
"""
