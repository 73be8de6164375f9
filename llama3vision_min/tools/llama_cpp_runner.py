"""Run an exported GGUF pair in llama.cpp the way its users do, and read out what a parity check compares.

llama-cpp-python (``pip install llama-cpp-python``; it builds llama.cpp from source, about 20 minutes on
2 cores) ships ``Llama3VisionAlphaChatHandler``, the chat format of this very model. ``LlamaCppVision``
wraps it: ``answer`` is what a user of llama-cpp-python gets (greedy), and ``prompt_ids``,
``image_embeddings`` and ``first_token_logits`` open up the steps in between, through llama.cpp's
multimodal library (mtmd), so that a difference can be traced to the step that makes it.

Two settings differ from llama-cpp-python's defaults on purpose: greedy decoding needs
``temperature=0`` *and* ``repeat_penalty=1.0`` (the handler keeps a penalty of 1.1 otherwise), and the
context must hold the picture's rows (729 for the real model), so ``n_ctx`` is 2048.

Pictures: llama.cpp keeps a picture's aspect ratio and pads it to a square with grey, where the original
(and we) stretch it to the square. ``square_picture`` does our stretch before llama.cpp sees the picture;
then both read the same pixels.
"""

import base64
import contextlib
import ctypes
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..constants import IMAGE_TOKEN_INDEX
from ..image import to_rgb
from .gguf_export import LLM_FILE, VISION_FILE


def square_picture(image, size):
    """The picture stretched to ``size`` x ``size`` as our image processor stretches it (bicubic), so that
    llama.cpp -- which would pad a non-square picture instead -- reads the pixels we read."""
    return to_rgb(image).resize((size, size), resample=Image.Resampling.BICUBIC)


def png_bytes(image):
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PNG")  # lossless: llama.cpp decodes exactly these pixels
    return buffer.getvalue()


