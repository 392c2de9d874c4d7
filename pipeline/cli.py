"""`optipfair-pipeline`: run any stage of the DVC pipeline on its own.

`dvc repro` calls these same commands (see dvc.yaml), so a stage behaves the same whether DVC or
a person starts it. Every command reads params.yaml (or --params FILE) and checks all of it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import typer

from optipfair.errors import OptiPFairError
from optipfair.kernels import pin_cpu_kernels
from pipeline import layout
from pipeline.params import BASE_NAME, HEALED_SUFFIX, Params, healed_name, load_params

app = typer.Typer(
    name="optipfair-pipeline",
    help=(
        "Stages of the optipfair pruning pipeline: download -> analyze (+ generate) -> prune (-> heal) -> evaluate "
        "(+ export) (-> speed) -> report -> track. "
        "`dvc repro` runs them all and only what changed; each command here runs one stage by hand."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PARAMS_OPTION = typer.Option(
    Path("params.yaml"), "--params", "-p", help="Params file to read (the one dvc.yaml uses is params.yaml)."
)


def _run(step: Callable[[Params], object], params_file: Path) -> object:
    """Check the params file, then run `step`; a user error becomes one line on stderr and exit code 2.

    Ctrl-C is one line and exit code 130: every output is written to a temporary path and renamed
    into place, so an interrupted stage leaves what was there before.
    """
    try:
        return step(load_params(params_file))
    except OptiPFairError as error:
        typer.echo(f"optipfair-pipeline: error: {error}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("optipfair-pipeline: error: interrupted; this stage wrote nothing", err=True)
        raise typer.Exit(130) from None


def _portable(step: Callable[[Params], object]) -> Callable[[Params], object]:
    """`step`, run with the CPU kernels pinned first unless `compute.portable` is false.

    dvc.lock holds the hashes of what generate, prune and heal write: pinned, the same on any x86 CPU with
    AVX2 (README, Reproducibility). generate too: its text is what calibration and healing read, and a
    last-bit difference in a probability can turn a sampled token. Pinning works in a process of its own,
    as dvc runs a stage, before its first tensor operation (reading the params file does none); in a
    process that already computed it changes nothing.
    """
    def run(params: Params) -> object:
        if params.compute["portable"]:
            pin_cpu_kernels()
        return step(params)

    return run


@app.command()
def validate(params: Path = PARAMS_OPTION) -> None:
    """Check the params file and list the models it defines; remove what was built for models it no longer names.

    DVC runs this on every edit of params.yaml, so a variant taken out of it leaves no metrics file,
    loss curve or model directory behind for the report or a user to mistake for a current one.
    """
    checked = _run(lambda p: p, params)
    from pipeline.widths import width_warnings

    for line in width_warnings(checked):
        typer.echo(f"optipfair-pipeline: warning: {line}", err=True)
    healed = f"; healed: {', '.join(checked.heal)}" if checked.heal else ""
    typer.echo(f"{params}: OK; base from {checked.base['source']}, variants: {', '.join(checked.variants) or 'none'}"
               f"{healed}")
    gone = layout.leftovers(checked.model_names())
    layout.forget(gone)
    for path in gone:
        typer.echo(f"removed {path}: its model is no longer in {params}")


@app.command()
def download(params: Path = PARAMS_OPTION) -> None:
    """Fetch the base model named in `base:` into models/base (safetensors + tokenizer)."""
    from pipeline import download as stage

    target = _run(stage.run, params)
    typer.echo(f"base model saved to {target}")


@app.command()
def analyze(params: Path = PARAMS_OPTION) -> None:
    """Describe models/base (layers, widths, parameter split) into reports/analysis.json."""
    from pipeline import analyze as stage

    analysis = _run(stage.run, params)
    typer.echo(
        f"{analysis['num_layers']} layers, hidden {analysis['hidden_size']}, MLP width "
        f"{analysis['intermediate_size']} ({analysis['expansion_rate']:.0f}% expansion), "
        f"{analysis['parameters']['total'] / 1e6:.1f}M parameters, "
        f"{100 * (1 - analysis['parameters']['non_embedding'] / analysis['parameters']['total']):.0f}% of them in the "
        f"embedding{'' if analysis['tied_embeddings'] else ' and the output head'}"
    )


@app.command()
def generate(params: Path = PARAMS_OPTION) -> None:
    """Let models/base write its own calibration and healing text into data/generated/ (when `data:` uses it)."""
    from pipeline import generate as stage

    record = _run(_portable(stage.run), params)
    typer.echo(f"generated {record['tokens']} tokens in {record['samples']} samples into {layout.GENERATED_TEXT}"
               if record["used"] else f"{layout.GENERATED_TEXT}: left empty, no calibration or healing text uses it")


@app.command()
def prune(
    variant: str = typer.Option(..., "--variant", "-v", help="Name of a variant under `variants:` in the params file."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Build one pruned variant from models/base into models/<variant>."""
    from pipeline import prune as stage

    stats = _run(_portable(lambda p: stage.run(p, variant)), params)
    typer.echo(
        f"{variant}: {stats['original_parameters'] / 1e6:.1f}M -> {stats['pruned_parameters'] / 1e6:.1f}M "
        f"parameters in {stats['pruning_seconds']}s, saved to models/{variant}"
    )


