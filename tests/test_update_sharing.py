"""The update on a shared prefix tree: the same log-probs and gradients as every row run whole, for
policy-gradient, SFT and two-attempt (SCoRe) rows, LoRA and full; no row sees another's tokens."""

import pytest
import torch
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig, TrainerConfig
from selfimprove.logprobs import Trie, per_row_logprobs, scored_logprobs, tree_is_cheaper, tree_logprobs
from selfimprove.objectives import SFT, PolicyGradient
from selfimprove.sampling import HFSampler
from selfimprove.tasks import ArithmeticTask
from selfimprove.train import check_rows, columns_of, micro_batch_loss, micro_batches


def tiny_model(attn: str = "eager", lora: bool = False):
    cfg = OmegaConf.structured(ModelConfig(kind="tiny", attn_implementation=attn))
    model, tokenizer = models.load_model(cfg), models.load_tokenizer(cfg)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)  # peaked logits: a position or mask error moves them far
    if lora:
        trainer = OmegaConf.structured(
            TrainerConfig(lora=True, lora_r=4, target_modules=["q_proj", "v_proj"])
        )
        torch.manual_seed(0)
        model = models.add_lora(model, trainer)
        for name, p in model.named_parameters():  # LoRA's B starts at 0: make the adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    models.upcast_trainable(model)
    return model.train(), tokenizer


def group_rows(tokenizer, prompts: int = 3, n: int = 4) -> list[dict]:
    """n completions (of different lengths, one empty) of each of `prompts` chat prompts."""
    sampler, task = HFSampler(tokenizer), ArithmeticTask()
    rows = []
    for p in range(prompts):
        prompt = sampler.encode(task.train_problem(p))
        for i in range(n):
            completion = [(13 * p + 7 * i + j) % 400 + 20 for j in range((i + p) % 5)]
            rows.append(
                {
                    "prompt_id": f"p{p}",
                    "sample_idx": i,
                    "prompt_ids": prompt,
                    "completion_ids": completion,
                    "advantage": (-1.0) ** i * (i + 1) / 3,
                    "logprobs": [-0.7 - 0.1 * j for j in range(len(completion))],
                    "turn": 1,
                }
            )
    return rows


def two_attempt_rows(tokenizer) -> list[dict]:
    """SCoRe's episode: the second attempt's prompt holds the first attempt's prompt and completion."""
    rows = group_rows(tokenizer, prompts=2, n=3)
    instruction = tokenizer("Check your answer and correct it.", add_special_tokens=False)["input_ids"]
    second = [
        {
            **r,
            "prompt_ids": r["prompt_ids"] + r["completion_ids"] + instruction,
            "completion_ids": r["completion_ids"][::-1] + [33],
            "logprobs": [-0.5] * (len(r["completion_ids"]) + 1),
            "turn": 2,
        }
        for r in rows
    ]
    return rows + second


