"""heal stage: train a pruned variant to match the base model again (`optipfair.healing.heal`).

The student is models/<variant>, the teacher models/base; both are read in float32, whatever they
were saved in, and trained on `compute.device` (the library uses bf16 autocast on a GPU). The healed
model is saved in `compute.save_dtype`, as the pruned variants are (auto: the base checkpoint's own
dtype). The training text is what `data.heal_on` names: the calibration part of `data:` (never the
evaluation part, so the healed model's perplexity is measured on text it did not train on), the base
model's own generated text, or a mix. The healed model goes to models/<variant>+healed; its loss curve,
steps and tokens go to reports/heal/<variant>.json, a DVC plot that the track stage also logs to
MLflow as step metrics.
"""

from __future__ import annotations

from dataclasses import asdict

from optipfair.engine import saved_dtype
from optipfair.errors import OptionError
from optipfair.healing import heal
from optipfair.io import load_model, resolve_device, save_model
from pipeline import layout
from pipeline.compute import placement
from pipeline.params import BASE_NAME, Params, ParamsError, healed_name
from pipeline.texts import training_windows


def run(params: Params, name: str) -> dict:
    """Heal variant `name` into models/<name>+healed; write its healing record, return it with the wall time."""
    options = params.heal_options(name)  # an unknown variant or a missing heal block fails before any loading
    device = resolve_device(params.compute["device"])
    # Healing has no out-of-core path: two float32 models, gradients, AdamW state and one window's
    # activations must fit, or the stage stops here rather than being killed for memory midway.
    where = placement({**params.compute, "dtype": "float32"}, layout.model_dir(name), layout.model_dir(BASE_NAME),
                      tokens=options.seq_len, seq_len=options.seq_len, training=True)
    if where.out_of_core:
        raise ParamsError(
            f"{params.path}: heal.{name}: healing needs about {where.needed_bytes / 2**30:.1f} GiB (two float32 "
            f"models, gradients, optimizer state, activations), over the memory budget of "
            f"{where.budget_bytes / 2**30:.1f} GiB (compute.memory_budget_gib); lower heal.{name}.seq_len or "
            "raise the budget")
    student, tokenizer = load_model(str(layout.model_dir(name)), device, "float32")
    teacher, _ = load_model(str(layout.model_dir(BASE_NAME)), device, "float32")
    windows = training_windows(tokenizer, params.data, "heal_on", options.num_tokens, options.seq_len)
    # Progress goes to stderr, so `dvc repro` shows how far the training is.
    try:
        result = heal(student, teacher, windows, options, show_progress=True)
    except OptionError as error:  # a choice this machine cannot run (train: lora without peft)
        raise ParamsError(f"{params.path}: heal.{name}.{error.field}: {error.problem}") from None
    # No wall time in the record (the stage prints it): a DVC output must come out the same on every
    # run, or a fresh clone's `dvc repro` changes dvc.lock although the healed model is byte-identical.
    record = {
        "variant": name,
        "steps": result.steps,
        "tokens": result.tokens,
        "options": asdict(options),
        # A list of {step, loss} rows: the shape `dvc plots` and MLflow step metrics both read.
        "loss": [{"step": step, "loss": loss} for step, loss in enumerate(result.losses)],
    }
    # The model first: a record without its model would claim a training that left nothing.
    save_model(student, tokenizer, str(layout.model_dir(healed_name(name))),
               dtype=saved_dtype(params.compute["save_dtype"], layout.model_dir(BASE_NAME)))
    layout.write_json_atomic(layout.heal_file(name), record)
    return {**record, "seconds": round(result.seconds, 2)}
