"""The update's forward pass: log-probs of a micro-batch's scored tokens, with gradient.

Two paths give the same numbers (up to the order of floating-point sums):

- **per row** (`trainer.share_prefix=false`): each row's prompt + completion, left-padded, one row per
  sequence; the LM head runs only on the last positions, where the scored tokens are.
- **prefix tree** (the default where rows share tokens): every row's token sequence is inserted into
  a trie, so the chat template's system turn, each prompt (a group's n samples), a two-attempt
  episode's first turn inside its second turn's prompt, and even equal completion prefixes are one
  node each. The trie's nodes are packed into one sequence; a node attends to its ancestors only (a
  4-D mask) at the position of its depth, so it sees exactly what it sees in its own row. One forward
  computes each shared token once; the LM head runs on the nodes that predict a scored token.

`auto` picks the tree when its estimated cost (linear layers per token, attention per attended pair)
is below the per-row path's: always for short completions after shared prompts; not for a few long
rows, where one packed sequence's dense mask would cost more attention than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfimprove.errors import ConfigError
from selfimprove.sampling.prefix import forward_inputs, left_pad

SHARE = ("auto", "true", "false")
# The attention implementations that take the packed trie's arbitrary 4-D mask (flash attention does
# not): `auto` falls back to per row without one, `true` is refused at config time (`check_trainable`).
TREE_ATTENTION = ("eager", "sdpa")


@dataclass
class Trie:
    """Packed trie of token sequences: node i holds token `tokens[i]` at depth `depth[i]` below
    `parent[i]` (−1 for a root); `paths[r][t]` is the node of row r's token t. Parents come first."""

    tokens: list[int]
    parent: list[int]
    depth: list[int]
    paths: list[list[int]]

    @classmethod
    def of(cls, sequences: list[list[int]]) -> Trie:
        tokens: list[int] = []
        parent: list[int] = []
        depth: list[int] = []
        children: list[dict[int, int]] = []
        roots: dict[int, int] = {}
        paths = []
        for seq in sequences:
            path, node = [], -1
            for d, tok in enumerate(seq):
                table = roots if node < 0 else children[node]
                if tok not in table:
                    table[tok] = len(tokens)
                    tokens.append(tok)
                    parent.append(node)
                    depth.append(d)
                    children.append({})
                node = table[tok]
                path.append(node)
            paths.append(path)
        return cls(tokens, parent, depth, paths)

    def ancestors(self) -> Tensor:
        """[N, N] bool: node i may attend to node j (j is i or an ancestor of i)."""
        n = len(self.tokens)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parent):  # parents come first, so their rows are complete
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask


@dataclass
class Scored:
    """The tokens a loss is taken on, left-aligned: column t of row r is row r's scored token t."""

    logps: Tensor  # [B, W] log π(token) at the training temperature; 0 off `scored`
    tokens: Tensor  # [B, W] the scored token ids
    scored: Tensor  # [B, W] bool: a scored token


def first_scored(prompt: list[int], scope: str) -> int:
    """Index in prompt + completion of the first scored token: the completion's first, or for
    scope="sequence" (an objective that reads the prompt's tokens too) the sequence's second (the
    first token predicts nothing, so an empty prompt scores from the completion's second)."""
    return 1 if scope == "sequence" else max(len(prompt), 1)


def _gather(logits: Tensor, predictor: Tensor, tokens: Tensor, scored: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / T) of `tokens` [B, W], predicted by rows `predictor` [B, W] of `logits` [K, V]
    (upcast to fp32 only here, on the K positions that predict something)."""
    logits = logits.float() if logits.element_size() < 4 else logits
    if temperature != 1.0:  # a copy of [K, V]: long completions make K large
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp[predictor.clamp(min=0), tokens]
    return torch.where(scored, picked, torch.zeros_like(picked))


def _layout(rows: list[tuple[list[int], list[int]]], scope: str) -> tuple[list[list[int]], list[int], int]:
    sequences = [p + c for p, c in rows]
    starts = [first_scored(p, scope) for p, _ in rows]
    width = max([len(s) - b for s, b in zip(sequences, starts)] + [1])
    return sequences, starts, width


def per_row_logprobs(
    model, rows: list[tuple[list[int], list[int]]], pad: int, temperature: float, scope: str = "completion"
) -> Scored:
    """Each row's whole sequence in its own padded row; logits only for the last `width + 1` positions."""
    sequences, starts, width = _layout(rows, scope)
    ids, attention = left_pad(sequences, pad)
    device = next(model.parameters()).device
    logits = model(
        **forward_inputs(ids, attention, device), logits_to_keep=width + 1
    ).logits  # [B, width + 1, V]: column k is sequence position L − width − 1 + k
    b, kept = logits.shape[0], logits.shape[1]
    tokens = torch.full((b, width), pad, dtype=torch.long)
    predictor = torch.full((b, width), -1, dtype=torch.long)
    for r, (seq, start) in enumerate(zip(sequences, starts)):
        n = len(seq) - start
        if n > 0:
            tokens[r, :n] = torch.tensor(seq[start:])
            # sequence position p (from start − 1) sits at kept column p − (L − kept)
            predictor[r, :n] = r * kept + torch.arange(n) + start - 1 - (len(seq) - kept)
    scored = predictor >= 0
    flat = logits.reshape(b * kept, -1)
    logps = _gather(
        flat, predictor.to(flat.device), tokens.to(flat.device), scored.to(flat.device), temperature
    )
    return Scored(logps, tokens.to(flat.device), scored.to(flat.device))


