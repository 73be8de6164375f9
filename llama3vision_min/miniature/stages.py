"""The four training stages of the miniature, each a function with a seed and a progress bar.

    A  vision tower   tiny SigLIP (image + text towers) trained with the sigmoid contrastive loss
                      on picture/caption pairs; only its vision tower is kept
    B  language model tiny Llama trained, text only, to answer questions about a *written*
                      description of a scene, in the Llama 3 chat format
    C  the recipe     A and B frozen; only a ``ProjectionModule`` is trained, through
                      ``LlamaVision.forward(labels=...)``, the picture in place of the description
    D  the LLM swap   a copy of B fine-tuned on another wording takes C's projector as it is;
                      a control LLM trained like B from another seed takes it too

``run.train_all`` runs them in order and ships the result (``python -m llama3vision_min.miniature
train``). All randomness comes from ``Recipe.seed``: the same seed gives the same weights.

Sources: stage A is SigLIP's sigmoid loss (arXiv 2303.15343) through transformers' ``SiglipModel``;
stage C is LLaVA's stage 1 (arXiv 2310.03744), the same code as ``llama3vision_min.training``.
"""

import copy
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..image import vision_features
from ..model import LlamaVision
from ..projector import ProjectionModule
from ..training.stage1 import freeze_all_but_projector
from .stand_ins import Geometry, make_configs
from .text import REWORDED_QUESTIONS, PromptBuilder, make_tokenizer, random_description
from .world import (COLOURS, COUNTS, IMAGE_SIZE, N_CLASSES, QUESTION_TYPES, QUESTIONS, SHAPES, Scene, answer,
                    phrase, random_scene, render, scene)

VALIDATION_START = 5_000_000
"""Seeds of the pictures used for probes and progress checks; training pictures lie below,
evaluation pictures (``world.HELD_OUT_START``) above."""


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of the miniature. ``Recipe()`` is the shipped one, ``Recipe.quick()`` the CI
    one."""

    seed: int = 0
    # vision tower (SigLIP architecture): 64 px pictures, 8 px patches -> 8 x 8 = 64 patch tokens
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    # language model (Llama architecture)
    text_hidden: int = 96
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    # stage A: one picture per class (75) per batch, so no caption is a false negative
    a_steps: int = 1200
    a_batch: int = 75
    a_lr: float = 2e-3
    a_warmup: float = 0.2
    # stage B
    b_steps: int = 1200
    b_batch: int = 16
    b_lr: float = 1.5e-3
    b_noise: float = 0.5  # up to half the content words of a description swapped for wrong ones
    b_question_weights: tuple = (1, 1, 1, 1)  # what, colour, shape, count
    b_mixed_number: bool = True  # nouns in a random number, so the answer's noun agrees with its count word
    # stage C (the LLaVA stage-1 recipe, shrunk): lr 1e-3, warmup 3 %, cosine
    c_steps: int = 3000
    c_batch: int = 16
    c_lr: float = 1e-3
    c_pictures: int = 6000
    c_question_weights: tuple = (3, 1, 1, 3)  # what, colour, shape, count: the hard types more often
    # stage D
    d_steps: int = 300
    d_lr: float = 5e-4
    # share of batches still asked in the old wording, so those are not forgotten
    d_old_questions: float = 0.5
    control_seed_offset: int = 1000
    # evaluation
    eval_pictures: int = 500
    swap_eval_pictures: int = 200

    @property
    def n_patches(self):
        return (IMAGE_SIZE // self.patch_size) ** 2

    @classmethod
    def quick(cls, seed=0):
        """A shortened recipe for CI: the losses fall and the projector learns, in a minute or two."""
        return cls(seed=seed, a_steps=120, b_steps=200, c_steps=150, c_pictures=1000, d_steps=30,
                   eval_pictures=60, swap_eval_pictures=40)


# -- helpers -----------------------------------------------------------------------------------
def to_pixels(images):
    """RGB pictures of IMAGE_SIZE -> pixel values (n, 3, H, W) in [-1, 1].

    The same numbers as the SigLIP image processor gives (no resize is needed at this size,
    then rescale 1/255 and normalise with mean 0.5 / std 0.5), without its per-image overhead.
    """
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])  # (n, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _schedule(optimizer, steps, warmup_ratio=0.03):
    """Linear warm-up, then cosine decay to zero (the LLaVA schedule, transformers' implementation)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, max(1, math.ceil(steps * warmup_ratio)), steps)


def _bar(steps, desc, progress):
    return tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0)


