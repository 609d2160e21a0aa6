"""A one-layer Hugging Face Llama over a 64-token vocab with digits, a batch with digit runs,
and its reference loss (the model's own logits + F.cross_entropy + ntl_loss)."""
import torch
import torch.nn.functional as F

from ntl_deepspeed import ntl_loss

TOKENS = ["<unk>", "<s>", "</s>"] + [str(d) for d in range(10)] + [f"w{i}" for i in range(51)]
VOCAB = len(TOKENS)


def model_and_batch(head_bias: bool = False, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         tie_word_embeddings=tied))
    if head_bias:
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    ids = torch.randint(0, VOCAB, (2, 12))
    ids[:, 5:9] = torch.randint(3, 13, (2, 4))  # digit runs
    labels = ids.clone()
    labels[0, :3] = -100
    return model, ids, labels


def reference_loss(model, ids, labels, vocab, kind, weight=0.3):
    logits = model(input_ids=ids).logits
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1))
    return ce + weight * ntl_loss(logits, shifted, vocab, kind)