def picture_rows(vision_file):
    """How many rows a picture takes in the LLM's context: (image_size / patch_size)^2, from mmproj.gguf."""
    from gguf import GGUFReader

    fields = GGUFReader(str(vision_file)).fields

    def value(key):
        field = fields[key]
        return int(field.parts[field.data[0]][0])

    return (value("clip.vision.image_size") // value("clip.vision.patch_size")) ** 2


def _check_question(question):
    """The question as our model takes it: text (llama-cpp-python would answer ``None`` as the word)."""
    if not isinstance(question, str):
        raise ValueError(f"the question must be a str, got {type(question).__name__}")


@contextlib.contextmanager
def _quiet():
    """llama.cpp's vision code writes its progress to the process's own stdout and stderr, whatever
    ``verbose`` says (in C, and through Python's streams): all sent to /dev/null for the call, so that a
    notebook shows the answer, not the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]  # the real stdout and stderr, to put back
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        for fd in (1, 2):  # and below Python, what C writes
            os.dup2(null.fileno(), fd)
        try:
            yield
        finally:
            for fd, original in zip((1, 2), saved):
                os.dup2(original, fd)
                os.close(original)


class LlamaCppVision:
    """``model.gguf`` + ``mmproj.gguf`` from ``folder`` in llama.cpp, with llama-cpp-python's chat handler."""

    def __init__(self, folder, n_ctx=2048, n_threads=None):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Llama3VisionAlphaChatHandler

        folder = Path(folder)
        missing = [name for name in (LLM_FILE, VISION_FILE) if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"expected {LLM_FILE} and {VISION_FILE} in {folder}, missing {missing}")
        rows = picture_rows(folder / VISION_FILE)
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < rows + 32:
            raise ValueError(f"n_ctx must hold the picture's {rows} rows and a prompt (at least "
                             f"{rows + 32}), got {n_ctx!r}")
        with _quiet():
            self.handler = Llama3VisionAlphaChatHandler(clip_model_path=str(folder / VISION_FILE),
                                                        verbose=False)
            self.llm = Llama(model_path=str(folder / LLM_FILE), chat_handler=self.handler, n_ctx=n_ctx,
                             n_threads=n_threads or os.cpu_count(), verbose=False)

    def _chat(self, image, question, max_tokens, **kwargs):
        _check_question(question)
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
        message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": question}]}
        with _quiet():
            return self.llm.create_chat_completion(messages=[message], temperature=0.0, repeat_penalty=1.0,
                                                   max_tokens=max_tokens, **kwargs)

    def answer(self, image, question, max_tokens=64, **kwargs):
        """llama.cpp's greedy answer, as text (what ``create_chat_completion`` returns)."""
        return self._chat(image, question, max_tokens, **kwargs)["choices"][0]["message"]["content"]

    def answer_ids(self, image, question, max_tokens=64):
        """The same greedy answer as token ids (its stop token included when it stopped), read as llama.cpp
        picks each one: text would hide differences in tokens that are only part of a character."""
        from llama_cpp import LogitsProcessorList

        chosen = []

        def record(input_ids, scores):  # called before each token is picked; greedy picks the largest
            chosen.append(int(np.argmax(scores)))
            return scores

        self._chat(image, question, max_tokens, logits_processor=LogitsProcessorList([record]))
        return chosen[:max_tokens]  # llama-cpp-python may pick a few more while it completes a character

    def first_token_logits(self, image, question):
        """(vocab,) float32: the logits at the prompt's last position (llama.cpp keeps the last ones
        computed)."""
        import llama_cpp

        self._chat(image, question, max_tokens=1)  # the prompt is evaluated; the sampled token is not
        pointer = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy()

    def prompt_ids(self, question):
        """The prompt's token ids as llama.cpp reads them, with ``IMAGE_TOKEN_INDEX`` where the picture goes:
        the handler's own chat template, tokenized by mtmd (which adds the BOS)."""
        import jinja2

        _check_question(question)
        marker = self.handler._mtmd_cpp.mtmd_default_marker().decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": marker},
                                                 {"type": "text", "text": question}]}]
        text = jinja2.Template(self.handler.CHAT_FORMAT).render(messages=messages, add_generation_prompt=True)
        ids = []
        for kind, payload in self._chunks(text, Image.new("RGB", (8, 8)), add_special=True):
            ids += payload if kind == "text" else [IMAGE_TOKEN_INDEX]
        return ids

    def image_embeddings(self, image):
        """(n_patches, LLM width) float32: what mtmd's vision tower and projector make of the picture."""
        m = self.handler._mtmd_cpp
        marker = m.mtmd_default_marker().decode()
        [(kind, chunk)] = self._chunks(marker, image, add_special=False, keep_image=True)
        n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
        try:
            if m.mtmd_encode_chunk(self.handler.mtmd_ctx, chunk) != 0:
                raise ValueError("llama.cpp could not encode the picture")
            out = m.mtmd_get_output_embd(self.handler.mtmd_ctx)
            return (np.ctypeslib.as_array(out, shape=(n_tokens * self.llm.n_embd(),))
                    .reshape(n_tokens, -1).copy())
        finally:
            m.mtmd_input_chunk_free(chunk)

    def _chunks(self, text, image, add_special, keep_image=False):
        """mtmd's tokenization of ``text`` (with its marker) and ``image``:
        [("text", ids) | ("image", chunk)]."""
        m = self.handler._mtmd_cpp
        if self.handler.mtmd_ctx is None:
            self.handler._init_mtmd_context(self.llm)
        bitmap = self.handler._create_bitmap_from_bytes(png_bytes(image))
        chunks = m.mtmd_input_chunks_init()
        try:
            source = m.mtmd_input_text()
            encoded = text.encode()
            source.text, source.text_len = encoded, len(encoded)
            source.add_special, source.parse_special = add_special, True
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self.handler.mtmd_ctx, chunks, ctypes.byref(source), bitmaps, 1) != 0:
                raise ValueError("llama.cpp could not tokenize the prompt")
            out = []
            for index in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, index)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    tokens = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    out.append(("text", [tokens[i] for i in range(count.value)]))
                else:
                    out.append(("image", m.mtmd_input_chunk_copy(chunk) if keep_image else None))
            return out
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def close(self):
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
