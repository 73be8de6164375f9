"""Stage 1 of the recipe at real scale: train the projector on LLaVA-Pretrain, everything else frozen.

* ``data.py``   -- LLaVA-Pretrain's JSON and pictures -> training examples with answer-only labels
* ``stage1.py`` -- freezing, the accelerate training loop, saving the projector, the command line
  (``python -m llama3vision_min.training.stage1``)
* ``checkpoints.py`` -- ``OUT/checkpoint-STEP``: written whole, kept the last few, resumed only with the
  settings they were written with

The miniature (``llama3vision_min.miniature``) runs the same recipe at toy size on a CPU.
"""
