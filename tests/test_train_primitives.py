"""Shared trainer primitives on hand-made inputs: the chat renderer's loss mask, padding vs the stop token,
the one log-prob shift, batched generation, LoRA merge, checkpoints. No training here (see test_train_stages)."""

import math

import pytest
import torch

from instar.errors import InstarError
from instar.train.checkpoint import load_checkpoint, save_checkpoint
from instar.train.config import TrainConfig
from instar.train.models import merge_lora, wrap_lora
from instar.train.sampling import generate
from instar.train.tokens import collate, collate_buckets, lm_loss, render_chat, stop_ids, token_logprobs
from train_fixtures import tiny_model, tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And the cat?"},
    {"role": "assistant", "content": "the cat sees a red ball."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def spans(mask):
    """[(start, end)] of runs of 1s."""
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_render_chat_masks_exactly_the_assistant_turns(tok):
    ids, mask = render_chat(tok, CONVERSATION)
    assert len(ids) == len(mask)
    # Same ids as tokenising the whole template text at once: one source of truth with the chat template.
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    runs = spans(mask)
    assert len(runs) == 2
    for (a, b), turn in zip(runs, [CONVERSATION[2], CONVERSATION[4]]):
        # In the loss: the first response token ... through the end-of-turn token, nothing else.
        assert tok.decode(ids[a:b]) == turn["content"] + "<|im_end|>"
        assert ids[b - 1] == im_end
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")   # header stays out of the loss
    # No prompt token (system/user content, headers) is in the loss.
    prompt_text = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "What is 2 plus 3?" in prompt_text and "You are terse." in prompt_text and "And the cat?" in prompt_text
    assert "sees a red ball" not in prompt_text


def test_render_chat_generation_prompt_ends_with_assistant_header(tok):
    ids, mask = render_chat(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert sum(mask) == 0
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_pad_is_not_eos_and_labels_keep_the_stop_token(tok):
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in stop_ids(tok)
    a = render_chat(tok, CONVERSATION[1:3])
    b = render_chat(tok, CONVERSATION[1:5])
    for pad in (tok.pad_token_id, tok.eos_token_id):  # even when a base model has pad == eos
        batch = collate([a[0], b[0]], [a[1], b[1]], pad)
        row = batch["labels"][0]
        last = len(a[0]) - 1
        while a[1][last] == 0:  # trailing newline after <|im_end|> is not in the loss
            last -= 1
        assert row[last] == tok.eos_token_id                      # the stop token is a target
        assert (row[len(a[0]):] == -100).all()                    # padding never is
        assert batch["attention_mask"][0].sum() == len(a[0])


def test_token_logprobs_shift_on_a_hand_made_example():
    # V = 4, T = 3. logits at position t predict token t+1.
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 3.0, 0.0],
                            [9.0, 9.0, 9.0, 9.0]]])
    labels = torch.tensor([[1, 0, 2]])
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 3)
    assert out[0, 0] == 0                                           # nothing predicts the first token
    assert out[0, 1].item() == pytest.approx(2.0 - math.log(math.e ** 2 + 3))   # p(0 | pos 0)
    assert out[0, 2].item() == pytest.approx(3.0 - math.log(math.e ** 3 + 3))   # p(2 | pos 1)
    # Temperature divides the logits before the softmax.
    hot = token_logprobs(logits, labels, temperature=2.0)
    assert hot[0, 1].item() == pytest.approx(1.0 - math.log(math.e + 3))
    # Ignored labels give 0.
    assert token_logprobs(logits, torch.tensor([[1, -100, 2]]))[0, 1] == 0


