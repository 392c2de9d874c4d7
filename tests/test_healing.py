"""Healing: a pruned tiny model trained against its unpruned self, the checks before training, the CLI."""

import copy
import json
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import make_tiny_model
from optipfair import HealingError, HealOptions, OptionError, heal, prune
from optipfair.cli import app
from optipfair.data import default_texts, token_windows
from optipfair.healing import _window_backward, check_tokenizers
from optipfair.pruning.options import PruningOptions

SEQ_LEN = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train 20x faster on one thread than on two that share a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts(tiny_tokenizer):
    """(training windows, held-out windows): calibration and evaluation docs, disjoint topics."""
    calibration, evaluation = default_texts()
    return (token_windows(tiny_tokenizer, calibration, 2048, SEQ_LEN),
            token_windows(tiny_tokenizer, evaluation, 512, SEQ_LEN))


def teacher_and_student(percentage=50, **overrides):
    teacher = make_tiny_model("llama", intermediate_size=128, **overrides)
    student = prune(copy.deepcopy(teacher), PruningOptions(method="MAW", pruning_percentage=percentage),
                    show_progress=False)
    return teacher, student


@torch.no_grad()
def kl_to_teacher(student, teacher, windows) -> float:
    s = F.log_softmax(student(input_ids=windows).logits, -1)
    t = F.log_softmax(teacher(input_ids=windows).logits, -1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("train", ["mlp", "all"])
def test_healing_brings_the_student_closer_to_the_teacher_on_held_out_text(texts, train):
    teacher, student = teacher_and_student()
    training, held_out = texts
    before = kl_to_teacher(student, teacher, held_out)
    frozen = {n: p.clone() for n, p in student.named_parameters() if ".mlp." not in n}
    options = HealOptions(num_tokens=2048, seq_len=SEQ_LEN, learning_rate=3e-3, train=train, batch_size=4,
                          label_weight=0)  # the teacher alone: a random tiny teacher is far from the text
    result = heal(student, teacher, training, options, show_progress=False)
    after = kl_to_teacher(student, teacher, held_out)
    assert after < 0.9 * before, (before, after)
    assert (result.steps, result.tokens) == (16, 2048) and len(result.losses) == 16
    assert all(math.isfinite(loss) for loss in result.losses)
    changed = [n for n, p in student.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert (changed == []) == (train == "mlp")  # "mlp" trains nothing else; "all" does
    assert all(p.requires_grad for p in student.parameters())  # handed back as it came


def test_the_label_term_teaches_the_text_itself_and_weighs_as_asked(texts):
    """A random teacher knows nothing of the text: the KL alone keeps the student as ignorant; with
    the labels, the student's held-out perplexity on the same kind of text falls below it."""
    from optipfair.evaluation.perplexity import perplexity

    training, held_out = texts
    results = {}
    for weight in (0.0, 1.0):
        teacher, student = teacher_and_student()
        heal(student, teacher, training, HealOptions(num_tokens=2048, seq_len=SEQ_LEN, learning_rate=3e-3,
                                                     batch_size=4, label_weight=weight), show_progress=False)
        results[weight] = perplexity(student, held_out)
    assert results[1.0] < 0.9 * results[0.0], results  # 741 against 896 here

    # The loss is KL + weight x cross-entropy of each position on the next token, as documented.
    teacher, student = teacher_and_student()
    batch = held_out[:1]
    kl, both = (_window_backward(student, teacher, batch, HealOptions(seq_len=SEQ_LEN, num_tokens=SEQ_LEN,
                                                                      label_weight=weight), False, nullcontext())
                for weight in (0, 2.5))
    with torch.no_grad():
        nll = F.cross_entropy(student(input_ids=batch).logits[0, :-1], batch[0, 1:])
    assert both == pytest.approx(kl + 2.5 * nll.item(), rel=1e-5)


def _unchunked_loss(student, teacher, batch, options, use_hidden):
    """The documented loss from the models' whole logits: KL + label_weight x CE (+ hidden_weight x hidden term)."""
    output = student(input_ids=batch, output_hidden_states=use_hidden)
    with torch.no_grad():
        target = teacher(input_ids=batch, output_hidden_states=use_hidden)
    t = options.temperature
    kl = F.kl_div(F.log_softmax(output.logits / t, -1), F.log_softmax(target.logits / t, -1), log_target=True,
                  reduction="none").sum(-1).mean() * t * t
    loss = kl + options.label_weight * F.cross_entropy(output.logits[0, :-1], batch[0, 1:])
    if use_hidden:
        loss = loss + options.hidden_weight * torch.stack([
            F.mse_loss(s, h) / h.pow(2).mean() for s, h in zip(output.hidden_states[1:], target.hidden_states[1:])
        ]).mean()
    return loss


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: tied head, soft-capped logits
def test_chunked_loss_and_gradients_are_the_whole_logits_ones(texts, arch, monkeypatch):
    from optipfair.evaluation import head

    teacher = make_tiny_model(arch, intermediate_size=128)
    student = make_tiny_model(arch, intermediate_size=128, seed=1)
    batch = texts[1][:1]
    options = HealOptions(seq_len=SEQ_LEN, num_tokens=SEQ_LEN, label_weight=0.7, hidden_weight=0.3, temperature=2.0,
                          batch_size=2)
    expected = _unchunked_loss(student, teacher, batch, options, use_hidden=True)
    expected.backward()
    whole = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # 5 positions per chunk: 32 positions end in a chunk of 2, the last (unlabelled) position mid-chunk.
    monkeypatch.setattr(head, "HEAD_CHUNK_LOGITS", 5 * student.config.vocab_size)
    loss = _window_backward(student, teacher, batch, options, True, nullcontext())
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for name, parameter in student.named_parameters():  # gradients scaled by 1 / batch_size, as the loss is
        torch.testing.assert_close(parameter.grad * options.batch_size, whole[name], rtol=1e-4, atol=1e-6)


def test_healing_with_small_chunks_trains_the_same_weights(texts, monkeypatch):
    from optipfair.evaluation import head

    def healed(chunk_positions):
        monkeypatch.setattr(head, "HEAD_CHUNK_LOGITS", chunk_positions * 512)
        teacher, student = teacher_and_student()
        calls = []
        student.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
        options = HealOptions(num_tokens=256, seq_len=SEQ_LEN, learning_rate=1e-3, batch_size=2)
        result = heal(student, teacher, texts[0], options, show_progress=False)
        return result.losses, student.state_dict(), calls

    losses, weights, calls = healed(SEQ_LEN)
    small_losses, small_weights, small_calls = healed(3)
    assert calls == [SEQ_LEN] * 8 and max(small_calls) == 3  # the head never sees more positions than a chunk
    assert small_losses == pytest.approx(losses, rel=1e-5)
    for name, weight in weights.items():
        torch.testing.assert_close(small_weights[name], weight, rtol=1e-4, atol=1e-6)


class _PlainGradients:
    """Healing's plain autograd: the embedding's and the head's gradients built whole, as `_EmbeddingGradients` does not."""

    head = None

    def __init__(self, student):
        pass

    def frozen(self):
        return nullcontext()

    lookups = frozen

    def add_lookup_gradients(self):
        pass


def _plain(monkeypatch):
    """Switch off healing's memory savers: no checkpointing, whole-matrix gradients and AdamW steps."""
    from transformers import PreTrainedModel

    from optipfair import healing

    monkeypatch.setattr(healing, "_EmbeddingGradients", _PlainGradients)
    monkeypatch.setattr(healing, "GRAD_ROWS", 2**40)
    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", lambda self, *args, **kwargs: None)


def _family_pair(path):
    from optipfair.io import load_model

    teacher, tokenizer = load_model(str(path), "cpu", "float32")
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():  # a student that differs from its teacher everywhere, embedding included
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return teacher, student, tokenizer


def test_memory_savers_give_the_plain_gradients_to_the_bit(family_model, monkeypatch):
    """Checkpointed layers, in-place embedding and head gradients (several blocks of rows, a padding token and
    repeated tokens in the window, tied and untied heads): every gradient is autograd's own, bit for bit."""
    from optipfair import healing
    from optipfair.evaluation import head

    teacher, student, tokenizer = _family_pair(family_model.path)
    calibration, _ = default_texts()
    batch = token_windows(tokenizer, calibration, SEQ_LEN, SEQ_LEN)[:1].clone()
    padding = student.get_input_embeddings().padding_idx
    batch[0, 3] = batch[0, 9] = padding if padding is not None else batch[0, 5]
    options = HealOptions(seq_len=SEQ_LEN, num_tokens=SEQ_LEN, label_weight=0.7, batch_size=2)
    monkeypatch.setattr(head, "HEAD_CHUNK_LOGITS", 7 * student.config.vocab_size)  # 5 chunks
    monkeypatch.setattr(healing, "GRAD_ROWS", 100)
    attention = healing.get_adapter(student).layers[0].self_attn  # inside the layer's checkpointed forward
    calls = []
    attention.register_forward_pre_hook(lambda *args: calls.append(1))
    student.activation_checkpointing_enable({"use_reentrant": False})
    student.train()
    for parameter in student.parameters():  # a gradient already there, as from the batch's first window
        parameter.grad = torch.full_like(parameter, 0.5)
    loss = _window_backward(student, teacher, batch, options, False, nullcontext())
    saved = {n: p.grad for n, p in student.named_parameters()}
    assert len(calls) == 2  # the layer ran again in the backward pass: checkpointed

    student.activation_checkpointing_disable()
    for parameter in student.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    plain = _window_backward(student, teacher, batch, options, False, nullcontext(), _PlainGradients(student))
    assert len(calls) == 3
    assert loss == plain
    for name, parameter in student.named_parameters():
        assert torch.equal(saved[name], parameter.grad), name


@pytest.mark.parametrize("family_name", ["smollm2", "gemma3"])
def test_healing_with_memory_savers_trains_the_plain_weights_to_the_bit(family_name, tmp_path, monkeypatch):
    """Whole healing runs, AdamW stepping 100 rows at a time: the weights come out as plain autograd's."""
    from families import save_family_model

    from optipfair import healing

    path = save_family_model(family_name, tmp_path / family_name)
    calibration, _ = default_texts()
    options = HealOptions(num_tokens=4 * SEQ_LEN, seq_len=SEQ_LEN, learning_rate=1e-3, batch_size=2)

    def healed(plain):
        teacher, student, tokenizer = _family_pair(path)
        with monkeypatch.context() as patch:
            if plain:
                _plain(patch)
            else:
                patch.setattr(healing, "GRAD_ROWS", 100)
            result = heal(student, teacher, token_windows(tokenizer, calibration, 8 * SEQ_LEN, SEQ_LEN), options,
                          show_progress=False)
        return result.losses, student

    losses, student = healed(plain=False)
    plain_losses, plain_student = healed(plain=True)
    assert losses == plain_losses
    plain_weights = plain_student.state_dict()
    for name, weight in student.state_dict().items():
        assert torch.equal(weight, plain_weights[name]), name
    # Handed back as it came: checkpointing off, every weight trainable, no gradients held.
    assert not student.is_activation_checkpointing and not getattr(student, "_require_grads_hooks", None)
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


def test_budget_counts_tokens_and_reuses_windows_when_short(texts):
    teacher, student = teacher_and_student()
    options = HealOptions(num_tokens=1024, seq_len=SEQ_LEN, batch_size=4)
    result = heal(student, teacher, texts[0][:8], options, show_progress=False)
    assert (result.steps, result.tokens) == (8, 1024)  # 8 windows of 32, seen four times: 32 windows in steps of 4


def test_same_seed_same_weights_other_seed_other_weights(texts):
    def healed(seed):
        teacher, student = teacher_and_student()
        options = HealOptions(num_tokens=512, seq_len=SEQ_LEN, learning_rate=1e-3, seed=seed, batch_size=2)
        heal(student, teacher, texts[0], options, show_progress=False)
        return student.state_dict()

    first, again, other = healed(0), healed(0), healed(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_depth_pruned_student_heals_on_logits(texts, tiny_tokenizer):
    teacher = make_tiny_model("llama", intermediate_size=128, num_hidden_layers=3)
    student = prune(copy.deepcopy(teacher), PruningOptions(pruning_type="DEPTH", num_layers_to_remove=1),
                    calibration_data=texts[0][:4], show_progress=False)
    before = kl_to_teacher(student, teacher, texts[1])
    heal(student, teacher, texts[0], HealOptions(num_tokens=1024, seq_len=SEQ_LEN, learning_rate=3e-3, train="all",
                                                 hidden_weight=1.0, label_weight=0), show_progress=False)
    assert kl_to_teacher(student, teacher, texts[1]) < before


@pytest.mark.parametrize(
    "student_overrides, message",
    [
        ({"vocab_size": 640}, "vocabulary has 640 tokens, the teacher's 512"),
        ({"hidden_size": 48}, "hidden size is 48, the teacher's 32"),
        ({"num_hidden_layers": 3}, "student has 3 layers, the teacher 2"),
        ({"intermediate_size": 256}, "256 wide, wider than the teacher's 128"),
        ({"num_hidden_layers": 1, "intermediate_size": 64}, "only depth pruning removes layers"),
    ],
)
def test_a_student_that_is_not_a_pruned_descendant_is_refused_before_training(texts, student_overrides, message):
    teacher = make_tiny_model("llama", intermediate_size=128)
    student = make_tiny_model("llama", **{"intermediate_size": 128, **student_overrides})
    weights = copy.deepcopy(student.state_dict())
    with pytest.raises(HealingError, match=message):
        heal(student, teacher, texts[0], HealOptions(num_tokens=256, seq_len=SEQ_LEN), show_progress=False)
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize(
    "field, value",
    [("num_tokens", 0), ("num_tokens", -4096), ("num_tokens", 16), ("learning_rate", 0.0),
     ("learning_rate", float("nan")), ("train", "embeddings"), ("seq_len", 1), ("batch_size", 0),
     ("label_weight", -1), ("label_weight", float("inf"))],
)
def test_bad_options_name_the_field(field, value):
    with pytest.raises(OptionError) as error:
        HealOptions(**{"seq_len": 32, field: value})
    assert error.value.field == field


def test_nan_loss_stops_and_names_the_step(texts):
    teacher, student = teacher_and_student()
    with torch.no_grad():  # one MLP weight that overflows at the first step
        student.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(HealingError, match=r"loss became nan at step 1; nothing was kept"):
        heal(student, teacher, texts[0], HealOptions(num_tokens=256, seq_len=SEQ_LEN), show_progress=False)


def test_a_diverging_learning_rate_is_caught_at_the_step_it_breaks(texts):
    teacher, student = teacher_and_student()
    with torch.no_grad():  # weights big enough that a step of lr 0.9 overflows float32
        for parameter in student.model.layers[0].mlp.parameters():
            parameter.mul_(1e18)
    with pytest.raises(HealingError, match=r"loss became (nan|inf) at step \d+; nothing was kept"):
        heal(student, teacher, texts[0], HealOptions(num_tokens=1024, seq_len=SEQ_LEN, learning_rate=0.9),
             show_progress=False)


def test_tokenizers_with_different_vocabularies_are_refused(tiny_tokenizer):
    check_tokenizers(tiny_tokenizer, copy.deepcopy(tiny_tokenizer))
    check_tokenizers(tiny_tokenizer, None)
    bigger = copy.deepcopy(tiny_tokenizer)
    bigger.add_tokens(["<extra>"])
    with pytest.raises(HealingError, match="tokenizer has 449 tokens, the teacher's 448"):
        check_tokenizers(bigger, tiny_tokenizer)


# --- the command --------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("pruned") / "maw-50"
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", path, "--pruning-percentage", 50)
    assert result.exit_code == 0, result.output
    return path


def test_heal_command_saves_a_model_that_reloads(tiny_model_dir, pruned_dir, tmp_path):
    out = tmp_path / "healed"
    result = invoke("heal", "--model-path", pruned_dir, "--teacher-path", tiny_model_dir, "--output-path", out,
                    "--num-tokens", 256, "--seq-len", SEQ_LEN, "--learning-rate", 1e-3, "--seed", 3, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["steps"], summary["tokens"], summary["seed"]) == (8, 256, 3) and len(summary["losses"]) == 8
    healed = AutoModelForCausalLM.from_pretrained(out)
    assert healed.config.intermediate_size == 64 and (out / "tokenizer.json").is_file()
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert not torch.equal(healed.model.layers[0].mlp.up_proj.weight, pruned.model.layers[0].mlp.up_proj.weight)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("wide") / "hidden-48"
    make_tiny_model("llama", hidden_size=48).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "args, error",
    [
        (["--num-tokens", 0], "error: --num-tokens: must be a whole number >= 1, got 0"),
        (["--num-tokens", -5], "error: --num-tokens: must be a whole number >= 1, got -5"),
        (["--learning-rate", 0], "error: --learning-rate: must be a number in (0, 1), got 0.0"),
        (["--teacher-path", "WIDE"], "hidden size is 32, the teacher's 48"),
        (["--teacher-path", "MISSING"], "does not exist"),
    ],
)
def test_heal_bad_input_is_one_line_and_writes_nothing(args, error, tiny_model_dir, pruned_dir, wide_dir, tmp_path):
    out = tmp_path / "healed"
    where = {"WIDE": wide_dir, "MISSING": tmp_path / "missing"}
    args = [where.get(a, a) for a in args]
    teacher = [] if "--teacher-path" in args else ["--teacher-path", tiny_model_dir]
    result = invoke("heal", "--model-path", pruned_dir, "--output-path", out, "--seq-len", SEQ_LEN, *teacher, *args)
    assert result.exit_code == 1
    assert error in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_lora_healing_folds_the_adapters_into_a_plain_model(texts, tmp_path):
    pytest.importorskip("peft", reason="train='lora' needs the [heal] extra")
    teacher, student = teacher_and_student()
    before = kl_to_teacher(student, teacher, texts[1])
    heal(student, teacher, texts[0], HealOptions(num_tokens=1024, seq_len=SEQ_LEN, learning_rate=3e-3, train="lora",
                                                 lora_rank=4, label_weight=0), show_progress=False)
    assert kl_to_teacher(student, teacher, texts[1]) < before
    assert type(student.model.layers[0].mlp.up_proj) is torch.nn.Linear  # no LoRA layer left behind
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)