def tree_logprobs(
    model,
    rows: list[tuple[list[int], list[int]]],
    pad: int,
    temperature: float,
    scope: str = "completion",
    trie: Trie | None = None,
) -> Scored:
    """The rows' sequences as one packed trie (`trie`, when the caller built it): every shared token
    computed once."""
    sequences, starts, width = _layout(rows, scope)
    trie = trie or Trie.of(sequences)
    b = len(rows)
    tokens = torch.full((b, width), pad, dtype=torch.long)
    node = torch.full((b, width), -1, dtype=torch.long)  # the trie node predicting each scored token
    for r, (seq, start) in enumerate(zip(sequences, starts)):
        n = len(seq) - start
        if n > 0:
            tokens[r, :n] = torch.tensor(seq[start:])
            node[r, :n] = torch.tensor(trie.paths[r][start - 1 : len(seq) - 1])
    scored = node >= 0
    # sorted node ids: the LM head runs on these only (one, to keep a graph, when nothing is scored)
    wanted = torch.unique(node[scored]) if scored.any() else torch.zeros(1, dtype=torch.long)
    predictor = torch.searchsorted(wanted, node.clamp(min=0))
    device = next(model.parameters()).device
    allowed = trie.ancestors()[None, None]
    if _attention(model) == "sdpa":
        mask = allowed  # sdpa takes a boolean mask: True attends
    else:  # eager and the rest add the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    logits = model(
        input_ids=torch.tensor([trie.tokens], device=device),
        attention_mask=mask.to(device),
        position_ids=torch.tensor([trie.depth], device=device),
        logits_to_keep=wanted.to(device),
    ).logits[0]  # [K, V]
    logps = _gather(logits, predictor.to(device), tokens.to(device), scored.to(device), temperature)
    return Scored(logps, tokens.to(device), scored.to(device))


def _config(model):
    """The transformers config, also through a DDP or DeepSpeed wrapper (whose own `config` is
    DeepSpeed's dict; peft forwards it)."""
    return getattr(model, "module", model).config


def _attention(model) -> str:
    return getattr(_config(model), "_attn_implementation", None) or "eager"


def tree_supported(model) -> bool:
    """A packed trie needs an arbitrary 4-D attention mask: eager and sdpa take one, flash attention not."""
    return _attention(model) in TREE_ATTENTION


def tree_is_cheaper(trie: Trie, rows: list[tuple[list[int], list[int]]], hidden_size: int) -> bool:
    """Estimated cost per layer: ≈ 12·d² per token (projections and MLP) + 4·d per attended pair; the
    packed trie attends densely (N²), the padded rows over their width (B·L²)."""
    nodes = len(trie.tokens)
    length = max(len(p) + len(c) for p, c in rows)
    tree = nodes * 12 * hidden_size + nodes * nodes * 4
    padded = len(rows) * length * 12 * hidden_size + len(rows) * length * length * 4
    return tree < padded


def check_share_prefix(share: str, attention: str | None) -> None:
    """`trainer.share_prefix` against `model.attn_implementation` (None: transformers picks sdpa or
    eager, which take the mask); a ConfigError naming both keys."""
    if share not in SHARE:
        raise ConfigError(f"trainer.share_prefix: {share!r} is not one of {'|'.join(SHARE)}")
    if share == "true" and attention is not None and attention not in TREE_ATTENTION:
        raise ConfigError(
            f"trainer.share_prefix=true packs rows with a 4-D attention mask, which model.attn_implementation="
            f"{attention} cannot take: use {' or '.join(TREE_ATTENTION)}, or trainer.share_prefix=auto"
        )


def scored_logprobs(
    model,
    rows: list[tuple[list[int], list[int]]],
    pad: int,
    temperature: float,
    *,
    share: str = "auto",
    scope: str = "completion",
) -> Scored:
    """Log-probs of the scored tokens of (prompt, completion) rows by the path `share` picks."""
    check_share_prefix(share, None)
    if share == "false" or (share == "auto" and not tree_supported(model)):
        return per_row_logprobs(model, rows, pad, temperature, scope)
    trie = Trie.of(_layout(rows, scope)[0])
    if share == "auto" and not tree_is_cheaper(trie, rows, _config(model).hidden_size):
        return per_row_logprobs(model, rows, pad, temperature, scope)
    return tree_logprobs(model, rows, pad, temperature, scope, trie)
