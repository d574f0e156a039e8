"""Late interaction (ColBERT): one unit vector per token, and MaxSim between a query's and a
passage's token vectors.

A text's token vectors are an (N, L, D) tensor whose padding rows are exactly zero: a real token's
vector has norm 1, so the tensor carries its own mask (:func:`token_mask`) through GradCache's
cache, the cross-process gather and the loss without a second tensor beside it.

MaxSim of query q and passage p is ``sum_i max_j <q_i, p_j>`` over q's real tokens i and p's real
tokens j (ColBERT, Khattab & Zaharia 2020), as ``pylate.scores.colbert_scores`` computes it on
unpadded token vectors. Padding never scores: a padded passage token is out of the max (PyLate's
training multiplies it by 0 instead, which puts a floor of 0 under every query token), and a
padded query token is a zero vector that adds 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Entries of one block's (B, P_block, L_q, L_p) similarity tensor, and of its (B, P_block, L_q, D)
# gathered token vectors in the backward: 2^24 float32 entries are 64 MiB. At 2^26 a batch of 64
# queries against 128 passages of 512 tokens took 1.35x the memory of a batch of 16 on CPU
# (bench/train_speed.py --methods efficient_colbert), against 1.03x for one vector.
BLOCK_ENTRIES = 1 << 24


def token_vectors(hidden_states: torch.Tensor, token_mask: torch.Tensor, projection: torch.nn.Module) -> torch.Tensor:
    """(N, L, D) unit token vectors of the tokens ``token_mask`` keeps (others exactly zero).

    hidden_states: (N, L, H) last hidden states; token_mask: (N, L), 1 for the tokens kept;
    projection: H -> D (``nn.Linear``, no bias in PyLate's layout).
    """
    projected = projection(hidden_states)  # (N, L, D)
    if projected.dtype in (torch.float16, torch.bfloat16):  # an autocast region: scoring stays float32
        projected = projected.float()
    vectors = F.normalize(projected, p=2, dim=-1)  # (N, L, D)
    return vectors * token_mask.unsqueeze(-1).to(vectors.dtype)  # (N, L, D)


def token_mask(vectors: torch.Tensor) -> torch.Tensor:
    """(N, L) True at the real tokens of (N, L, D) token vectors (norm 1; padding is all zeros)."""
    return vectors.detach().abs().amax(dim=-1) > 0


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; (n_i, L_i, D) token vectors are zero-padded to the longest L_i first."""
    if tensors[0].dim() < 3:
        return torch.cat(tensors)
    length = max(t.size(1) for t in tensors)
    return torch.cat([F.pad(t, (0, 0, 0, length - t.size(1))) for t in tensors])  # (sum n_i, L, D)


def join_segments(vectors: torch.Tensor, owner: list[int]) -> torch.Tensor:
    """(P, K * L, D) token vectors of P passages from the (S, L, D) token vectors of their segments.

    ``owner`` (S ints, non-decreasing, every passage 0..P-1 at least once): the passage of each
    segment. A passage's segments sit side by side in its row and a passage of fewer than K
    segments ends in zero rows, which are padding to MaxSim: its score is the sum over query tokens
    of the best match among all of its segments' tokens, as a long document is searched.
    """
    owner = torch.as_tensor(owner, dtype=torch.long, device=vectors.device)  # (S,)
    count = owner.size(0)
    place = torch.arange(count, device=owner.device) - torch.searchsorted(owner, owner)  # (S,) index in its passage
    index = torch.full((int(owner[-1]) + 1, int(place.max()) + 1), count, device=owner.device)  # (P, K); S: a zero row
    index[owner, place] = torch.arange(count, device=owner.device)
    padded = torch.cat([vectors, vectors.new_zeros(1, *vectors.shape[1:])])  # (S + 1, L, D)
    return padded[index].flatten(1, 2)  # (P, K * L, D)


def _block_size(queries: torch.Tensor, passages: torch.Tensor) -> int:
    per_passage = queries.size(0) * queries.size(1) * max(passages.size(1), passages.size(2))
    return max(1, BLOCK_ENTRIES // max(per_passage, 1))


class _MaxSim(torch.autograd.Function):
    """Scores in passage blocks; the backward routes each query token's gradient to the passage
    token it matched (the gradient of a max), so no block's similarity tensor outlives its block."""

    @staticmethod
    def forward(ctx, queries, passages):  # (B, Lq, D), (P, Lp, D)
        padding = ~token_mask(passages)  # (P, Lp)
        block = _block_size(queries, passages)
        scores = queries.new_empty(queries.size(0), passages.size(0))  # (B, P)
        best = torch.empty(queries.size(0), passages.size(0), queries.size(1), dtype=torch.long,
                           device=queries.device)  # (B, P, Lq) index of each query token's match
        for start in range(0, passages.size(0), block):
            end = min(start + block, passages.size(0))
            similarity = torch.einsum("bqd,ptd->bpqt", queries, passages[start:end])  # (B, Pb, Lq, Lp)
            similarity.masked_fill_(padding[None, start:end, None, :], float("-inf"))
            values, best[:, start:end] = similarity.max(dim=-1)  # (B, Pb, Lq)
            scores[:, start:end] = values.sum(dim=-1)
        ctx.save_for_backward(queries, passages, best)
        ctx.block = block
        return scores

    @staticmethod
    def backward(ctx, grad_scores):  # (B, P)
        queries, passages, best = ctx.saved_tensors
        grad_queries = torch.zeros_like(queries)  # (B, Lq, D)
        grad_passages = torch.zeros_like(passages)  # (P, Lp, D)
        length = passages.size(1)
        for start in range(0, passages.size(0), ctx.block):
            end = min(start + ctx.block, passages.size(0))
            rows = torch.arange(start, end, device=best.device)[None, :, None]  # (1, Pb, 1)
            matched = passages[rows, best[:, start:end]]  # (B, Pb, Lq, D)
            weights = grad_scores[:, start:end]  # (B, Pb)
            grad_queries += torch.einsum("bp,bpqd->bqd", weights, matched)
            contributions = weights[:, :, None, None] * queries[:, None]  # (B, Pb, Lq, D)
            flat = (rows * length + best[:, start:end]).flatten()  # (B * Pb * Lq,) into (P * Lp)
            grad_passages.view(-1, passages.size(2)).index_add_(0, flat, contributions.reshape(-1, passages.size(2)))
        # a padded query token (a zero vector) adds 0 whatever it matched: no gradient
        return grad_queries * token_mask(queries).unsqueeze(-1), grad_passages


def maxsim(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """(B, P) MaxSim of every query against every passage, with its exact gradient.

    queries: (B, Lq, D) and passages: (P, Lp, D) token vectors (padding rows zero, see the module
    docstring). Computed in float32 at least, outside any autocast, in passage blocks of
    :data:`BLOCK_ENTRIES` entries: 256 queries of 32 tokens against 768 passages of 8192 tokens
    never hold the 5e10-entry score tensor (a block is then one passage: 256 MiB).
    """
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        return _MaxSim.apply(queries.to(dtype), passages.to(dtype))


def mean_maxsim(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """(B, P) MaxSim divided by each query's number of tokens: a mean of cosines, in [-1, 1] like a
    single-vector cosine, so one temperature means the same for both. Each query's ranking of the
    passages is MaxSim's."""
    counts = token_mask(queries).sum(dim=1).clamp(min=1)  # (B,)
    return maxsim(queries, passages) / counts[:, None].to(torch.promote_types(queries.dtype, torch.float32))


def similarity(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """(B, P) float32 (at least) scores of single vectors (cosine of (B, D) and (P, D)) or token
    vectors (:func:`mean_maxsim` of (B, Lq, D) and (P, Lp, D)), outside any autocast."""
    if queries.dim() == 3:
        return mean_maxsim(queries, passages)
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        return queries.to(dtype) @ passages.to(dtype).T  # (B, P)


# PyLate's ColBERT settings as this project reads and writes texts: no [Q]/[D] marker tokens, no
# query expansion with [MASK] tokens, and every token of a document kept (no punctuation skiplist).
PYLATE_SETTINGS = {"query_prefix": "", "document_prefix": "", "do_query_expansion": False,
                   "attend_to_expansion_tokens": False, "skiplist_words": [], "similarity_fn_name": "MaxSim"}
DENSE_FOLDER = "1_Dense"
IDENTITY = "torch.nn.modules.linear.Identity"
# sentence-transformers 5's module names, which PyLate (built on it) imports and sentence-transformers 6 still reads
MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": DENSE_FOLDER, "type": "sentence_transformers.models.Dense"}]


def save_late_interaction(encoder, projection: torch.nn.Linear, tokenizer, folder, *, query_length: int,
                          document_length: int, query_prompt: str = "", passage_prompt: str = "",
                          prompts: dict[str, str] | None = None) -> None:
    """Write a late-interaction model in PyLate's layout (sentence-transformers 5 files): the
    encoder as a Hugging Face folder (what ``AutoModel`` loads), ``1_Dense`` the projection, and
    PyLate's settings (:data:`PYLATE_SETTINGS`; lengths in tokens) in
    ``config_sentence_transformers.json``, so that ``pylate.models.ColBERT(model_name_or_path=folder)``
    encodes as this project does. The prompts are recorded as sentence-transformers' ``"query"`` and
    ``"document"`` prompts, ``prompts`` as more named ones (PyLate prepends one when asked by
    ``prompt_name``). A PEFT encoder is
    written as its adapter."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(os.path.join(folder, DENSE_FOLDER), exist_ok=True)
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = {"linear.weight": projection.weight.detach().float().cpu().contiguous()}
    if projection.bias is not None:
        weights["linear.bias"] = projection.bias.detach().float().cpu().contiguous()
    save_file(weights, os.path.join(folder, DENSE_FOLDER, "model.safetensors"))
    files = {
        "modules.json": MODULES,
        "sentence_bert_config.json": {"max_seq_length": document_length, "do_lower_case": False},
        os.path.join(DENSE_FOLDER, "config.json"): {"in_features": projection.in_features,
                                                    "out_features": projection.out_features,
                                                    "bias": projection.bias is not None, "activation_function": IDENTITY},
        "config_sentence_transformers.json": {**PYLATE_SETTINGS, "query_length": query_length,
                                              "document_length": document_length,
                                              "prompts": {"query": query_prompt, "document": passage_prompt,
                                                          **(prompts or {})},
                                              "default_prompt_name": None},
    }
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as handle:
            json.dump(content, handle, indent=2)


def read_projection(folder) -> torch.nn.Linear | None:
    """The projection of a late-interaction folder (PyLate's layout: a ``Dense`` module in
    ``modules.json``), or None for a single-vector model."""
    import json
    from pathlib import Path

    from . import UserError

    modules_file = Path(folder) / "modules.json"
    if not modules_file.is_file():
        return None
    dense = [m for m in json.loads(modules_file.read_text()) if m.get("type", "").endswith("Dense")]
    if not dense:
        return None
    if len(dense) > 1:
        raise UserError(f"{folder} has {len(dense)} Dense modules; a late-interaction model here has one projection")
    path = Path(folder) / dense[0]["path"]
    config = json.loads((path / "config.json").read_text())
    if config.get("activation_function", IDENTITY) != IDENTITY:
        raise UserError(f"{folder}: the projection's activation {config['activation_function']} is not supported "
                        "(PyLate's is the identity)")
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors")) if (path / "model.safetensors").is_file() else \
        torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    projection = torch.nn.Linear(config["in_features"], config["out_features"], bias=bool(config.get("bias")))
    projection.load_state_dict({key.removeprefix("linear."): value for key, value in weights.items()})
    return projection
