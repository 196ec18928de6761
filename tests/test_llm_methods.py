"""Every fine-tuning method on tiny Gemma-2 / Llama / Gemma-3: which parameters train, how many, and that they move."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from hwtools.errors import UserError
from hwtools.llm.generate import generate_token_ids
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import (
    METHODS,
    MethodConfig,
    apply_method,
    default_lr,
    is_soft_prompt,
    load_finetuned,
    needs_4bit,
    prefix_init_ids,
    save_finetuned,
    trainable_groups,
)
from hwtools.llm.models import load_model_and_tokenizer
from hwtools.train.meters import count_parameters
from tests.tiny_models import (
    TINY_ARCHS,
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_HIDDEN,
    TINY_INTERMEDIATE,
    TINY_KV_HEADS,
    TINY_LAYERS,
    one_torch_thread,  # noqa: F401 - autouse fixture
    prompts_of,
    tiny_chat_batch,
)

CFG = dict(num_virtual_tokens=5, lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
H, Q, KV, I, L = TINY_HIDDEN, TINY_HEADS * TINY_HEAD_DIM, TINY_KV_HEADS * TINY_HEAD_DIM, TINY_INTERMEDIATE, TINY_LAYERS


def checksums(model) -> dict[str, str]:
    """sha1 of every parameter's bytes (4-bit weights included), by name."""
    return {
        name: hashlib.sha1(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, p in model.named_parameters()
    }


def layer_params(arch: str) -> int:
    attn = H * Q + 2 * H * KV + Q * H
    norms = {"llama": 2 * H, "gemma2": 4 * H, "gemma3": 4 * H + 2 * TINY_HEAD_DIM}[arch]  # gemma3: q/k norms
    return attn + 3 * H * I + norms


def expected_trainable(arch: str, method: str, vocab: int) -> int:
    """The analytical trainable-parameter count of `method` on the tiny `arch` with CFG."""
    n, r = CFG["num_virtual_tokens"], CFG["lora_r"]
    targets = [(H, Q), (H, KV), (H, KV), (Q, H)]  # (d_in, d_out) of q, k, v, o
    if method == "prompt-tuning":
        return n * H
    if method == "p-tuning":
        return n * H + 3 * (H * H + H)  # embedding + MLP H->H->H->H with biases
    if method == "prefix-tuning":
        return n * L * 2 * KV  # a key and a value of KV dims per layer and virtual token
    if method in ("lora", "rslora", "qlora"):
        return L * sum(r * (d_in + d_out) for d_in, d_out in targets)
    if method == "dora":
        return L * sum(r * (d_in + d_out) + d_out for d_in, d_out in targets)  # + magnitude per output
    if method == "partial":
        return 4 * layer_params(arch)
    embeddings = vocab * H * (2 if arch == "llama" else 1)  # tiny llama has an untied lm_head
    return embeddings + L * layer_params(arch) + H  # full: + final norm


def expected_trainable_names(method: str, name: str) -> bool:
    """Whether parameter `name` should be trainable under `method` (partial: the default 2 + 2 layers)."""
    if method in ("prompt-tuning", "p-tuning", "prefix-tuning"):
        return "prompt_encoder" in name
    if method in ("lora", "rslora", "qlora"):
        return "lora_A" in name or "lora_B" in name
    if method == "dora":
        return "lora_A" in name or "lora_B" in name or "lora_magnitude_vector" in name
    if method == "partial":
        return any(f"layers.{i}." in name for i in (0, 1, L - 2, L - 1))
    return True


def train_steps(model, batch, steps=8, lr=1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@dataclasses.dataclass
class Tuned:
    """One method on one tiny arch: applied, trained, used to generate, saved and reloaded."""

    model: torch.nn.Module  # trained
    tok: object
    logged: list[str]  # what apply_method logged
    total_before: int  # parameters of the base model
    base_sums: dict[str, str]  # checksums of the untouched base model, by its own names
    base_names: dict[int, str]  # id -> name of the base model's parameter objects
    before: dict[str, str]  # checksums after apply_method, before training
    after: dict[str, str]  # ... after training
    losses: list[float]
    tokens: list  # the trained model's generations
    final: Path  # where save_finetuned wrote it
    reloaded_tokens: list  # the generations of load_finetuned's model


def tune(model_dir: Path, method: str, tmp: Path) -> Tuned:
    """Apply `method` to the saved tiny model, train it, generate, save, reload and generate again."""
    cfg = MethodConfig(method=method, **CFG)
    model, tok = load_model_and_tokenizer(str(model_dir), tmp, quantize_4bit=needs_4bit(method))
    base_sums = checksums(model)
    base_names = {id(p): name for name, p in model.named_parameters()}
    total_before = count_parameters(model)["total"]
    logged = []
    model = apply_method(model, cfg, tok, log=logged.append)
    before = checksums(model)
    losses = train_steps(model, tiny_chat_batch(tok))
    after = checksums(model)
    prompts = prompts_of()
    tokens = generate_token_ids(model, tok, prompts, max_new_tokens=6, batch_size=3)
    save_finetuned(model, tok, tmp / "run" / "final", cfg, base_model=str(model_dir))
    loaded, tok2 = load_finetuned(tmp / "run", tmp)
    reloaded_tokens = generate_token_ids(loaded, tok2, prompts, max_new_tokens=6, batch_size=3)
    return Tuned(model, tok, logged, total_before, base_sums, base_names, before, after, losses, tokens,
                 tmp / "run" / "final", reloaded_tokens)


@pytest.fixture(scope="module")
def tuned(tiny_dirs, tmp_path_factory):
    """tuned(arch, method) -> Tuned, run once per pair for the whole module: the tests below only look."""
    runs = {}

    def get(arch: str, method: str) -> Tuned:
        if (arch, method) not in runs:
            runs[arch, method] = tune(tiny_dirs[arch], method, tmp_path_factory.mktemp(f"{arch}-{method}"))
        return runs[arch, method]

    return get


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def changed_names(run: Tuned) -> set[str]:
    return {n for n in run.after if run.after[n] != run.before[n]}


every_method = pytest.mark.parametrize("method", METHODS)
every_arch = pytest.mark.parametrize("arch", TINY_ARCHS)
ADAPTERS = ("prompt-tuning", "prefix-tuning", "p-tuning", "lora", "dora", "rslora", "qlora")  # base stays frozen


@every_method
@every_arch
def test_method_trains_the_analytical_number_of_parameters(arch, method, tuned):
    run = tuned(arch, method)
    counts = count_parameters(run.model)
    assert counts["trainable"] == expected_trainable(arch, method, len(run.tok))
    assert f"trainable {counts['trainable']:,} of {counts['total']:,}" in run.logged[0]


@every_method
@every_arch
def test_method_marks_only_its_parameters_trainable(arch, method, tuned):
    model = tuned(arch, method).model
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if expected_trainable_names(method, n)}


@pytest.mark.parametrize("method", ADAPTERS)
@every_arch
def test_adapter_methods_add_their_parameters_to_a_frozen_base(arch, method, tuned):
    run = tuned(arch, method)
    counts = count_parameters(run.model)
    assert not any(id(p) in run.base_names for p in run.model.parameters() if p.requires_grad)  # base fully frozen
    assert counts["total"] == run.total_before + counts["trainable"]  # 4-bit weights counted unpacked


@every_method
@every_arch
def test_training_lowers_the_loss(arch, method, tuned):
    losses = tuned(arch, method).losses
    assert losses[-1] < losses[0] - 0.05, losses


@every_method
@every_arch
def test_training_moves_every_trainable_tensor_and_nothing_else(arch, method, tuned):
    run = tuned(arch, method)
    assert changed_names(run) == trainable_names(run.model)


@every_method
@every_arch
def test_frozen_base_tensors_stay_bit_identical(arch, method, tuned):
    # the base model's own tensors, wherever PEFT moved them, are bit-identical unless the method trains them
    run = tuned(arch, method)
    for name, p in run.model.named_parameters():
        if id(p) in run.base_names and not p.requires_grad:
            assert run.after[name] == run.base_sums[run.base_names[id(p)]], name


@every_arch
def test_partial_trains_the_first_two_and_last_two_layers_only(arch, tuned):
    changed = changed_names(tuned(arch, "partial"))
    moved_layers = sorted({int(n.split("layers.")[1].split(".")[0]) for n in changed})
    assert moved_layers == [0, 1, L - 2, L - 1]
    assert not any("embed" in n or n.startswith("model.norm") for n in changed)


@every_arch
def test_partial_names_the_layers_it_trains(arch, tuned):
    run = tuned(arch, "partial")
    assert "model.layers.0 (" in run.logged[1] and "model.layers.2 (" not in run.logged[1]
    assert [g for g, _ in trainable_groups(run.model)] == [f"model.layers.{i}" for i in (0, 1, L - 2, L - 1)]


@every_method
@every_arch
def test_final_folder_names_the_method_and_its_base(arch, method, tuned, tiny_dirs):
    final = tuned(arch, method).final
    meta = json.loads((final / "finetune.json").read_text())
    assert meta["method"] == method and meta["base_model"] == str(tiny_dirs[arch].resolve())
    assert (final / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("method", ADAPTERS)
@every_arch
def test_adapter_methods_save_the_adapter_only(arch, method, tuned):
    final = tuned(arch, method).final
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()


@every_arch
def test_partial_saves_its_layers_only(arch, tuned):
    from safetensors import safe_open

    final = tuned(arch, "partial").final
    meta = json.loads((final / "finetune.json").read_text())
    with safe_open(str(final / "partial_layers.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sorted({int(k.split(".")[2]) for k in keys}) == [0, 1, L - 2, L - 1] and meta["layers"] == [0, 1, 4, 5]


@every_method
@every_arch
def test_saved_run_reloads_to_the_same_generations(arch, method, tuned):
    run = tuned(arch, method)
    assert run.reloaded_tokens == run.tokens


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefix_tuning_changes_generation(arch, tiny_dirs, tmp_path):
    base, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    prompts = prompts_of()
    base_tokens = generate_token_ids(base, tok, prompts, max_new_tokens=6, batch_size=1)
    torch.manual_seed(0)  # independent of the random state the tests before left
    model = apply_method(base, MethodConfig(method="prefix-tuning", **CFG), tok, log=None)
    train_steps(model, tiny_chat_batch(tok), steps=3)
    prefixed = generate_token_ids(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert prefixed != base_tokens
    # the trap generate_token_ids avoids: with the cache (naming any other method turns it on) PEFT drops the
    # prefix, and every prompt gets exactly the base model's answer. One row per call on both sides: in padded
    # batches PEFT also loses the padding mask, a second trap that would hide this one
    cached = generate_token_ids(model, tok, prompts, max_new_tokens=6, batch_size=1, method="lora")
    assert cached == base_tokens


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefix_starts_as_the_init_text_in_front_of_every_input(arch, tiny_dirs, tmp_path):
    base, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    base.eval()
    cfg = MethodConfig(method="prefix-tuning", num_virtual_tokens=6, prompt_init_text="به فارسی پاسخ بده")
    init = prefix_init_ids(tok, cfg.prompt_init_text, 6)
    assert len(init) == 6 and init[0] == tok.bos_token_id
    x = tok("<start_of_turn>user\nسلام<end_of_turn>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base(input_ids=torch.cat([torch.tensor([init]), x], 1)).logits[:, len(init):]
    model = apply_method(base, cfg, tok, log=None)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # an empty init text keeps PEFT's random start
    random_start = apply_method(load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)[0],
                                MethodConfig(method="prefix-tuning", num_virtual_tokens=6, prompt_init_text=""), tok,
                                log=None)
    with torch.no_grad():
        other = random_start.eval()(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert (other - expected).abs().max() > 1e-2


def test_rslora_and_dora_set_their_peft_options(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    rs = apply_method(model, MethodConfig(method="rslora", **CFG), tok, log=None)
    q = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(q.scaling["default"], CFG["lora_alpha"] / math.sqrt(CFG["lora_r"]))
    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    plain = apply_method(model, MethodConfig(method="lora", **CFG), tok, log=None)
    assert math.isclose(plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"], 2.0)
    assert plain.peft_config["default"].use_dora is False


def test_all_linear_targets_every_projection_but_the_head(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma3"]), tmp_path)
    model = apply_method(model, MethodConfig(method="lora", target_modules="all-linear", **CFG), tok, log=None)
    r = CFG["lora_r"]
    per_layer = r * ((H + Q) + 2 * (H + KV) + (Q + H) + 2 * (H + I) + (I + H))
    assert count_parameters(model)["trainable"] == L * per_layer


def test_prompt_tuning_starts_from_the_instruction_text(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma2"]), tmp_path)
    emb = model.get_input_embeddings()
    cfg = MethodConfig(method="prompt-tuning", **CFG)
    ids = tok(cfg.prompt_init_text)["input_ids"][: cfg.num_virtual_tokens]
    expected = emb(torch.tensor(ids)).detach()
    model = apply_method(model, cfg, tok, log=None)
    assert torch.allclose(model.prompt_encoder["default"].embedding.weight, expected)


def test_user_errors(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    with pytest.raises(UserError, match="unknown method; choose one of prompt-tuning"):
        apply_method(model, MethodConfig(method="adapters"), tok)
    with pytest.raises(UserError, match="need 1..6 layers"):
        apply_method(model, MethodConfig(method="partial", unfreeze_first=4, unfreeze_last=3), tok)
    with pytest.raises(UserError, match="its linear layers are .*q_proj"):
        apply_method(model, MethodConfig(method="lora", target_modules="query,value"), tok)
    with pytest.raises(UserError, match="4-bit"):
        apply_method(model, MethodConfig(method="qlora"), tok)
    with pytest.raises(UserError, match="no finetune.json"):
        load_finetuned(tmp_path, tmp_path)
    assert needs_4bit("qlora") and not needs_4bit("lora")
    with pytest.raises(UserError, match="unknown method"):
        default_lr("adapters")
    assert [m for m in METHODS if is_soft_prompt(m)] == ["prompt-tuning", "prefix-tuning", "p-tuning"]
    assert default_lr("prompt-tuning") > default_lr("lora") > default_lr("full")


def test_method_config_is_a_cli_dataclass():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(MethodConfig).parse_args_into_dataclasses(
        ["--method", "dora", "--lora-r", "16", "--target-modules", "all-linear", "--unfreeze-last", "3"]
    )
    assert (cfg.method, cfg.lora_r, cfg.target_modules, cfg.unfreeze_last) == ("dora", 16, "all-linear", 3)
    assert all(f.metadata.get("help") for f in dataclasses.fields(MethodConfig))
    assert MethodConfig().target_modules == "q_proj,k_proj,v_proj,o_proj" and MethodConfig().num_virtual_tokens == 20


@pytest.mark.parametrize("arch", ["gemma2", "llama"])  # tied and untied output head
def test_trainable_tokens_train_only_their_embedding_rows(arch, tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    base_emb = model.get_input_embeddings().weight.detach().clone()
    base_head = model.get_output_embeddings().weight.detach().clone()
    cfg = MethodConfig(method="lora", trainable_tokens="chat", **CFG)
    model = apply_method(model, cfg, tok, log=None)
    turn_ids = sorted(tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]))
    assert count_parameters(model)["trainable"] == expected_trainable(arch, "lora", len(tok)) + 2 * H

    losses = train_steps(model, tiny_chat_batch(tok))
    assert losses[-1] < losses[0] - 0.05, losses
    prompts = prompts_of()
    tokens = generate_token_ids(model, tok, prompts, max_new_tokens=6, batch_size=4)
    save_finetuned(model, tok, tmp_path / "run" / "final", cfg, base_model=str(tiny_dirs[arch]))

    merged = model.merge_and_unload()
    emb, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    moved = sorted(torch.nonzero((emb != base_emb).any(dim=1)).flatten().tolist())
    assert moved == turn_ids  # only the turn markers' rows trained
    if arch == "gemma2":  # a tied head shares the trained rows, so the model can learn to emit <end_of_turn>
        assert torch.equal(head, emb)
    else:
        assert torch.equal(head, base_head)
    loaded, tok2 = load_finetuned(tmp_path / "run", tmp_path)
    assert generate_token_ids(loaded, tok2, prompts, max_new_tokens=6, batch_size=4) == tokens


def test_trainable_tokens_errors(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    with pytest.raises(UserError, match="'<nope>' is not one token"):
        apply_method(model, MethodConfig(method="lora", trainable_tokens="<end_of_turn>,<nope>"), tok)
    with pytest.raises(UserError, match="not with --method prompt-tuning"):
        apply_method(model, MethodConfig(method="prompt-tuning", trainable_tokens="chat"), tok)


def _peft_forward(model):
    """The same model with PEFT's own trainable-tokens forward (hwtools' per-instance override removed)."""
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            module.__dict__.pop("forward_adapters", None)
    return model


@pytest.mark.parametrize("arch", ["gemma2", "llama", "gemma3"])  # tied, untied, scaled embedding
def test_indexed_trainable_tokens_equal_peft_in_values_and_gradients(arch, tiny_dirs, tmp_path):
    batch = None
    results = []
    for indexed in (True, False):
        model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
        model = apply_method(model, MethodConfig(method="lora", trainable_tokens="chat", **CFG), tok, log=None)
        if not indexed:
            model = _peft_forward(model)
        deltas = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
        assert deltas and all(p.requires_grad for p in deltas)
        with torch.no_grad():  # trained rows that differ from the base, so swapping them in matters
            for p in deltas:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        batch = batch or tiny_chat_batch(tok)
        loss, _ = causal_lm_loss(model, batch, chunk_size=7)  # several head chunks, each under checkpointing
        loss.backward()
        logits = model(input_ids=batch["input_ids"][:, :9]).logits
        results.append((loss.detach(), logits.detach(), [p.grad.clone() for p in deltas]))
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        assert ga.abs().sum() > 0
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def _untrained_like(model, tok, tokens, twins=40):
    """Put `tokens`' embedding rows into a cluster of `twins` near-identical rows, as a base checkpoint leaves the
    rows pretraining never touched."""
    from hwtools.llm.models import unwrap_model

    weight = unwrap_model(model).get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids(tokens)
    others = [i for i in range(weight.shape[0] - twins, weight.shape[0]) if i not in ids]
    g = torch.Generator().manual_seed(0)
    center = torch.randn(weight.shape[1], generator=g)
    with torch.no_grad():
        for i in ids + others:
            weight[i] = center + 0.01 * torch.randn(weight.shape[1], generator=g)


def test_auto_trainable_tokens_follow_the_embedding_rows(tiny_dirs, tmp_path):
    from hwtools.llm.methods import choose_trainable_tokens, untrained_rows

    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma2"]), tmp_path)
    markers = ["<start_of_turn>", "<end_of_turn>"]
    lora = MethodConfig(method="lora", **CFG)
    assert lora.trainable_tokens == "auto"
    trained = choose_trainable_tokens(lora, model, tok)  # a random init: every row distinct
    assert trained.ids == [] and "trained embedding rows" in trained.reason

    _untrained_like(model, tok, ["<end_of_turn>"])
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    stats = untrained_rows(model.get_input_embeddings().weight, [end, tok.convert_tokens_to_ids("<start_of_turn>")])
    assert stats[end]["untrained"] and stats[end]["twins"] >= 39
    choice = choose_trainable_tokens(lora, model, tok)
    assert choice.tokens == markers and sorted(choice.ids) == sorted(tok.convert_tokens_to_ids(markers))
    assert "never trained <end_of_turn>" in choice.reason and "<start_of_turn> (" not in choice.reason
    logged = []
    tuned = apply_method(model, lora, tok, log=logged.append)
    assert count_parameters(tuned)["trainable"] == expected_trainable("gemma2", "lora", len(tok)) + 2 * H
    assert logged[-1] == choice.reason

    for method, text in (("prompt-tuning", "auto"), ("full", "auto"), ("lora", "none")):
        cfg = MethodConfig(method=method, trainable_tokens=text, **CFG)
        assert choose_trainable_tokens(cfg, model, tok).ids == []


def test_auto_trainable_tokens_take_a_zero_row_as_untrained(tiny_dirs, tmp_path):
    from hwtools.llm.methods import choose_trainable_tokens

    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    with torch.no_grad():  # Llama-3 base keeps its reserved and chat tokens at (near) zero
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("<end_of_turn>")] = 1e-6
    choice = choose_trainable_tokens(MethodConfig(method="qlora"), model, tok)
    assert "<end_of_turn>" in choice.tokens and "median row norm" in choice.reason
    assert choose_trainable_tokens(MethodConfig(method="qlora"), model, None).ids == []