def loss_and_grads(model, rows, objective, share, pad):
    model.zero_grad(set_to_none=True)
    loss, _ = micro_batch_loss(model, rows, objective, objective.normalizer(rows), pad=pad, share=share)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    path = tree_logprobs if share == "true" else per_row_logprobs
    return path(model, pairs, pad, objective.temperature), loss.detach(), grads


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["pg", "sft", "two_attempts"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tree_equals_per_row(kind, lora, attn):
    model, tok = tiny_model(attn, lora)
    rows = two_attempt_rows(tok) if kind == "two_attempts" else group_rows(tok)
    objective = SFT() if kind == "sft" else PolicyGradient(temperature=0.8)
    per_row, loss_a, grads_a = loss_and_grads(model, rows, objective, "false", tok.pad_token_id)
    tree, loss_b, grads_b = loss_and_grads(model, rows, objective, "true", tok.pad_token_id)
    assert torch.equal(per_row.scored, tree.scored) and torch.equal(per_row.tokens, tree.tokens)
    torch.testing.assert_close(tree.logps, per_row.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp(min=1e-12)
        assert (grads_b[name] - grads_a[name]).abs().max() / scale <= 1e-5, name


def test_the_tree_computes_each_shared_token_once():
    model, tok = tiny_model()
    rows = two_attempt_rows(tok)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    tree_logprobs(model, [(r["prompt_ids"], r["completion_ids"]) for r in rows], tok.pad_token_id, 1.0)
    hook.remove()
    distinct_prefixes = {
        tuple((r["prompt_ids"] + r["completion_ids"])[: k + 1])
        for r in rows
        for k in range(len(r["prompt_ids"]) + len(r["completion_ids"]))
    }
    assert seen == [len(distinct_prefixes)]  # one forward, one position per distinct prefix
    assert seen[0] < 0.5 * sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)


def test_no_row_sees_another_groups_tokens():
    model, tok = tiny_model()
    rows = group_rows(tok, prompts=2, n=3)
    pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    before = tree_logprobs(model, pairs, tok.pad_token_id, 1.0).logps.detach()
    changed = [(p[:-2] + [77, 78], c) if i >= 3 else (p, c) for i, (p, c) in enumerate(pairs)]
    after = tree_logprobs(model, changed, tok.pad_token_id, 1.0).logps.detach()
    torch.testing.assert_close(after[:3], before[:3], atol=0, rtol=0)  # group 0 untouched
    assert not torch.allclose(after[3:], before[3:])  # group 1 did change


def test_trie_hand_example():
    trie = Trie.of([[1, 2, 3], [1, 2, 4], [1, 5], [6]])
    assert trie.tokens == [1, 2, 3, 4, 5, 6] and trie.parent == [-1, 0, 1, 1, 0, -1]
    assert trie.depth == [0, 1, 2, 2, 1, 0] and trie.paths == [[0, 1, 2], [0, 1, 3], [0, 4], [5]]
    allowed = trie.ancestors().int().tolist()
    assert allowed[3] == [1, 1, 0, 1, 0, 0] and allowed[5] == [0, 0, 0, 0, 0, 1]


def test_edge_rows_get_the_per_row_result():
    model, tok = tiny_model()
    pad = tok.pad_token_id
    rows = group_rows(tok, prompts=1, n=2)[1:]  # one row
    rows += [{**rows[0], "completion_ids": [], "logprobs": []}]  # an empty completion
    rows += [{**rows[0], "prompt_ids": [pad] + rows[0]["prompt_ids"]}]  # differs only by a pad token
    for subset in (rows[:1], rows):
        a = per_row_logprobs(model, [(r["prompt_ids"], r["completion_ids"]) for r in subset], pad, 1.0)
        b = tree_logprobs(model, [(r["prompt_ids"], r["completion_ids"]) for r in subset], pad, 1.0)
        torch.testing.assert_close(b.logps, a.logps, atol=1e-5, rtol=1e-5)


def test_a_wrong_logprob_count_names_the_row_before_training():
    rows = group_rows(tiny_model()[1], prompts=1, n=2)
    rows[1]["logprobs"] = rows[1]["logprobs"][:-1]
    with pytest.raises(ValueError, match="prompt_id='p0' sample_idx=1: logprobs has"):
        check_rows(rows, columns_of(PolicyGradient()))


def test_micro_batches_keep_a_prompts_rows_together():
    rows = [{"prompt_ids": [p], "i": i} for i, p in enumerate([1, 2, 1, 3, 2, 1, 3])]
    batches = micro_batches(rows, 4)
    assert [[r["i"] for r in b] for b in batches] == [[0, 2, 5], [1, 4, 3, 6]]
    assert sum(len(b) for b in micro_batches(rows, 2)) == len(rows)  # a large group is split
    # a problem's two attempts (other prompts, one prompt_id) stay together
    episode = [{"prompt_ids": [1], "prompt_id": "a"}, {"prompt_ids": [2], "prompt_id": "b"}]
    episode += [{"prompt_ids": [1, 5, 9], "prompt_id": "a"}]
    assert [[r["prompt_id"] for r in b] for b in micro_batches(episode, 2)] == [["a", "a"], ["b"]]


def test_auto_picks_the_tree_for_shared_prompts_and_rows_for_long_distinct_ones():
    model, tok = tiny_model()
    rows = [(r["prompt_ids"], r["completion_ids"]) for r in group_rows(tok)]
    assert tree_is_cheaper(Trie.of([p + c for p, c in rows]), rows, model.config.hidden_size)
    long_distinct = [([i + 1] * 3, list(range(10, 400))) for i in range(4)]
    assert not tree_is_cheaper(Trie.of([p + c for p, c in long_distinct]), long_distinct, 4)
    with pytest.raises(ValueError, match="share_prefix"):
        scored_logprobs(model, rows, tok.pad_token_id, 1.0, share="maybe")
