"""Stage 1's checkpoints: what a run needs to go on where it stopped, written whole or not at all.

``OUT/checkpoint-STEP/`` (STEP: optimizer updates done) holds

* ``mm_projector.safetensors`` -- the trainable part of the model (the frozen towers come from the Hub);
* ``optimizer.bin`` -- AdamW's moments, and ``random_states_RANK.pkl`` -- each process's random
  generators: accelerate's ``save_state`` (https://huggingface.co/docs/accelerate/usage_guides/checkpoint),
  read back by ``load_state`` with ``torch.load(weights_only=True)``;
* ``trainer_state.json`` -- the update count (which fixes the position in the data, see
  ``data.EpochOrder``), the cosine schedule's state, the history of loss and learning rate, and the
  settings the run was started with; a checkpoint is resumed only with the same settings.

Every process writes into ``OUT/.checkpoint-STEP.partial``; once all are done, the main process adds
``trainer_state.json`` and renames the folder. A run killed while saving leaves the previous
checkpoint as it was, and a ``.partial`` folder that is never read.
"""

import json
import shutil
from pathlib import Path

STATE = "trainer_state.json"
PROJECTOR = "mm_projector.safetensors"


def checkpoints(out):
    """``{step: folder}`` of the complete checkpoints in ``out``."""
    found = {}
    for folder in Path(out).glob("checkpoint-*"):
        step = folder.name.removeprefix("checkpoint-")
        if step.isdigit() and (folder / STATE).is_file():
            found[int(step)] = folder
    return dict(sorted(found.items()))


def read_state(folder):
    """``trainer_state.json`` of a checkpoint folder, or a ValueError that says what is there instead."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a checkpoint (no {STATE}; expected OUT/checkpoint-STEP)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / STATE} cannot be read: {error}") from None
    if not isinstance(state, dict) or not {"update", "settings", "scheduler", "history"} <= set(state):
        raise ValueError(f"{folder} is not a checkpoint (its {STATE} lacks the update, settings, schedule "
                         "or history; expected OUT/checkpoint-STEP)")
    return state


def check_settings(saved, settings, folder):
    """Refuse to resume ``folder`` when it was written with other settings (other data, model or batch)."""
    differ = [f"{key} {saved.get(key)!r} there, {value!r} now" for key, value in settings.items()
              if saved.get(key) != value]
    if differ:
        raise ValueError(f"{folder} was written with other settings ({'; '.join(differ)}): resume with the "
                         "settings it was started with, or start a new run in another --out")


def register_projector_hooks(accelerator):
    """Make ``accelerator.save_state``/``load_state`` keep only the projector of the model.

    Left to itself accelerate would write the whole model -- 16 GB of frozen Llama 3 per checkpoint.
    The hooks take the model's weights out of its lists and handle the projector alone.
    """
    from safetensors.torch import load_file, save_file

    def save(models, weights, folder):
        if accelerator.is_main_process:
            projector = accelerator.unwrap_model(models[0]).mm_projector
            state = {key: value.detach().float().cpu().contiguous()
                     for key, value in projector.state_dict().items()}
            save_file(state, str(Path(folder) / PROJECTOR), metadata={"format": "pt"})
        weights.clear()

    def load(models, folder):
        projector = accelerator.unwrap_model(models[0]).mm_projector
        projector.load_state_dict(load_file(str(Path(folder) / PROJECTOR)))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, out, state, keep):
    """Write ``OUT/checkpoint-STEP`` (``state`` becomes its ``trainer_state.json``); keep the last ``keep``.

    Called by every process (each saves its random states); the main process renames and prunes.
    """
    out = Path(out)
    final, partial = out / f"checkpoint-{state['update']}", out / f".checkpoint-{state['update']}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE).write_text(json.dumps(state, indent=1))
        if final.exists():  # the same step again, after resuming from an earlier checkpoint
            old = out / f".checkpoint-{state['update']}.old"
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old)
        else:
            partial.rename(final)
        for step, folder in list(checkpoints(out).items())[:-keep]:
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    return final
