"""The miniature's words: its tokenizer, the reading dialogs of stage B, and prompts as token ids.

Every sequence the miniature trains on is built at the token-id level from pieces that
are tokenized apart, exactly as ``tokenizer_image_token`` tokenizes a prompt::

    [BOS, <|start_header_id|>, "user", <|end_header_id|>, "\\n\\n"]      prefix  (chunk 0 of the prompt)
  + [-200]                      (stages C/D: the picture)   or   description ids (stage B: P words)
  + ids("what is this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n")   without BOS
  + ids("a red circle<|eot_id|>")                                                          the answer

so a picture prompt is token for token ``tokenizer_image_token(build_prompt(question))``
(checked by ``PromptBuilder.check``), and a reading dialog differs from it only in
holding P description tokens where the picture's P patch vectors go. Tokenizing the
rendered chat text in one piece would not give these ids: a byte-level BPE splits
``"\\n\\n"`` differently when a word touches it. The decoded ids do equal the rendered
chat template (also checked).

A *description* is exactly P words (P = the number of image patches), for example
(P = 16)::

    "red circles two red . two red circles the red circles two , circles two red"

the scene's phrase repeated, some words replaced by filler; stage D's wording says the
same thing in other words ("there are two circles that are red").
"""

import random

import torch

from ..constants import EOT_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..prompt import ASSISTANT_HEADER, USER_HEADER, build_prompt
from ..token_split import continuation_ids, tokenizer_image_token
from .stand_ins import tiny_tokenizer
from .world import COLOURS, COUNTS, PLURALS, QUESTIONS, SHAPES, phrase

FILLERS = ("the", ".", "of", ",", "and", "on")
"""Words with no content that pad a description to the length of the picture's tokens."""

REWORDED_QUESTIONS = {
    "what": "what do you see?",
    "colour": "which colour does it have?",
    "shape": "what kind of shape is this?",
    "count": "count the shapes.",
}
"""Stage D's other wording of the four questions."""

VOCAB_SIZE = 512


def reworded_phrase(colour, shape, count):
    """Stage D's description wording: ``there is one circle that is red`` / ``there are two circles ...``."""
    if count == 1:
        return f"there is one {shape} that is {colour}"
    return f"there are {COUNTS[count - 1]} {PLURALS[shape]} that are {colour}"


def corpus():
    """Sentences of the shapes world that the tokenizer is trained on (deterministic)."""
    lines = []
    for count in (1, 2, 3):
        for colour in COLOURS:
            for shape in SHAPES:
                lines.append(f"the {phrase(colour, shape, count)} . "
                             f"{reworded_phrase(colour, shape, count)} .")
                lines.append(f"{colour} {shape} {PLURALS[shape]} {COUNTS[count - 1]}")
    lines += list(QUESTIONS.values()) + list(REWORDED_QUESTIONS.values())
    lines += [" ".join(FILLERS)] * 20 + ["user assistant system"]
    lines += [word for word in " ".join(lines).split() if word.isalpha()]  # each word also without a space
    return lines * 4


def make_tokenizer():
    """The miniature's byte-level BPE tokenizer: Llama 3 special tokens and chat template."""
    tokenizer = tiny_tokenizer(vocab_size=VOCAB_SIZE, corpus=corpus())
    _check_single_tokens(tokenizer)
    return tokenizer


def _check_single_tokens(tokenizer):
    """Every word a description is made of must be one token, with and without its leading space."""
    words = list(FILLERS) + list(COLOURS) + list(SHAPES) + list(PLURALS.values()) + list(COUNTS) + ["a"]
    words += "there is are that".split()
    for word in words:
        for text in (word, " " + word):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"{text!r} is {len(ids)} tokens; "
                                 "raise VOCAB_SIZE so every word is one token")


