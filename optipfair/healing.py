"""Healing: a short distillation that wins back what pruning cost, from the unpruned model itself.

The pruned model (the student) is trained to match the unpruned model (the teacher) on
calibration text, with a fixed token budget: the loss is the KL divergence from the teacher's
next-token distribution to the student's, at every position, optionally plus the cross-entropy
on the text's own next tokens (hard labels) and a per-layer hidden-state term. Only the student trains;
the teacher runs without gradients. Memory holds the two models, the gradients and optimizer state of
what trains, and little that grows with the vocabulary or the window:
- both models' logits are computed a chunk of positions at a time (`_window_backward`);
- the student's decoder layers are checkpointed: the backward pass recomputes one layer's activations
  at a time from its input instead of keeping every layer's for the whole window;
- the embedding's and the head's weight gradients are added in place, `GRAD_ROWS` rows at a time
  (`_EmbeddingGradients`), and AdamW steps a big weight `GRAD_ROWS` rows at a time (`_row_slices`):
  autograd and AdamW would otherwise build temporaries of the whole [vocabulary, hidden] matrix.
Each of these gives the same floats as the plain computation (tests/test_healing.py checks it to the bit).
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from optipfair.adapters import get_adapter
from optipfair.errors import OptiPFairError, OptionError
from optipfair.evaluation.head import chunk_positions, decoder_body, head_logits
from optipfair.pruning.options import _number, whole_number

TRAINABLE = ("mlp", "all", "lora")
# What trains and how fast: measured on SmolLM2-135M-Instruct pruned 35 % with AUTO, 4096 tokens
# (benchmarks/results/heal_trials.md; perplexity x base in domain / licenses / Python code, unhealed
# 1.175 / 1.823 / 1.351): all weights at lr 1e-4 1.156 / 1.775 / 1.339; MLP only at 1e-4 1.153 /
# 1.809 / 1.350, at 3e-4 1.174 / 1.772 / 1.355, at 1e-3 1.311 / 1.803 / 1.501; all at 3e-4 1.202 /
# 1.749 / 1.371; a hidden-state MSE term changed nothing (1.153 / 1.808 / 1.349). Higher rates
# trade the calibration domain and code for legal text; lr 1e-4 is better than unhealed on every
# text, and all weights beat MLP only out of domain, and at 20 % on every text (heal.md). With the
# hard-label term (below) the same holds at 20 %, 16k tokens: all weights at 1e-4 0.839 / 1.435 / 1.092,
# at 3e-5 0.922 / 1.542 / 1.100, at 3e-4 0.839 / 1.423 / 1.200 (code pays); MLP only 0.885 / 1.529 / 1.094.
DEFAULT_HEAL_TRAIN = "all"
DEFAULT_HEAL_LR = 1e-4
# The budget: healing runs ~4 model passes per token (teacher forward, student forward and backward);
# measured at 13-16 tokens/s on one busy core, so 16k tokens take ~20 min there, an estimated 2-4 min
# on 2 idle cores (not measured idle: the machine was shared with three other jobs throughout).
DEFAULT_HEAL_TOKENS = 16384
DEFAULT_HEAL_SEQ_LEN = 512
# The hard-label term, measured with 16k tokens at lr 1e-4 (benchmarks/results/heal_trials_gpu_20.md and
# _50.md; perplexity x base in domain / licenses / Python code). At 20 %: unhealed 1.079 / 1.681 / 1.145,
# KL alone 1.058 / 1.560 / 1.137, KL + 0.5 CE 0.873 / 1.454 / 1.098, + 1 CE 0.839 / 1.435 / 1.092, + 2 CE
# 0.819 / 1.433 / 1.090; at 50 %: 1.453 / 3.426 / 1.762 unhealed, 1.263 / 2.935 / 1.648 KL alone, 1.084 /
# 2.865 / 1.631 with 1 CE. The text's own tokens help on every text, not only in domain; past 1 the
# gains are small, and the teacher keeps half the say.
DEFAULT_HEAL_LABEL_WEIGHT = 1.0
# Rows of an embedding-sized matrix (the head's and the lookup's weight gradients, AdamW's update) worked
# on at once. Autograd and AdamW build the whole matrix as a temporary: with Gemma 3's 262144 x 640
# float32 embedding that is 0.625 GiB per temporary, two at once in AdamW's step, and healing peaked
# 1.72 GiB above its models and state (benchmarks/results/vocab_memory.md); 8192 rows of 640 are 20 MiB.
GRAD_ROWS = 8192


class HealingError(OptiPFairError):
    """The student cannot be healed from this teacher, or training broke down (NaN loss)."""


@dataclass(frozen=True)
class HealOptions:
    """
    How to heal a pruned model from its unpruned teacher.

    Args:
        num_tokens: Training token budget (> 0), rounded up to whole steps: windows are drawn in shuffled
            passes, so a text shorter than the budget is seen more than once
        seq_len: Tokens per training window (for `optipfair.data.token_windows`)
        learning_rate: Peak AdamW learning rate (linear warm-up over the first 10 % of steps, then linear decay to 0)
        train: Which weights train: "mlp" (the MLP projections only), "all", or "lora" (low-rank adapters, needs peft)
        seed: Seed of the window order (and of the LoRA initialisation)
        batch_size: Windows per optimizer step (run one at a time, so memory holds one window's activations)
        temperature: Softmax temperature of the KL term
        label_weight: Weight of the cross-entropy on the text's next tokens (hard labels), added to the KL
            term (0: the teacher alone). It adapts the student to the calibration text's domain
        hidden_weight: Weight of the per-layer hidden-state MSE term (0: logits only); a depth-pruned
            student has no layer-for-layer match with its teacher, so it always trains on the logits only
        lora_rank: Rank of the LoRA adapters (train="lora")

    Built from user values, it checks them all and raises `OptionError` on the first bad one.
    """

    num_tokens: int = DEFAULT_HEAL_TOKENS
    seq_len: int = DEFAULT_HEAL_SEQ_LEN
    learning_rate: float = DEFAULT_HEAL_LR
    train: str = DEFAULT_HEAL_TRAIN
    seed: int = 0
    batch_size: int = 1
    temperature: float = 1.0
    label_weight: float = DEFAULT_HEAL_LABEL_WEIGHT
    hidden_weight: float = 0.0
    lora_rank: int = 16

    def __post_init__(self):
        whole_number("num_tokens", self.num_tokens)
        whole_number("seq_len", self.seq_len, minimum=2)
        if self.num_tokens < self.seq_len:
            raise OptionError("num_tokens", f"must be at least seq_len ({self.seq_len}), got {self.num_tokens}")
        _number("learning_rate", self.learning_rate, 0, 1, low_open=True)
        train = str(self.train).lower()
        if train not in TRAINABLE:
            raise OptionError("train", f"unknown choice {self.train!r}; choose one of {', '.join(TRAINABLE)}")
        object.__setattr__(self, "train", train)
        whole_number("seed", self.seed, minimum=0)
        whole_number("batch_size", self.batch_size)
        _number("temperature", self.temperature, 0, low_open=True)
        _number("label_weight", self.label_weight, 0)
        _number("hidden_weight", self.hidden_weight, 0)
        whole_number("lora_rank", self.lora_rank)


@dataclass
class HealResult:
    """What a healing run did: optimizer steps, tokens trained on, wall time, the loss of each step."""

    steps: int
    tokens: int
    seconds: float
    losses: List[float] = field(default_factory=list)


def check_descendant(student: nn.Module, teacher: nn.Module) -> None:
    """Raise HealingError unless `student` is `teacher` pruned: same vocabulary and hidden size,
    the same layers (or fewer, for depth pruning), MLPs no wider than the teacher's."""
    s, t = get_adapter(student), get_adapter(teacher)
    s_vocab, t_vocab = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise HealingError(
            f"the student's vocabulary has {s_vocab} tokens, the teacher's {t_vocab}: heal from the model it was pruned from"
        )
    if s.hidden_size != t.hidden_size:
        raise HealingError(
            f"the student's hidden size is {s.hidden_size}, the teacher's {t.hidden_size}: "
            "heal from the model it was pruned from"
        )
    if len(s.layers) > len(t.layers):
        raise HealingError(
            f"the student has {len(s.layers)} layers, the teacher {len(t.layers)}: heal from the model it was pruned from"
        )
    if len(s.layers) < len(t.layers) and s.width(s.mlps[0]) != t.width(t.mlps[0]):
        raise HealingError(
            f"the student has {len(s.layers)} layers and the teacher {len(t.layers)}, and their MLP widths differ: "
            "only depth pruning removes layers, and it keeps every width"
        )
    widest = max(t.width(m) for m in t.mlps)
    for index, mlp in enumerate(s.mlps):
        if s.width(mlp) > widest:
            raise HealingError(
                f"layer {index} of the student has an MLP {s.width(mlp)} wide, wider than the teacher's {widest}: "
                "heal from the model it was pruned from"
            )


# A probe with prose, code, digits, whitespace runs and non-ASCII: tokenizers that agree on it share a vocabulary.
_PROBE = "Healing: def f(x):\n    return x ** 2  # 12345 \u00e9t\u00e9, na\u00efve \u4e2d\u6587 \U0001f600\t\tend."


def check_tokenizers(student_tokenizer, teacher_tokenizer) -> None:
    """Raise HealingError unless the two tokenizers have the same vocabulary (size, and the ids of a probe text).

    A teacher without a tokenizer passes: the models' vocabulary sizes are still compared by `heal`.
    """
    if teacher_tokenizer is None:
        return
    sizes = len(student_tokenizer), len(teacher_tokenizer)
    if sizes[0] != sizes[1]:
        raise HealingError(
            f"the student's tokenizer has {sizes[0]} tokens, the teacher's {sizes[1]}: heal from the model it was pruned from"
        )
    ids = [t(_PROBE, add_special_tokens=False)["input_ids"] for t in (student_tokenizer, teacher_tokenizer)]
    if ids[0] != ids[1]:
        raise HealingError(
            "the student's and the teacher's tokenizers split the same text into different token ids: "
            "heal from the model it was pruned from"
        )


def heal(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    options: HealOptions = HealOptions(),
    show_progress: bool = True,
) -> HealResult:
    """
    Train `student` in place to match `teacher` on `windows`.

    Args:
        student: The pruned model; trained in place (its weights are undefined after a HealingError)
        teacher: The model it was pruned from; not modified
        windows: Token ids [n, seq_len] of calibration text, e.g. from
            `optipfair.data.token_windows(tokenizer, text, options.num_tokens, options.seq_len)`
        options: Budget, learning rate, what trains (`HealOptions`)
        show_progress: Whether to show a progress bar with the loss and ETA

    Returns:
        HealResult: steps, tokens, seconds and the loss of every step.

    Raises HealingError before training when the student is not a pruned descendant of the
    teacher, and during it when the loss becomes NaN or infinite (naming the step).
    """
    check_descendant(student, teacher)
    windows = _check_windows(windows, student)
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)  # LoRA initialisation, dropout (none by default)

    seq_len = windows.shape[1]
    per_step = options.batch_size * seq_len
    steps = math.ceil(options.num_tokens / per_step)
    order = _window_order(len(windows), steps * options.batch_size, generator)

    model = _trainable(student, options)
    params = [p for p in model.parameters() if p.requires_grad]
    slices = _row_slices(params)
    optimizer = torch.optim.AdamW([view for _, view, _ in slices], lr=options.learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    use_hidden = options.hidden_weight > 0 and len(get_adapter(student).layers) == len(get_adapter(teacher).layers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    teacher_was_training, student_was_training = teacher.training, student.training
    checkpointed = student.is_activation_checkpointing
    teacher.eval()
    model.train()
    # Non-reentrant: it also checkpoints layers whose inputs need no gradient (train: mlp, lora).
    if student.supports_gradient_checkpointing:
        student.activation_checkpointing_enable({"use_reentrant": False})
    embedding = _EmbeddingGradients(student)
    losses: List[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="Healing", unit="step", disable=not show_progress)
    try:
        for step in bar:
            optimizer.zero_grad(set_to_none=True)  # the views' gradients, which hold the last step's alive
            for parameter in params:
                parameter.grad = None
            total = 0.0
            for index in order[step * options.batch_size : (step + 1) * options.batch_size]:
                batch = windows[index : index + 1].to(device)
                loss = _window_backward(student, teacher, batch, options, use_hidden, autocast,
                                        embedding) / options.batch_size
                if not math.isfinite(loss):
                    raise HealingError(
                        f"loss became {loss} at step {step + 1}; nothing was kept (lower the learning rate, "
                        f"now {options.learning_rate:g})"
                    )
                total += loss
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for parameter, view, rows in slices:
                view.grad = None if parameter.grad is None else parameter.grad[rows]
            optimizer.step()
            schedule.step()
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
    finally:
        bar.close()
        teacher.train(teacher_was_training)
        model.train(student_was_training)
        if student.supports_gradient_checkpointing and not checkpointed:
            student.activation_checkpointing_disable()
            student.disable_input_require_grads()  # the embedding hook that enabling added
        for parameter in params:
            parameter.grad = None
    if options.train == "lora":
        _merge_lora(student, model)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return HealResult(steps=steps, tokens=steps * per_step, seconds=time.perf_counter() - start, losses=losses)


def _check_windows(windows, student: nn.Module) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise OptiPFairError(f"windows must be a non-empty 2-D tensor of token ids [n, seq_len], got {shape}")
    if windows.dtype not in (torch.int32, torch.int64):
        raise OptiPFairError(f"windows must hold integer token ids, got {windows.dtype}")
    vocab = student.get_output_embeddings().weight.shape[0]
    if windows.min() < 0 or windows.max() >= vocab:
        raise HealingError(f"windows hold token ids outside the model's vocabulary of {vocab}: wrong tokenizer")
    return windows.long()


def _window_order(count: int, needed: int, generator: torch.Generator) -> List[int]:
    """`needed` window indices: shuffled passes over all windows (one pass when the budget allows)."""
    order: List[int] = []
    while len(order) < needed:
        order += torch.randperm(count, generator=generator).tolist()
    return order[:needed]


def _window_backward(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, options: HealOptions,
                     use_hidden: bool, autocast, embedding: "_EmbeddingGradients | None" = None) -> float:
    """The loss of one window [1, seq_len], its gradients (times 1 / batch_size) added to the student's.

    The loss: KL(teacher || student) per token on the next-token distributions, plus the hard-label
    and hidden-state terms. Both models run their decoder body once; the head's logits are computed
    a chunk of positions at a time (`optipfair.evaluation.head`), each chunk's loss backpropagated at
    once into the student's last hidden state (a detached leaf), so that the two models' full logits
    never exist for the whole window. That gradient then goes through the body in one backward pass:
    the same loss and gradients as the unchunked sum, with logits memory bounded by the chunk.
    `embedding` (default: made here) adds the embedding's and the head's weight gradients in place.
    """
    t, scale = options.temperature, 1.0 / options.batch_size
    embedding = embedding or _EmbeddingGradients(student)
    with embedding.frozen():  # the embedding's and head's gradients are added by `embedding`
        with autocast:
            with torch.no_grad():
                target = decoder_body(teacher)(input_ids=batch.to(next(teacher.parameters()).device), use_cache=False,
                                               output_hidden_states=use_hidden)
            with embedding.lookups():
                output = decoder_body(student)(input_ids=batch, use_cache=False, output_hidden_states=use_hidden)
        last = output.last_hidden_state[0]
        leaf = last.detach().requires_grad_(True)
        positions = len(leaf)
        labels = batch[0, 1:]  # position i predicts token i + 1; the last position has no label
        chunk = chunk_positions(student.get_output_embeddings().weight.shape[0])
        total = 0.0
        for start in range(0, positions, chunk):
            stop = min(start + chunk, positions)
            with autocast:
                logits = head_logits(student, leaf[start:stop], embedding.head)
                with torch.no_grad():
                    teacher_logits = head_logits(teacher, target.last_hidden_state[0, start:stop]).to(logits.device)
            student_logp, teacher_logp = F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1)
            loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") * t * t / positions
            labelled = min(stop, positions - 1) - start
            if options.label_weight > 0 and labelled > 0:
                loss = loss + options.label_weight * F.cross_entropy(
                    logits[:labelled], labels[start:start + labelled], reduction="sum") / (positions - 1)
            (loss * scale).backward()
            total += loss.item()
        outputs, gradients = [last], [leaf.grad]
        if use_hidden:
            # Each layer's output against the teacher's, scaled by the teacher's own size there, so
            # that layers with large activations do not dominate.
            with autocast:
                terms = [
                    F.mse_loss(s.float(), h.to(s.device).float()) / h.float().pow(2).mean().clamp_min(1e-6).to(s.device)
                    for s, h in zip(output.hidden_states[1:], target.hidden_states[1:])
                ]
                hidden_loss = options.hidden_weight * torch.stack(terms).mean()
            outputs.append(hidden_loss * scale)
            gradients.append(None)
            total += hidden_loss.item()
        torch.autograd.backward(outputs, gradients)
    embedding.add_lookup_gradients()
    return total


class _EmbeddingGradients:
    """The weight gradients of the student's embedding lookup and output head, added into `.grad` in place.

    Autograd builds each as a whole [vocabulary, hidden] matrix before adding it (the lookup's is dense
    although a window touches a few hundred rows): one temporary of the embedding's size per head chunk and
    per window. Here, while a window's forward and backward run, those weights take no gradient
    (`frozen`); the head's gradient comes from its logits' gradient, `GRAD_ROWS` rows at a time (`head`),
    and the lookup's from its output's gradient, the rows the window used (`lookups`,
    `add_lookup_gradients`). The same matrices products and sums in the same order: the same floats.
    """

    def __init__(self, student: nn.Module):
        lookup, head = student.get_input_embeddings(), student.get_output_embeddings()
        self.lookup_weight = lookup.weight if lookup.weight.requires_grad else None
        self.head_module = head if head.weight.requires_grad else None
        self.weights = [w for w in {id(w): w for w in (self.lookup_weight, head.weight) if w is not None and
                                    w.requires_grad}.values()]
        self._lookups: List[Tuple[torch.Tensor, torch.Tensor, int]] = []

    def frozen(self):
        return _Frozen(self.weights) if self.weights else nullcontext()

    def lookups(self):
        return _Lookups(self.lookup_weight, self._lookups) if self.lookup_weight is not None else nullcontext()

    @property
    def head(self):
        """The head as `head_logits` calls it, its weight's gradient added from the logits' gradient."""
        if self.head_module is None:
            return None
        module = self.head_module

        def head(hidden: torch.Tensor) -> torch.Tensor:
            logits = module(hidden)
            if logits.requires_grad:
                # F.linear's backward: grad_weight = grad_logits^T @ hidden, in the logits' dtype (bf16 under autocast)
                logits.register_hook(lambda grad: _add_rows(
                    module.weight, lambda rows: grad[:, rows].t().mm(hidden.detach().to(grad.dtype))))
            return logits

        head.weight = module.weight  # `head_logits` callers read the vocabulary from it
        return head

    def add_lookup_gradients(self) -> None:
        """Add the recorded lookups' gradients into the embedding's `.grad`, as the embedding's backward sums them."""
        weight = self.lookup_weight
        for ids, output, padding in self._lookups:
            if output.grad is None:
                continue
            ids, grad = ids.reshape(-1), output.grad.reshape(-1, weight.shape[1]).to(weight.dtype)
            keep = ids != padding  # the padding row takes no gradient
            rows, inverse = torch.unique(ids[keep], return_inverse=True)
            # Each used row's sum in window order, from zero, as embedding_dense_backward adds them
            sums = torch.zeros(len(rows), weight.shape[1], dtype=weight.dtype, device=weight.device)
            sums.index_add_(0, inverse, grad[keep])
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, rows, sums)
        self._lookups.clear()