@app.command()
def heal(
    variant: str = typer.Option(
        ..., "--variant", "-v", help="Name of a variant with a block under `heal:` in the params file."
    ),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train models/<variant> to match models/base again, into models/<variant>+healed."""
    from pipeline import heal as stage

    record = _run(_portable(lambda p: stage.run(p, variant)), params)
    losses = [point["loss"] for point in record["loss"]]
    typer.echo(
        f"{variant}: healed on {record['tokens']} tokens in {record['steps']} steps ({record['seconds']}s), "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, saved to models/{healed_name(variant)}"
    )


@app.command()
def evaluate(
    variant: str = typer.Option(
        ..., "--variant", "-v",
        help=f"`{BASE_NAME}`, the name of a variant or `<variant>{HEALED_SUFFIX}`.",
    ),
    params: Path = PARAMS_OPTION,
) -> None:
    """Measure perplexity, size and downstream tasks of one model into reports/metrics/<variant>.json."""
    from pipeline import evaluate as stage

    metrics = _run(lambda p: stage.run(p, variant), params)
    typer.echo(f"{variant}: perplexity {metrics['perplexity']:.2f}, {metrics['parameters'] / 1e6:.1f}M parameters")


@app.command()
def export(
    variant: str = typer.Option(
        ..., "--variant", "-v", help=f"`{BASE_NAME}`, the name of a variant or `<variant>{HEALED_SUFFIX}`."
    ),
    params: Path = PARAMS_OPTION,
) -> None:
    """Write one model as GGUF in each of `export.formats` (llama.cpp's converter and quantizer) and measure
    each one's perplexity in llama.cpp, into models/gguf/<variant>/ and reports/gguf/<variant>.json."""
    from pipeline import export as stage

    record = _run(lambda p: stage.run(p, variant), params)
    if "skipped" in record:
        typer.echo(f"{variant}: not exported: {record['skipped']}")
    for fmt, figures in record["formats"].items():
        typer.echo(f"{variant} {fmt}: {figures['size_mb']:.1f} MB, perplexity {figures['perplexity']:.2f}")


@app.command()
def speed(
    variant: str = typer.Option(
        ..., "--variant", "-v", help=f"The name of a variant or `<variant>{HEALED_SUFFIX}`, timed beside models/{BASE_NAME}."
    ),
    again: bool = typer.Option(False, "--again", help="Measure even when this machine has a record for the same "
                                                      "models and settings."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Time one model side by side with models/base on this machine, in transformers and in llama.cpp (each of
    `export.formats`), into reports/speed/<variant>.json and reports/speed.md (git-ignored, logged to MLflow)."""
    from pipeline import speed as stage

    checked, record = _run(lambda p: (p, stage.run(p, variant, again=again)), params)
    limit = checked.speed["max_spread"]
    for engine, figures in record["engines"].items():
        if "skipped" in figures:
            typer.echo(f"{variant} {engine}: not timed: {figures['skipped']}")
        else:
            typer.echo(f"{variant} {engine}: prefill {stage.ratio_cell(figures['prefill'], limit)}, "
                       f"generation {stage.ratio_cell(figures['generation'], limit)} the base model's speed")


@app.command()
def report(params: Path = PARAMS_OPTION) -> None:
    """Write reports/summary.md and the plots for the base model and every variant."""
    from pipeline import report as stage

    typer.echo(_run(stage.run, params))


@app.command()
def track(params: Path = PARAMS_OPTION) -> None:
    """Log base and every variant to MLflow (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db); no duplicates."""
    from pipeline import track as stage

    ledger = _run(stage.run, params)
    for model, entry in ledger.items():
        typer.echo(f"{model}: MLflow run {entry['run_id']} ({entry['status']})")


if __name__ == "__main__":
    app()
