"""The `optipfair` command: `prune` a model, `heal` a pruned one, `analyze` one before pruning it, `export` one to GGUF.

Bad input ends in one line on stderr and a non-zero exit, before anything is written.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any, Dict, Optional

import typer

from optipfair.errors import OptiPFairError, OptionError
from optipfair.healing import (
    DEFAULT_HEAL_LABEL_WEIGHT,
    DEFAULT_HEAL_LR,
    DEFAULT_HEAL_SEQ_LEN,
    DEFAULT_HEAL_TOKENS,
    DEFAULT_HEAL_TRAIN,
    TRAINABLE,
)
from optipfair.io import DTYPES
from optipfair.kernels import pin_cpu_kernels
from optipfair.pruning.options import (
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_PRUNING_PERCENTAGE,
    DEFAULT_SHRINKAGE,
    PRUNING_TYPES,
    PruningOptions,
    check_windows,
)
from optipfair.pruning.methods import method_names

app = typer.Typer(
    help="Structured pruning of gated (GLU) MLPs in Hugging Face language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _choices(name: str, values) -> type:
    """A Typer choice type from one of the library's registries, so that help and checks name the same values."""
    return Enum(name, {value: value for value in values}, type=str)


PruningType = _choices("PruningType", PRUNING_TYPES)
DType = _choices("DType", ("auto", *DTYPES))
Trainable = _choices("Trainable", TRAINABLE)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# Command-line flags whose name is not the option's field with dashes.
_FLAGS = {"calibration.num_tokens": "--calibration-tokens", "calibration.seq_len": "--calibration-seq-len"}


def _flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _calibration_data(tokenizer, calibration_file: Optional[str], num_tokens: int, seq_len: int):
    from optipfair.data import default_texts, text_from_file, token_windows

    if tokenizer is None:
        raise OptiPFairError("calibrated pruning needs the model's tokenizer, and the model directory has none")
    text = text_from_file(calibration_file) if calibration_file else default_texts()[0]
    return token_windows(tokenizer, text, num_tokens, seq_len)


def _print_result(result: Dict[str, Any], as_json: bool, lines) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for line in lines:
            typer.echo(line)


