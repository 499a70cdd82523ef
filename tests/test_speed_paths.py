"""The fast paths compute the same numbers as the plain ones (fp32, tiny models built here).

- SFT's LM head on scored positions only (`tokens.scored_positions` + `logits_to_keep`): the same log-probs,
  loss and gradients as the head over every position, to 1e-6; rows whose labels start at different
  positions (the union of positions is what is kept) and a position no row scores are both covered.
- Rollouts prefill each distinct prompt once (`sampling._prefill`): HF `generate`'s tokens, greedy and sampled.
"""

import torch

from instar.train.tokens import lm_loss, scored_positions, token_logprobs
from train_fixtures import tiny_model, tiny_tokenizer


def test_scored_positions_is_the_union_of_label_positions_minus_one():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100],
                           [-100, -100, -100, -100, 7, -100]])
    assert scored_positions(labels).tolist() == [1, 2, 3]   # logits at t predict labels at t + 1


def test_head_on_scored_positions_equals_the_full_head():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    torch.manual_seed(1)
    ids = torch.randint(4, len(tok), (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 3:7] = ids[0, 3:7]      # different spans per row; position 8 is scored by no row
    labels[1, 5:9] = ids[1, 5:9]
    labels[2, 10:] = ids[2, 10:]
    full = model(input_ids=ids).logits
    keep = scored_positions(labels)
    part = model(input_ids=ids, logits_to_keep=keep).logits
    assert part.shape[1] == len(keep) < ids.shape[1] - 1
    assert torch.allclose(token_logprobs(full, labels, 0.7), token_logprobs(part, labels, 0.7, keep), atol=1e-6)
    grads = []
    for logits, pos in ((model(input_ids=ids).logits, None), (model(input_ids=ids, logits_to_keep=keep).logits, keep)):
        loss, n = lm_loss(logits, labels, pos)
        model.zero_grad()
        loss.backward()
        grads.append((float(loss.detach()), n, [p.grad.clone() for p in model.parameters()]))
    (l1, n1, g1), (l2, n2, g2) = grads
    assert n1 == n2 == 4 + 4 + 2 and abs(l1 - l2) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_repeated_prompts_are_prefilled_once_and_sample_hf_generates_tokens():
    """GRPO's rollout shape: each prompt G times. The shared prefill runs 2 prompt rows instead of 6 and
    still gives HF `generate`'s tokens (which prefills all 6), greedy and seeded sampling alike."""
    from unittest import mock

    from instar.train.sampling import generate
    from instar.train.tokens import render_chat, stop_ids

    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    qs = ["What is 2 plus 3?", "the cat sees a red ball"]
    prompts = [render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in qs]
    prompts = [p for p in prompts for _ in range(3)]
    P, pad = max(len(p) for p in prompts), tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    att = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    for temperature in (0.0, 1.0):
        rows = []
        forward = model.forward
        with mock.patch.object(model, "forward", lambda **kw: rows.append(len(kw["input_ids"])) or forward(**kw)):
            ours = generate(model, tok, prompts, max_new_tokens=12, temperature=temperature, seed=5)
        assert rows[0] == 2                                  # the prefill: one row per distinct prompt
        kwargs = dict(do_sample=True, temperature=1.0, top_k=None, top_p=1.0) if temperature else dict(do_sample=False)
        with torch.random.fork_rng():
            torch.manual_seed(5)
            hf = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=12, eos_token_id=stop_ids(tok),
                                pad_token_id=pad, **kwargs)[:, P:]
        assert torch.equal(ours.completion_ids, torch.where(ours.completion_mask.bool(), hf, pad))


def test_grpo_logprobs_skip_columns_after_every_rows_stop():
    """Completion columns past the longest completion are padding: log-probs are the same without them."""
    from instar.train.grpo import completion_logprobs

    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    torch.manual_seed(2)
    B, P, C = 4, 5, 9
    seqs = {"prompt_ids": torch.randint(4, len(tok), (B, P)), "prompt_mask": torch.ones(B, P, dtype=torch.long),
            "completion_ids": torch.randint(4, len(tok), (B, C)), "completion_mask": torch.zeros(B, C, dtype=torch.long)}
    seqs["prompt_mask"][0, :2] = 0                                  # left padding in one prompt
    for b, n in enumerate((3, 6, 2, 6)):                            # longest completion: 6 of 9 columns
        seqs["completion_mask"][b, :n] = 1
    ids = torch.cat([seqs["prompt_ids"], seqs["completion_ids"]], 1)
    att = torch.cat([seqs["prompt_mask"], seqs["completion_mask"]], 1)
    labels = ids.masked_fill(att == 0, -100)
    from unittest import mock

    widths, forward = [], model.forward
    with torch.no_grad():
        full = token_logprobs(model(input_ids=ids, attention_mask=att,
                                    position_ids=(att.cumsum(1) - 1).clamp(min=0)).logits, labels)[:, -C:]
        with mock.patch.object(model, "forward", lambda **kw: widths.append(kw["attention_mask"].shape[1]) or forward(**kw)):
            got = completion_logprobs(model, seqs, 1.0)
    assert widths == [P + 6]                                        # the 3 all-pad columns were not run
    assert got.shape == (B, C) and torch.allclose(got, full, atol=1e-6)
    assert not got[:, 6:].any()