class _Frozen:
    """The weights take no gradient inside the block (autograd leaves them to `_EmbeddingGradients`)."""

    def __init__(self, weights: List[torch.Tensor]):
        self.weights = weights

    def __enter__(self):
        for weight in self.weights:
            weight.requires_grad_(False)

    def __exit__(self, *exc):
        for weight in self.weights:
            weight.requires_grad_(True)


_EMBEDDING_ARGS = inspect.signature(F.embedding)


class _Lookups(TorchFunctionMode):
    """Records each `F.embedding` of `weight` (ids, output, padding row): its output made to require grad."""

    def __init__(self, weight: torch.Tensor, record: list):
        super().__init__()
        self.weight, self.record = weight, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func is F.embedding:
            bound = _EMBEDDING_ARGS.bind(*args, **kwargs).arguments
            if bound["weight"] is self.weight:
                if bound.get("scale_grad_by_freq"):
                    raise HealingError("an embedding that scales its gradient by token frequency cannot be healed")
                padding = bound.get("padding_idx")
                padding = -1 if padding is None else padding % self.weight.shape[0]
                output.requires_grad_(True)
                self.record.append((bound["input"], output, padding))
        return output


def _add_rows(weight: torch.Tensor, block) -> None:
    """`weight.grad += block(rows)` for `GRAD_ROWS` rows at a time (`.grad` is set when there is none)."""
    first = weight.grad is None
    if first:
        weight.grad = torch.empty_like(weight)
    for start in range(0, weight.shape[0], GRAD_ROWS):
        rows = slice(start, start + GRAD_ROWS)
        part = block(rows).to(weight.dtype)
        if first:
            weight.grad[rows].copy_(part)
        else:
            weight.grad[rows].add_(part)