@app.command()
def prune(
    model_path: str = typer.Option(..., "--model-path", help="Local model directory or Hugging Face Hub id."),
    output_path: str = typer.Option(..., "--output-path", help="Directory for the pruned model and tokenizer."),
    pruning_type: PruningType = typer.Option(
        PruningType.MLP_GLU, "--pruning-type", help="MLP_GLU: narrower MLPs; DEPTH: remove whole layers."
    ),
    method: str = typer.Option(
        "MAW",
        "--method",
        help=f"Neuron selection: {', '.join(method_names(calibrated=False))} (weights only), or "
        f"{', '.join(method_names(calibrated=True))} (calibrated; AUTO: the best measured).",
    ),
    pruning_percentage: Optional[float] = typer.Option(
        None,
        "--pruning-percentage",
        help=f"Percentage of MLP neuron pairs to remove, in [0, 100). Default {DEFAULT_PRUNING_PERCENTAGE:g}.",
    ),
    expansion_rate: Optional[float] = typer.Option(
        None, "--expansion-rate", help="Target intermediate/hidden size in % (instead of --pruning-percentage)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Compute dtype; auto = bfloat16 on GPU, float32 on CPU."),
    save_dtype: DType = typer.Option(
        DType.auto, "--save-dtype", help="Dtype of the saved model; auto = the checkpoint's own (a bf16 model stays bf16)."
    ),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Progress bars and a full summary, or one line."),
    round_to: Optional[int] = typer.Option(
        None, "--round-to", help="Round the kept MLP width to a multiple of this (128 suits GPUs)."
    ),
    calibration_file: Optional[str] = typer.Option(
        None, "--calibration-file", help="Text file for calibrated methods (default: Python's own docs)."
    ),
    calibration_tokens: int = typer.Option(
        DEFAULT_CALIBRATION_TOKENS, "--calibration-tokens", help="Calibration tokens to use."
    ),
    calibration_seq_len: int = typer.Option(
        DEFAULT_CALIBRATION_SEQ_LEN, "--calibration-seq-len", help="Tokens per calibration window."
    ),
    reconstruct: Optional[bool] = typer.Option(
        None, "--reconstruct/--no-reconstruct", help="Refit down_proj after calibrated selection (default on)."
    ),
    shrinkage: Optional[float] = typer.Option(
        None,
        "--shrinkage",
        help=f"0-1: shrink activation correlations before calibrated selection and refit (default {DEFAULT_SHRINKAGE:g}). "
        "Higher keeps more quality on text unlike the calibration text.",
    ),
    num_layers_to_remove: Optional[int] = typer.Option(
        None, "--num-layers-to-remove", help="Decoder layers to remove (DEPTH)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model repository's own code (only for sources you trust)."
    ),
    out_of_core: Optional[bool] = typer.Option(
        None,
        "--out-of-core/--in-memory",
        help="Prune one decoder layer at a time on --device, reading and writing safetensors shards. "
        "Default: out of core when the model in memory would exceed --memory-budget.",
    ),
    memory_budget: Optional[float] = typer.Option(
        None, "--memory-budget", help="GiB the in-memory path may use (default: 80% of the memory available now)."
    ),
    portable: bool = typer.Option(
        False, "--portable", help="The same bytes on any x86 CPU with AVX2 (Intel or AMD): pins PyTorch's and MKL's "
        "CPU kernels; slower on CPU (see README, Reproducibility).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON on stdout."),
) -> None:
    """Prune a model and save it (model + tokenizer) atomically to --output-path."""
    if portable and not pin_cpu_kernels():
        _fail("--portable: this process already chose its CPU kernels; run optipfair in a process of its own")
    from optipfair.engine import place, prune_directory
    from optipfair.io import check_output_path, load_tokenizer

    try:
        try:
            options = PruningOptions(
                pruning_type=pruning_type.value,
                method=method,
                pruning_percentage=pruning_percentage,
                expansion_rate=expansion_rate,
                round_to=round_to,
                reconstruct=reconstruct,
                shrinkage=shrinkage,
                num_layers_to_remove=num_layers_to_remove,
            )
            if options.needs_calibration:
                check_windows("calibration.", calibration_tokens, calibration_seq_len)
            check_output_path(output_path)
            if memory_budget is not None and not memory_budget > 0:
                raise OptionError("memory_budget", f"must be a positive number of GiB, got {memory_budget:g}")

            _quiet_transformers()
            placement = place([model_path], device, dtype.value, memory_budget, out_of_core)
            if placement.out_of_core and dtype != DType.auto:
                raise OptionError("dtype", f"out-of-core pruning computes in float32 and writes the checkpoint's own "
                                           f"dtype, got {dtype.value}; leave it auto")
            calibration = None
            if options.needs_calibration:
                calibration = _calibration_data(load_tokenizer(model_path), calibration_file, calibration_tokens,
                                                calibration_seq_len)
            stats = prune_directory(model_path, output_path, options, placement, calibration_data=calibration,
                                    save_dtype=save_dtype.value, show_progress=verbose and not as_json,
                                    trust_remote_code=trust_remote_code)
        except OptionError as error:  # a value this model or this path cannot take (round_to, rate, dtype...)
            raise OptiPFairError(f"{_flag(error.field)}: {error.problem}") from None
        stats.update(method=options.method, output_path=str(output_path), model_path=model_path)
        if verbose or as_json:
            _print_result(stats, as_json, _prune_summary(stats))
        else:
            typer.echo(
                f"saved {output_path}: {stats['original_parameters']:,} -> {stats['pruned_parameters']:,} parameters "
                f"(-{stats['percentage_reduction']:.1f}%)"
            )
    except OptiPFairError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", code=130)


def _prune_summary(stats: Dict[str, Any]):
    yield f"Pruned model saved to {stats['output_path']}"
    yield f"  pruning type      {stats['pruning_type']}" + (
        f" ({stats['method']})" if stats["pruning_type"] == "MLP_GLU" else ""
    )
    yield f"  parameters        {stats['original_parameters']:,} -> {stats['pruned_parameters']:,}"
    yield f"  reduction         {stats['reduction']:,} ({stats['percentage_reduction']:.2f}%)"
    yield (
        f"  MLP width         {stats['original_intermediate_size']} -> {stats['pruned_intermediate_size']} "
        f"({stats['mlp_pairs_removed_percentage']:.2f}% of pairs removed)"
    )
    yield f"  expansion rate    {stats['original_expansion_rate']:.1f}% -> {stats['expansion_rate']:.1f}%"
    yield f"  layers            {stats['original_layers']} -> {stats['pruned_layers']}"