def test_lm_loss_equals_transformers_loss(tok):
    model = tiny_model(tok)
    ids, mask = render_chat(tok, CONVERSATION)
    batch = collate([ids], [mask], tok.pad_token_id)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    ours, n = lm_loss(out.logits, batch["labels"])
    assert n == sum(mask)
    assert ours.item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_length_buckets_give_the_whole_batch_gradient_with_less_padding(tok):
    """SFT pads each step's rows in buckets of similar length; weighted by labelled tokens (loop.supervised), the
    buckets' gradient is the one of the batch padded as a whole."""
    from types import SimpleNamespace

    from instar.train.loop import supervised

    convs = [CONVERSATION[:3], CONVERSATION, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
             CONVERSATION[1:3], [{"role": "user", "content": "Say a long thing " * 12},
                                 {"role": "assistant", "content": "a long reply that goes on " * 6}]]
    rows = [render_chat(tok, c) for c in convs]
    seqs, masks = [r[0] for r in rows], [r[1] for r in rows]
    buckets = collate_buckets(seqs, masks, tok.pad_token_id, overhead=0)
    whole = collate(seqs, masks, tok.pad_token_id)
    assert len(buckets) > 1 and sum(b["input_ids"].numel() for b in buckets) < whole["input_ids"].numel()
    assert sum(int(b["attention_mask"].sum()) for b in buckets) == int(whole["attention_mask"].sum())
    assert collate_buckets(seqs, masks, tok.pad_token_id, overhead=10**6)[0]["input_ids"].shape == whole["input_ids"].shape

    def loss_fn(model, batch):
        return lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                       batch["labels"])[0]

    def grads(batch):
        model = tiny_model(tok)
        session = SimpleNamespace(device=torch.device("cpu"), world=1)
        total = 0.0
        for closure in supervised(session, loss_fn)([batch])[0]:
            loss, stats = closure(model)
            loss.backward()
            total += stats["loss"]
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), total

    g_whole, loss_whole = grads(whole)
    g_buckets, loss_buckets = grads(buckets)
    assert loss_buckets == pytest.approx(loss_whole, rel=1e-5)
    assert torch.allclose(g_buckets, g_whole, atol=1e-6, rtol=1e-4)


def test_batched_generation_matches_one_by_one(tok):
    model = tiny_model(tok)
    prompts = [render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("What is 2 plus 3?", "the cat sees a red ball and the dog likes some bread?")]
    both = generate(model, tok, prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):
        alone = generate(model, tok, [p], max_new_tokens=6)
        assert both.texts[i] == alone.texts[0]
    assert both.completion_ids.shape == both.completion_mask.shape
    # Sampling with a seed is reproducible and leaves the caller's RNG alone.
    torch.manual_seed(1)
    before = torch.get_rng_state()
    s1 = generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=7).texts
    assert torch.equal(before, torch.get_rng_state())
    assert s1 == generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=7).texts


def test_generation_equals_hf_generate_with_rows_stopping_at_different_steps(tok):
    """The plain decode loop drops stopped rows from the batch; its tokens must still be HF `generate`'s, greedy
    and seeded top-k sampling alike (same RNG stream), with the width set by the last row to stop."""
    model = tiny_model(tok, seed=3)  # seed 3: with digit tokens, the init whose rows stop at 5 different steps
    with torch.no_grad():  # a loud stop-token embedding (tied to the head) makes rows stop at different steps
        model.model.embed_tokens.weight[stop_ids(tok)[0]] *= 24
    qs = ["What is 2 plus 3?", "the cat sees a red ball and the dog likes some bread?", "hi",
          "Tell me a story about the sea", "7 + 5", "Who are you?"]
    prompts = [render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in qs]
    P, pad = max(len(p) for p in prompts), tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    att = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    for temperature, top_k in ((0.0, None), (1.0, 50)):
        ours = generate(model, tok, prompts, max_new_tokens=20, temperature=temperature, top_k=top_k, seed=3)
        kwargs = dict(do_sample=False)
        if temperature:
            kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            hf = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=20, eos_token_id=stop_ids(tok),
                                pad_token_id=pad, **kwargs)[:, P:]
        lengths = ours.completion_mask.sum(1)
        assert len(set(lengths.tolist())) >= 3 and int(lengths.min()) < 20        # stops really differ
        assert torch.equal(ours.completion_ids, torch.where(ours.completion_mask.bool(), hf, pad))


