"""The workshop around the model: what you run it with, not what it is.

* ``cli.py``              -- ``python -m llama3vision_min ask | export``
* ``llava_export.py``     -- write the model as a transformers-native LLaVA folder (and vLLM's weight names)
* ``gguf_export.py``      -- write it as llama.cpp's two GGUF files (``export --format gguf``)
* ``llama_cpp_runner.py`` -- run those files in llama.cpp (llama-cpp-python), for the parity tests
* ``llama3_tokenizer.py`` -- Meta's Llama 3 tokenizer (the real ids) built offline from llama-models, cached
* ``backend.py``          -- which model the notebooks run on (real on a GPU, else the offline miniature)
* ``plots.py``            -- the notebooks' drawing helpers, so their cells show the idea
"""