@app.command()
def heal(
    model_path: str = typer.Option(..., "--model-path", help="The pruned model (local directory or Hub id)."),
    teacher_path: str = typer.Option(..., "--teacher-path", help="The model it was pruned from."),
    output_path: str = typer.Option(..., "--output-path", help="Directory for the healed model and tokenizer."),
    num_tokens: int = typer.Option(DEFAULT_HEAL_TOKENS, "--num-tokens", help="Training token budget."),
    seq_len: int = typer.Option(DEFAULT_HEAL_SEQ_LEN, "--seq-len", help="Tokens per training window."),
    learning_rate: float = typer.Option(DEFAULT_HEAL_LR, "--learning-rate", help="Peak AdamW learning rate."),
    train: Trainable = typer.Option(
        Trainable(DEFAULT_HEAL_TRAIN), "--train", help="Which weights train: mlp (MLP projections), all, or lora (needs peft)."
    ),
    label_weight: float = typer.Option(
        DEFAULT_HEAL_LABEL_WEIGHT, "--label-weight",
        help="Weight of the cross-entropy on the text's own next tokens, added to the KL to the teacher (0: teacher only).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the window order."),
    calibration_file: Optional[str] = typer.Option(
        None, "--calibration-file", help="Text to train on (default: Python's own docs, as for pruning)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (bf16 autocast on GPU)."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Progress bar and a summary, or one line."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model repository's own code (only for sources you trust)."
    ),
    portable: bool = typer.Option(
        False, "--portable", help="The same bytes on any x86 CPU with AVX2 (Intel or AMD): pins PyTorch's and MKL's "
        "CPU kernels; slower on CPU (see README, Reproducibility).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result (with the loss of every step) as JSON."),
) -> None:
    """Heal a pruned model: train it to match its unpruned teacher, then save it atomically to --output-path.

    The healed model is saved in the pruned model's own dtype (trained in float32 whatever it is).
    """
    if portable and not pin_cpu_kernels():
        _fail("--portable: this process already chose its CPU kernels; run optipfair in a process of its own")
    from optipfair.engine import saved_dtype
    from optipfair.healing import HealOptions, check_tokenizers
    from optipfair.healing import heal as heal_with
    from optipfair.io import check_output_path, load_model, save_model

    try:
        try:
            options = HealOptions(
                num_tokens=num_tokens, seq_len=seq_len, learning_rate=learning_rate, train=train.value,
                label_weight=label_weight, seed=seed,
            )
        except OptionError as error:
            raise OptiPFairError(f"{_flag(error.field)}: {error.problem}") from None
        check_output_path(output_path)

        _quiet_transformers()
        # float32 weights on every device: training bf16 weights loses small updates; GPUs autocast instead.
        student, tokenizer = load_model(model_path, device, "float32", trust_remote_code)
        teacher, teacher_tokenizer = load_model(teacher_path, device, "float32", trust_remote_code)
        if tokenizer is None:
            raise OptiPFairError(f"{model_path} has no tokenizer; healing needs one to read its training text")
        check_tokenizers(tokenizer, teacher_tokenizer)
        windows = _calibration_data(tokenizer, calibration_file, options.num_tokens, options.seq_len)
        try:
            result = heal_with(student, teacher, windows, options, show_progress=verbose and not as_json)
        except OptionError as error:  # train=lora without peft
            raise OptiPFairError(f"{_flag(error.field)}: {error.problem}") from None
        del teacher
        save_model(student, tokenizer, output_path, dtype=saved_dtype("auto", model_path))
        summary = {
            "output_path": str(output_path), "model_path": model_path, "teacher_path": teacher_path,
            "steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
            "first_loss": result.losses[0], "last_loss": result.losses[-1], "train": options.train,
            "learning_rate": options.learning_rate, "label_weight": options.label_weight, "seed": options.seed,
        }
        if as_json:
            _print_result({**summary, "losses": result.losses}, True, [])
        elif verbose:
            _print_result(summary, False, _heal_summary(summary))
        else:
            typer.echo(f"saved {output_path}: {result.tokens:,} tokens, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    except OptiPFairError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", code=130)


def _heal_summary(summary: Dict[str, Any]):
    yield f"Healed model saved to {summary['output_path']}"
    yield f"  teacher           {summary['teacher_path']}"
    yield f"  trained           {summary['train']} weights, learning rate {summary['learning_rate']:g}, seed {summary['seed']}"
    yield f"  tokens            {summary['tokens']:,} in {summary['steps']} steps, {summary['seconds']:.1f} s"
    loss = "KL" if summary["label_weight"] == 0 else f"KL + {summary['label_weight']:g} x cross-entropy"
    yield f"  loss ({loss})".ljust(20) + f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"


