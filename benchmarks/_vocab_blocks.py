"""A causal LM whose tied [V, H] embedding is stored as row blocks (benchmarks/scale.py).

Same model, same math, same parameter count: the embedding matrix E (input embedding and,
tied, the LM head's weight) is held as ``n`` parameters ``weight_0 .. weight_{n-1}``, rows
``[i*r, (i+1)*r)`` of E (the last block takes the remainder). Why: under ZeRO-3 with NVMe
offload, DeepSpeed sizes several per-rank buffers by the largest parameter (parameter swap
buffers, ``offload_param.buffer_size``), or by the largest optimizer sub-group, which cannot
split a parameter (``sub_group_size``: optimizer swap buffers, the fp16 re-use buffer, the
initial fp32 buffers). Llama-3.2-3B's 128256 x 3072 embedding (394 M) is 15.6x its largest
MLP matrix (25 M); in 16 blocks of 8016 rows (24.6 M) it no longer sizes anything.

- input embedding: each token's row from the one block that holds it (the others add exact
  zeros);
- LM head: ``weight`` is ``torch.cat`` of the blocks (the gathered blocks while the head module
  runs under ZeRO-3): one [V, H] tensor, as the fused NTL head needs; autograd splits its
  gradient back into the blocks. Cost: one extra [V, H] copy while the head runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def block_rows(vocab: int, blocks: int) -> list:
    rows = math.ceil(vocab / blocks)
    return [min(rows, vocab - start) for start in range(0, vocab, rows)]


class BlockedEmbedding(nn.Module):
    """``nn.Embedding(vocab, dim)`` stored as row blocks (direct parameters of this module, so
    ZeRO-3 gathers them all when the module runs)."""

    def __init__(self, vocab: int, dim: int, blocks: int, std: float):
        super().__init__()
        self.sizes = block_rows(vocab, blocks)
        self.num_embeddings, self.embedding_dim = vocab, dim
        for i, rows in enumerate(self.sizes):
            weight = nn.Parameter(torch.empty(rows, dim))
            nn.init.normal_(weight, mean=0.0, std=std)
            setattr(self, f"weight_{i}", weight)

    def blocks(self) -> list:
        return [getattr(self, f"weight_{i}") for i in range(len(self.sizes))]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, start = None, 0
        for rows, weight in zip(self.sizes, self.blocks()):
            local = ids - start
            inside = (local >= 0) & (local < rows)
            part = F.embedding(local.clamp(0, rows - 1), weight) * inside.unsqueeze(-1)
            out = part if out is None else out + part
            start += rows
        return out


class BlockedHead(nn.Module):
    """``nn.Linear(dim, vocab, bias=False)`` whose weight is the (tied) blocks of a
    :class:`BlockedEmbedding`: the same Parameter objects, direct parameters of this module."""

    def __init__(self, embedding: BlockedEmbedding):
        super().__init__()
        self.sizes = list(embedding.sizes)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        for i, weight in enumerate(embedding.blocks()):
            setattr(self, f"weight_{i}", weight)

    @property
    def weight(self) -> torch.Tensor:
        """The [V, H] weight: a new tensor at each access (read it once per forward)."""
        return torch.cat([getattr(self, f"weight_{i}") for i in range(len(self.sizes))])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


def build_engine(model_config_path: str, vocab_size: int, ds_config: dict, blocks: int):
    """:func:`ntl_deepspeed.train.processes.build_engine` for a tied-embedding causal LM, with
    the embedding in ``blocks`` row blocks: the model is built (under ZeRO-3's ``zero.Init``)
    with a one-block-sized stand-in vocab whose embedding is then replaced, before
    ``deepspeed.initialize``. Returns ``(engine, hf_ds_config)`` (keep the latter alive)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ntl_deepspeed.train.models import model_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    config = model_config(model_config_path, 16)  # the stand-in vocab (replaced below)
    if not config.tie_word_embeddings:
        raise ValueError("vocab blocks: the model must tie its embeddings")
    model = AutoModelForCausalLM.from_config(config)
    # the model's own NVMe parameter swapper (a second one would empty the swap folder)
    swapper = getattr(next(model.parameters()), "nvme_swapper", None)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, param_swapper=swapper):
        embedding = BlockedEmbedding(vocab_size, config.hidden_size, blocks,
                                     config.initializer_range)
        head = BlockedHead(embedding)
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(head)
    model.config.vocab_size = vocab_size
    if hasattr(model, "vocab_size"):
        model.vocab_size = vocab_size
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config)
    return engine, hf_ds_config


def check_equivalence(blocks: int = 5, seed: int = 0) -> float:
    """A tiny tied Llama (no DeepSpeed) against the same weights in ``blocks`` row blocks: the
    loss and every gradient (the embedding's: the blocks' concatenated) must agree exactly;
    returns the loss. ``python benchmarks/_vocab_blocks.py``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=103, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    plain = LlamaForCausalLM(config)
    blocked = LlamaForCausalLM(config)
    blocked.load_state_dict(plain.state_dict())
    embedding = BlockedEmbedding(config.vocab_size, config.hidden_size, blocks, 0.02)
    with torch.no_grad():
        for weight, rows in zip(embedding.blocks(),
                                plain.get_input_embeddings().weight.split(embedding.sizes)):
            weight.copy_(rows)
    blocked.set_input_embeddings(embedding)
    blocked.set_output_embeddings(BlockedHead(embedding))
    ids = torch.randint(0, config.vocab_size, (2, 11))
    losses = []
    for model in (plain, blocked):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1]), losses
    assert torch.equal(plain.get_input_embeddings().weight.grad,
                       torch.cat([w.grad for w in embedding.blocks()]))
    grads = dict(blocked.named_parameters())
    for name, p in plain.named_parameters():
        if "embed_tokens" not in name:
            assert torch.equal(p.grad, grads[name].grad), name
    return float(losses[0].detach())


if __name__ == "__main__":
    print(f"row blocks = one matrix: loss {check_equivalence():.6f}, identical gradients")