class PromptBuilder:
    """Builds the miniature's prompts, dialogs and labels as token ids (see the module docstring)."""

    def __init__(self, tokenizer, n_patches):
        self.tokenizer = tokenizer
        self.n_patches = n_patches
        self.prefix = tokenizer(USER_HEADER).input_ids  # [BOS, sh, user, eh, \n\n]
        self._cache = {}

    def _ids(self, text):
        """Ids of a chunk that follows another chunk: tokenized alone, the BOS dropped."""
        if text not in self._cache:
            self._cache[text] = continuation_ids(text, self.tokenizer)
        return self._cache[text]

    def question_ids(self, question):
        """The question and the end of the prompt: ``question<|eot_id|>`` + the assistant header."""
        return self._ids(question + EOT_TOKEN + ASSISTANT_HEADER)

    def answer_ids(self, answer):
        """The answer and the ``<|eot_id|>`` that ends it (the model must learn to stop)."""
        return self._ids(answer + EOT_TOKEN)

    def image_prompt(self, question):
        """Prompt ids with the -200 sentinel; equals ``tokenizer_image_token(build_prompt(question))``."""
        return self.prefix + [IMAGE_TOKEN_INDEX] + self.question_ids(question)

    def description_ids(self, words):
        """P words -> P ids: the first word without a leading space, the others with one."""
        return self._ids(" ".join(words))

    def example(self, context_ids, question, answer):
        """``(input_ids, labels)`` lists; ``context_ids`` is ``[-200]`` or description ids.

        Labels are IGNORE_INDEX (-100) everywhere except on the answer tokens (and the
        ``<|eot_id|>`` that closes the answer).
        """
        prompt = self.prefix + list(context_ids) + self.question_ids(question)
        answer_ids = self.answer_ids(answer)
        return prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids

    def batch(self, contexts, questions, answers):
        """Stack examples of equal length into ``(input_ids, labels)`` LongTensors of shape (batch, L)."""
        rows = [self.example(c, q, a) for c, q, a in zip(contexts, questions, answers)]
        lengths = {len(ids) for ids, _ in rows}
        if len(lengths) != 1:
            raise ValueError(f"a batch must hold examples of one length, got lengths {sorted(lengths)}")
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def check(self, questions=tuple(QUESTIONS.values())):
        """Assert the id-level construction agrees with the package's tokenizer and the chat template."""
        for question in questions:
            expected = tokenizer_image_token(build_prompt(question), self.tokenizer).tolist()
            if self.image_prompt(question) != expected:
                raise AssertionError(f"prompt ids for {question!r} differ from tokenizer_image_token")
        words = random_description(random.Random(0), "red", "circle", 2, self.n_patches)
        ids, _ = self.example(self.description_ids(words), questions[0], "two red circles")
        messages = [{"role": "user", "content": " ".join(words) + questions[0]},
                    {"role": "assistant", "content": "two red circles"}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if self.tokenizer.decode(ids) != rendered:
            raise AssertionError(f"a reading dialog does not decode to the rendered chat template:\n"
                                 f"{self.tokenizer.decode(ids)!r}\n{rendered!r}")
        if len(self.description_ids(words)) != self.n_patches:
            raise AssertionError("a description is not exactly one token per image patch")


def random_description(rng, colour, shape, count, n_words, reworded=False, max_noise=0.0, mixed_number=False):
    """A description of exactly ``n_words`` words: the scene's phrase over and over, some words replaced by
    filler.

    The phrase is repeated from a random offset to fill ``n_words``; then a random share
    (up to half) of the words become filler. A picture's patches all "know" the scene, so
    the projector can say it at every patch, as the description does at every word.

    ``max_noise`` > 0 also replaces a random share (up to ``max_noise``) of the content words
    by a wrong word of the same kind (another colour, another shape, another count), so the
    LLM learns to answer with what *most* of the description says. Picture tokens are like
    that: each patch holds the scene only partly (one patch may look more like "three" than
    "two"), and an LLM that reads only consistent descriptions cannot weigh such evidence.

    ``mixed_number`` writes every noun of the description in the singular or the plural at
    random. The noun's number then says nothing about the count, and the LLM learns to make
    its answer agree with the count word it has just written ("a" -> "circle", "two" ->
    "circles") instead of copying the number from its context (with pictures, it wrote
    "a red circles").
    """
    content = (reworded_phrase if reworded else phrase)(colour, shape, count).split()
    offset = rng.randrange(len(content))
    words = [content[(offset + i) % len(content)] for i in range(n_words)]
    noise = rng.uniform(0.0, max_noise)
    share = rng.uniform(0.0, 0.5)
    for i in range(n_words):
        if rng.random() < noise:
            words[i] = _wrong_word(rng, words[i])
        if rng.random() < share:
            words[i] = rng.choice(FILLERS)
        if mixed_number and words[i] in _OTHER_NUMBER and rng.random() < 0.5:
            words[i] = _OTHER_NUMBER[words[i]]
    return words


_KINDS = (tuple(COLOURS), SHAPES, tuple(PLURALS.values()), ("a", "two", "three"))
_OTHER_NUMBER = {**PLURALS, **{plural: shape for shape, plural in PLURALS.items()}}  # circle <-> circles


def _wrong_word(rng, word):
    """Another word of the same kind (colour, shape, count), or a shape in the other number
    (``circle`` -> ``circles``); other words unchanged.

    Count words and noun numbers are both noisy, so neither alone tells the count: the
    LLM learns to weigh all the evidence, and to make the noun agree with the count word
    it has just written ("two" -> "circles").
    """
    for kind in _KINDS:
        if word in kind:
            others = [other for other in kind if other != word]
            if word in _OTHER_NUMBER:
                others.append(_OTHER_NUMBER[word])
            return rng.choice(others)
    return word