@app.command()
def analyze(
    model_path: str = typer.Option(..., "--model-path", help="Local model directory or Hugging Face Hub id."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (for --layer-importance)."),
    layer_importance: bool = typer.Option(
        False, "--layer-importance", help="Also measure each layer's importance on calibration text (loads weights)."
    ),
    calibration_file: Optional[str] = typer.Option(
        None, "--calibration-file", help="Text for --layer-importance (default: Python's own docs)."
    ),
    calibration_tokens: int = typer.Option(8192, "--calibration-tokens", help="Tokens for --layer-importance."),
    calibration_seq_len: int = typer.Option(512, "--calibration-seq-len", help="Tokens per calibration window."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model repository's own code (only for sources you trust)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as JSON on stdout."),
) -> None:
    """Show a model's layers, sizes, parameter split and what MLP pruning would save.

    Without --layer-importance it reads only the config: no weights are loaded, so it is instant
    for models of any size.
    """
    from optipfair.adapters import get_adapter
    from optipfair.analysis import analyze_model
    from optipfair.io import load_model, load_skeleton, resolve_device
    from optipfair.pruning.depth import layer_importance as measure_layers

    try:
        resolve_device(device)
        _quiet_transformers()
        if not layer_importance:
            result = analyze_model(load_skeleton(model_path, trust_remote_code))
        else:
            model, tokenizer = load_model(model_path, device, "auto", trust_remote_code)
            result = analyze_model(model)
            calibration = _calibration_data(tokenizer, calibration_file, calibration_tokens, calibration_seq_len)
            scores = measure_layers(model, get_adapter(model), calibration, show_progress=not as_json)
            result["layer_importance"] = scores
    except OptiPFairError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    result["model_path"] = model_path
    _print_result(result, as_json, _analysis_summary(result))


def _analysis_summary(result: Dict[str, Any]):
    params = result["parameters"]
    yield f"{result['model_path']}: {result['architecture']} ({result['mlp_family']})"
    yield f"  layers            {result['num_layers']}"
    yield f"  hidden size       {result['hidden_size']}"
    yield f"  intermediate size {result['intermediate_size']}"
    yield f"  expansion rate    {result['expansion_rate']:.1f}%"
    yield f"  parameters        {params['total']:,}"
    def share(part: str) -> str:
        return f"{params[part]:,} ({100 * params[part] / params['total']:.1f}%)"

    for part in ("attention", "mlp", "other"):
        yield f"    {part:<15} {params[part]:>14,} ({100 * params[part] / params['total']:.1f}%)"
    # MLP pruning never touches the embedding and the head: they bound what it can save.
    tied = result["tied_embeddings"]
    yield f"  embedding         {share('embedding')}" + (", tied: also the output head" if tied else "")
    if not tied:
        yield f"  output head       {share('output_head')}, untied"
    yield f"  non-embedding     {share('non_embedding')}"
    yield "  MLP pruning       width   expansion   parameters saved (of the model / non-embedding / MLP)"
    for row in result["savings"]:
        yield (
            f"    {row['pruning_percentage']:>5g}%        {row['intermediate_size']:>6}   {row['expansion_rate']:>8.1f}%"
            f"   {row['parameters_saved']:>14,} ({row['percentage_of_model']:.1f}% / "
            f"{row['percentage_of_non_embedding']:.1f}% / {row['percentage_of_mlp']:.1f}%)"
        )
    if "layer_importance" in result:
        scores = result["layer_importance"]
        ranks = {index: rank for rank, index in enumerate(sorted(range(len(scores)), key=scores.__getitem__), 1)}
        yield "  layer importance  (1 - cos(input, output); rank 1 = first to remove with DEPTH)"
        for index, score in enumerate(scores):
            yield f"    layer {index:>3}     {score:.4f}   rank {ranks[index]}"


@app.command()
def export(
    model_path: str = typer.Option(..., "--model-path", help="A saved model directory (config.json + safetensors + tokenizer)."),
    output_path: str = typer.Option(..., "--output-path", help="The GGUF file to write, e.g. model.Q4_K_M.gguf."),
    format: str = typer.Option("Q4_K_M", "--format", help="F16, BF16, F32, Q8_0, Q4_K_M, ... (llama.cpp's names)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (file, size, fallbacks) as JSON."),
) -> None:
    """Write a model as GGUF with llama.cpp's own converter and quantizer (needs tools/build_llama_cpp.sh).

    K-quants (Q4_K_M, ...) need rows that are multiples of 256 values: a tensor whose rows are not is
    written in another type by llama.cpp; the summary lists those tensors.
    """
    from optipfair.export import check_format, export_gguf

    try:
        try:
            check_format(format)
        except OptionError as error:
            raise OptiPFairError(f"--format: {error.problem}") from None
        item = export_gguf(model_path, {format: output_path})[format]
    except OptiPFairError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", code=130)
    result = {"output_path": str(item.path), "format": item.format, "size_bytes": item.size_bytes,
              "fallbacks": item.fallbacks}
    lines = [f"saved {item.path}: {item.format}, {item.size_bytes / 1e6:.1f} MB"]
    lines += [f"  {f['tensor']}: {f['ncols']} columns, not a multiple of 256: {f['type']} -> {f['fallback']}"
              for f in item.fallbacks]
    _print_result(result, as_json, lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