def _row_slices(params: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor, slice]]:
    """(parameter, view, rows): each parameter cut into views of `GRAD_ROWS` rows (whole when smaller), for
    AdamW to step one view at a time. Its update is elementwise, so it is the same on the views, but
    its temporaries (the denominator's square root) are a view's size, not the embedding's."""
    slices = []
    for parameter in params:
        length = parameter.shape[0] if parameter.dim() > 1 else 0
        if length <= GRAD_ROWS:
            slices.append((parameter, parameter.detach(), slice(None)))
            continue
        for start in range(0, length, GRAD_ROWS):
            rows = slice(start, start + GRAD_ROWS)
            slices.append((parameter, parameter.detach()[rows], rows))
    return slices


def _trainable(student: nn.Module, options: HealOptions) -> nn.Module:
    """The module to train: the student with only the chosen weights trainable, or a LoRA wrapper of it."""
    if options.train == "all":
        for parameter in student.parameters():
            parameter.requires_grad_(True)
        return student
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    adapter = get_adapter(student)
    if options.train == "mlp":
        for mlp in adapter.mlps:
            for parameter in mlp.parameters():
                parameter.requires_grad_(True)
        return student
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise OptionError("train", "lora needs the peft package: pip install 'optipfair[heal]'") from None
    names = sorted({name.rsplit(".", 1)[-1] for mlp in adapter.mlps for name, m in mlp.named_modules()
                    if isinstance(m, nn.Linear)})
    names += ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_rank, lora_dropout=0.0, target_modules=names)
    return get_peft_model(student, config)


def _merge_lora(student: nn.Module, wrapped: nn.Module) -> None:
    """Fold the LoRA adapters into the student's own weights, so it saves as a plain model."""
    wrapped.merge_and_unload()
