"""The workshop around the model: what you run it with, not what it is.

* ``cli.py``          -- ``python -m llama3vision_min ask | export``
* ``llava_export.py`` -- write the model as a transformers-native LLaVA folder (and vLLM's weight names)
* ``backend.py``      -- which model the notebooks run on (real on a GPU, else the offline miniature)
* ``plots.py``        -- the notebooks' drawing helpers, so their cells show the idea
"""