def test_lora_merge_gives_the_same_logits(tok):
    model = wrap_lora(tiny_model(tok), TrainConfig(lora_r=4, lora_alpha=8))
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something
            p.data.normal_(0, 0.05)
    ids = torch.tensor([render_chat(tok, CONVERSATION)[0]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged_model = merge_lora(model)
        merged = merged_model(input_ids=ids).logits
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in merged_model.state_dict())
    assert torch.allclose(adapted, merged, atol=1e-4)


def test_checkpoint_round_trip_and_corruption(tok, tmp_path):
    model = tiny_model(tok)
    save_checkpoint(tmp_path / "ckpt", model, {"step": 7, "rng": torch.get_rng_state()})
    other = tiny_model(tok, seed=1)
    state = load_checkpoint(tmp_path / "ckpt", other)
    assert state["step"] == 7
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InstarError, match="corrupt or incompatible checkpoint"):
        load_checkpoint(tmp_path / "ckpt", other)


def test_short_rows_under_cpu_bf16_get_the_math_attention_kernel_with_the_same_loss(tok):
    """`attention_kernel` switches only where it was measured faster (CPU, bf16 autocast, <= 128 tokens), and the
    switch changes nothing but rounding: the loss matches the default kernel's to bf16 precision."""
    import contextlib

    from instar.train.loop import autocast
    from instar.train.sampling import attention_kernel, SHORT_ATTENTION

    cpu = torch.device("cpu")
    assert isinstance(attention_kernel(cpu, 64), contextlib.nullcontext)  # fp32: PyTorch chooses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not isinstance(attention_kernel(cpu, SHORT_ATTENTION), contextlib.nullcontext)
        assert isinstance(attention_kernel(cpu, SHORT_ATTENTION + 1), contextlib.nullcontext)
    model = tiny_model(tok)
    ids = torch.randint(0, len(tok), (4, 48), generator=torch.Generator().manual_seed(0))
    losses = []
    for length in (None, 48):  # default kernel, then the math kernel
        with torch.no_grad(), autocast(cpu, True, length):
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0]), losses


def test_auto_precision_keeps_narrow_models_in_fp32_on_a_cpu(tok, monkeypatch):
    """dtype = "auto" on a CPU with bf16 units: bf16 autocast for a model at least BF16_MIN_WIDTH wide, fp32 for a
    narrower one (the tiny preset: the casts cost more than the matmuls gain), found inside any wrapper; "bf16" and
    "fp32" are obeyed whatever the width; a CPU without bf16 units never gets it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from instar.train import models
    from instar.train.models import BF16_MIN_WIDTH, model_width, use_bf16

    cpu = torch.device("cpu")
    narrow = tiny_model(tok)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=BF16_MIN_WIDTH, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4))
    lora = wrap_lora(tiny_model(tok), TrainConfig(lora=True, lora_r=2))
    wrapped = torch.nn.ModuleDict({"lm": lora, "head": torch.nn.Linear(2, 1)})  # as PPO's policy with a value head
    assert model_width(narrow) < BF16_MIN_WIDTH and model_width(wrapped) == model_width(narrow)
    assert model_width(wide) == BF16_MIN_WIDTH and model_width(torch.nn.Linear(2, 2)) is None
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    auto, forced, off = TrainConfig(dtype="auto"), TrainConfig(dtype="bf16"), TrainConfig(dtype="fp32")
    assert [use_bf16(auto, cpu, m) for m in (narrow, wrapped, wide, None)] == [False, False, True, True]
    assert use_bf16(forced, cpu, narrow) and not use_bf16(off, cpu, wide)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert not use_bf16(auto, cpu, wide)
    with pytest.raises(InstarError, match="not supported"):
        use_bf16(forced, cpu, wide)