def _loss_summary(losses):
    """First and last tenth of a loss curve, averaged (a falling curve has first > last)."""
    k = max(1, len(losses) // 10)
    return {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:]))}


def _seeded(seed):
    torch.manual_seed(seed)
    return random.Random(seed)


def configs(recipe, tokenizer):
    """The miniature's ``(SiglipVisionConfig, LlamaConfig)``, made by the stand-ins' one config builder."""
    geometry = Geometry(image_size=IMAGE_SIZE, patch_size=recipe.patch_size,
                        vision_hidden=recipe.vision_hidden,
                        vision_intermediate=4 * recipe.vision_hidden, vision_layers=recipe.vision_layers,
                        vision_heads=recipe.vision_heads, text_hidden=recipe.text_hidden,
                        text_intermediate=recipe.text_intermediate, text_layers=recipe.text_layers,
                        text_heads=recipe.text_heads, text_kv_heads=recipe.text_kv_heads, max_positions=256)
    return make_configs(geometry, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)


# -- stage A: the vision tower -------------------------------------------------------------------
def _caption_ids(tokenizer):
    """(N_CLASSES, 3) caption ids, one row per class label; all captions have 3 tokens.

    The SigLIP text tower pools its last position without looking at a mask, so equal
    lengths are required.
    """
    rows = []
    for label in range(N_CLASSES):
        count, rest = divmod(label, len(COLOURS) * len(SHAPES))
        colour, shape = list(COLOURS)[rest // len(SHAPES)], SHAPES[rest % len(SHAPES)]
        rows.append(tokenizer(phrase(colour, shape, count + 1), add_special_tokens=False).input_ids)
    if len({len(row) for row in rows}) != 1:
        raise ValueError("captions must all have the same number of tokens")
    return torch.tensor(rows)


def _class_batch(rng, batch):
    """``batch`` pictures of ``batch`` different classes, drawn fresh:
    (pixels (batch, 3, H, W), labels (batch,)).

    No two pictures share a caption, so no pair in the batch is a false negative. The
    classes come colour by colour (all 15 shape/count classes of one colour, then of
    another): colour alone, which is learned first, then tells no picture from its
    neighbours, so shape and count must be learned too.
    """
    per_colour = len(SHAPES) * len(COUNTS)  # 15
    labels = []
    for colour in rng.sample(range(len(COLOURS)), max(1, batch // per_colour)):
        labels += [count * len(COLOURS) * len(SHAPES) + colour * len(SHAPES) + shape
                   for count in range(len(COUNTS)) for shape in range(len(SHAPES))]
    labels = rng.sample(labels, min(batch, len(labels)))  # (a random subset when batch < 15)
    images = []
    for label in labels:
        count, rest = divmod(label, len(COLOURS) * len(SHAPES))
        colour, shape = list(COLOURS)[rest // len(SHAPES)], SHAPES[rest % len(SHAPES)]
        images.append(render(random_scene(rng, colour=colour, shape=shape, count=count + 1)))
    return to_pixels(images), torch.tensor(labels)


def train_vision(recipe=Recipe(), tokenizer=None, progress=True, probe=True):
    """Stage A: pretrain a tiny SigLIP with the sigmoid loss; returns ``(SiglipVisionModel, report)``.

    Every batch holds ``a_batch`` of the 75 captions ("two red circles", ...), each once, so
    the loss never pushes apart a picture and a caption that describe the same thing.
    ``SiglipModel`` starts ``logit_scale`` and ``logit_bias`` at 0, which makes the loss
    nearly flat; they start here at log 10 and -5 (and are trained). The SigLIP paper's -10
    suits batches of thousands; with 30 pictures per batch it leaves the negatives almost
    without gradient (sigmoid(10 cos - 10) is ~0 for any cos below 0.7).
    """
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    tokenizer = tokenizer or make_tokenizer()
    rng = _seeded(recipe.seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=3, projection_size=recipe.vision_hidden,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id)
    config = SiglipConfig(text_config=text, vision_config=configs(recipe, tokenizer)[0].to_dict())
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-5.0)
    captions = _caption_ids(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.a_lr, weight_decay=1e-4)
    scheduler = _schedule(optimizer, recipe.a_steps, recipe.a_warmup)
    losses, start = [], time.perf_counter()
    model.train()
    bar = _bar(recipe.a_steps, "A vision (sigmoid loss)", progress)
    for step in bar:
        pixels, labels = _class_batch(rng, recipe.a_batch)
        outputs = model(input_ids=captions[labels], pixel_values=pixels, return_loss=True)
        loss = outputs.loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 20 == 0:  # share of pictures whose best-scoring caption is their own
            retrieval = (outputs.logits_per_image.argmax(-1) == torch.arange(len(labels))).float().mean()
            bar.set_postfix(loss=f"{loss.item():.3f}", retrieval=f"{retrieval:.2f}")
    seconds = time.perf_counter() - start

    tower = SiglipVisionModel(config.vision_config)
    # transformers 4.x nests the transformer under ``vision_model``; 5.x does not
    getattr(tower, "vision_model", tower).load_state_dict(model.vision_model.state_dict())
    tower.eval().requires_grad_(False)
    report = {"seconds": seconds, **_loss_summary(losses)}
    if probe:
        torch.manual_seed(recipe.seed)
        random_tower = SiglipVisionModel(config.vision_config).eval()
        report.update(probe=linear_probe(tower), probe_random_tower=linear_probe(random_tower))
    return tower, report


@torch.no_grad()
def cached_features(tower, images, batch_size=250):
    """The frozen tower's ``hidden_states[-2]`` for many pictures: (n, n_patches, vision_hidden)."""
    chunks = [vision_features(tower, to_pixels(images[i:i + batch_size]))
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def linear_probe(tower, n_train=1500, n_test=500, steps=300):
    """Accuracy of linear classifiers for colour, shape and count on the tower's mean-pooled
    ``hidden_states[-2]`` features (trained on ``n_train`` pictures, tested on ``n_test`` others)."""
    scenes = [scene(VALIDATION_START + i) for i in range(n_train + n_test)]
    feats = cached_features(tower, [render(s) for s in scenes]).mean(1)  # (n, vision_hidden)
    feats = (feats - feats[:n_train].mean(0)) / (feats[:n_train].std(0) + 1e-6)
    targets = {
        "colour": [list(COLOURS).index(s.colour) for s in scenes],
        "shape": [SHAPES.index(s.shape) for s in scenes],
        "count": [s.count - 1 for s in scenes],
    }
    result = {}
    for name, target in targets.items():
        y = torch.tensor(target)
        torch.manual_seed(0)
        probe = torch.nn.Linear(feats.shape[1], int(y.max()) + 1)
        optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
        with torch.enable_grad():
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(probe(feats[:n_train]), y[:n_train])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            result[name] = float((probe(feats[n_train:]).argmax(-1) == y[n_train:]).float().mean())
    return result


# -- stage B: the language model -----------------------------------------------------------------
def _description_options(recipe):
    """How stages B and D write descriptions (see ``text.random_description``)."""
    return dict(max_noise=recipe.b_noise, mixed_number=recipe.b_mixed_number)


def _reading_batch(builder, rng, batch, question_type, reworded=False, questions=None, **description):
    """One batch of reading dialogs of one question type (so all rows have one length, no padding).

    ``reworded`` writes the descriptions in stage D's wording; the question is asked in the
    wording of ``questions`` (default: the one that goes with the descriptions).
    """
    contexts, answers = [], []
    for _ in range(batch):
        content = random_scene_content(rng)
        words = random_description(rng, content.colour, content.shape, content.count, builder.n_patches,
                                   reworded=reworded, **description)
        contexts.append(builder.description_ids(words))
        answers.append(answer(content, question_type))
    questions = questions or (REWORDED_QUESTIONS if reworded else QUESTIONS)
    return builder.batch(contexts, [questions[question_type]] * batch, answers)


def random_scene_content(rng):
    """A scene's content -- colour, shape and count drawn uniformly -- with nothing drawn (stage B reads
    text)."""
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3), background=None,
                 objects=())


def _train_lm(model, builder, rng, steps, batch, lr, desc, progress, reworded=False,
              question_weights=(1, 1, 1, 1), old_questions=0.0, **description):
    """Train ``model`` on reading dialogs; loss on the answer tokens only. Returns the losses.

    Each batch holds one question type, drawn with ``question_weights`` (what, colour, shape, count);
    ``description`` holds ``random_description``'s options (noise, mixed number). With
    ``reworded``, a share ``old_questions`` of the batches still asks in the original wording.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps)
    losses = []
    model.train()
    bar = _bar(steps, desc, progress)
    for step in bar:
        question_type = rng.choices(QUESTION_TYPES, weights=question_weights)[0]
        questions = QUESTIONS if reworded and rng.random() < old_questions else None
        input_ids, labels = _reading_batch(builder, rng, batch, question_type, reworded, questions,
                                           **description)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def reading_accuracy(llm, builder, n=200, seed=12345, reworded=False):
    """Greedy exact-match accuracy of a text-only LLM on ``n`` new reading dialogs per question type.

    Computed with one teacher-forced pass: greedy decoding reproduces the answer (and its
    closing ``<|eot_id|>``) exactly when every answer token is the argmax given the ones before.
    """
    rng = random.Random(seed)
    result = {}
    for question_type in QUESTION_TYPES:
        input_ids, labels = _reading_batch(builder, rng, n, question_type, reworded)
        result[question_type] = _forced_exact(llm(input_ids=input_ids).logits, labels)
    return result


def _forced_exact(logits, labels):
    """Share of rows whose answer tokens (labels != -100) are all the argmax of the previous position."""
    predicted = logits[:, :-1].argmax(-1)  # (batch, T - 1): the guess for position t + 1
    target = labels[:, 1:]
    answer_positions = target != IGNORE_INDEX
    right = (predicted == target) | ~answer_positions
    return float(right.all(-1).float().mean())


def train_language(recipe=Recipe(), tokenizer=None, progress=True, seed=None):
    """Stage B: a tiny Llama trained to answer from written descriptions; ``(LlamaForCausalLM, report)``."""
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer or make_tokenizer()
    seed = recipe.seed if seed is None else seed
    builder = PromptBuilder(tokenizer, recipe.n_patches)
    builder.check()
    rng = _seeded(seed + 1)
    llm = LlamaForCausalLM(configs(recipe, tokenizer)[1])
    start = time.perf_counter()
    losses = _train_lm(llm, builder, rng, recipe.b_steps, recipe.b_batch, recipe.b_lr,
                       f"B language (seed {seed})", progress, question_weights=recipe.b_question_weights,
                       **_description_options(recipe))
    seconds = time.perf_counter() - start
    llm.requires_grad_(False)
    report = {"seconds": seconds, **_loss_summary(losses), "reading_accuracy": reading_accuracy(llm, builder)}
    return llm, report


# -- stage C: the projector ----------------------------------------------------------------------
def _picture_batch(builder, scenes, indices, question_type, questions=QUESTIONS):
    answers = [answer(scenes[i], question_type) for i in indices]
    return builder.batch([[IMAGE_TOKEN_INDEX]] * len(indices), [questions[question_type]] * len(indices),
                         answers)


@torch.no_grad()
def projector_accuracy(model, builder, feats, scenes, questions=QUESTIONS):
    """Teacher-forced greedy exact match per question type, from cached vision features."""
    result = {}
    indices = list(range(len(scenes)))
    for question_type in QUESTION_TYPES:
        input_ids, labels = _picture_batch(builder, scenes, indices, question_type, questions)
        logits = model(input_ids, vision_features=feats, labels=None).logits
        n_image_rows = feats.shape[1] - 1  # the sentinel became n_patches rows
        spliced_labels = torch.cat([torch.full((len(indices), n_image_rows), IGNORE_INDEX), labels], dim=1)
        result[question_type] = _forced_exact(logits, spliced_labels)
    return result


def _time_steps(model, builder, scenes, feats, pixels, n_steps=8):
    """Seconds per training step (forward + backward) with cached features and with pixels."""
    timings = {}
    for mode in ("cached", "recomputed"):
        elapsed = []
        for step in range(n_steps + 2):
            indices = list(range(step * 32, step * 32 + 32))
            input_ids, labels = _picture_batch(builder, scenes, indices, "what")
            begin = time.perf_counter()
            if mode == "cached":
                loss = model(input_ids, vision_features=feats[indices], labels=labels).loss
            else:
                loss = model(input_ids, pixel_values=pixels[indices], labels=labels).loss
            loss.backward()
            elapsed.append(time.perf_counter() - begin)
        timings[mode] = float(np.mean(elapsed[2:]))  # the first two warm up
    model.mm_projector.zero_grad()
    return timings


def train_projector(tower, llm, tokenizer, recipe=Recipe(), progress=True, time_cache=True, on_step=None,
                    validate=True):
    """Stage C: freeze ``tower`` and ``llm``, train only a new projector; ``(LlamaVision, report)``.

    The LLaVA stage-1 recipe of ``llama3vision_min.training`` at toy size: the same freezing
    (``freeze_all_but_projector``), schedule and answer-only labels. The frozen tower's
    features of the training pictures are computed once and reused (they cannot change);
    ``forward(vision_features=..., labels=...)`` splices them in. ``on_step(step, losses)``
    is called after every step (e.g. to draw a live loss plot).
    """
    rng = _seeded(recipe.seed + 2)
    builder = PromptBuilder(tokenizer, recipe.n_patches)
    builder.check()
    projector = ProjectionModule(tower.config.hidden_size, llm.config.hidden_size)
    model = LlamaVision(vision_model=tower, text_model=llm, mm_projector=projector)
    params = freeze_all_but_projector(model)  # the towers frozen, the projector trained

    scenes = [scene(seed) for seed in range(recipe.c_pictures)]
    images = [render(s) for s in scenes]
    begin = time.perf_counter()
    feats = cached_features(tower, images)  # (n, n_patches, vision_hidden), once
    cache_seconds = time.perf_counter() - begin
    timings = _time_steps(model, builder, scenes, feats, to_pixels(images[:320])) if time_cache else None

    optimizer = torch.optim.AdamW(params, lr=recipe.c_lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, recipe.c_steps)
    losses, start = [], time.perf_counter()
    bar = _bar(recipe.c_steps, "C projector (frozen A + B)", progress)
    for step in bar:
        indices = [rng.randrange(len(scenes)) for _ in range(recipe.c_batch)]
        question_type = rng.choices(QUESTION_TYPES, weights=recipe.c_question_weights)[0]
        input_ids, labels = _picture_batch(builder, scenes, indices, question_type)
        loss = model(input_ids, vision_features=feats[indices], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step, losses)
    seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    report = {"seconds": seconds, "cache_seconds": cache_seconds, **_loss_summary(losses)}
    if validate:  # teacher-forced accuracy on validation pictures (not the held-out evaluation ones)
        val_scenes = [scene(VALIDATION_START + 10_000 + i) for i in range(200)]
        val_feats = cached_features(tower, [render(s) for s in val_scenes])
        report["validation_accuracy"] = projector_accuracy(model, builder, val_feats, val_scenes)
    if timings:
        report.update(step_seconds_cached=timings["cached"], step_seconds_recomputed=timings["recomputed"],
                      cache_speedup=timings["recomputed"] / timings["cached"])
    return model, report


# -- stage D: the LLM swap -----------------------------------------------------------------------
def finetune_language(llm, tokenizer, recipe=Recipe(), progress=True):
    """Stage D's new LLM: a copy of ``llm`` fine-tuned on the other wording of descriptions and questions.

    Half the batches still ask in the old wording. Without them the fine-tune forgot "what is
    this?" (it answered it with the shape, as in the new "what kind of shape is this?") and even
    with text alone answered it right 5 % of the time.
    """
    builder = PromptBuilder(tokenizer, recipe.n_patches)
    rng = _seeded(recipe.seed + 3)
    tuned = copy.deepcopy(llm).requires_grad_(True)
    start = time.perf_counter()
    losses = _train_lm(tuned, builder, rng, recipe.d_steps, recipe.b_batch, recipe.d_lr,
                       "D fine-tune (new wording)", progress, reworded=True,
                       old_questions=recipe.d_old_questions, **_description_options(recipe))
    tuned.requires_grad_(False)
    report = {"seconds": time.perf_counter() - start, **_loss_summary(losses),
              "reading_accuracy_new_wording": reading_accuracy(tuned, builder, reworded=True),
              "reading_accuracy": reading_accuracy(tuned, builder)}
    return tuned, report


def swap_llm(model, llm):
    """The same tower and projector with another LLM (nothing retrained)."""
    return LlamaVision(vision_model=model.vision_model, text_model=llm,
                       mm_projector=model.mm_projector).eval()

