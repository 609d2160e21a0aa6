"""DeepSpeed pipeline parallelism with NTL, one real 2-rank launch (PipelineModule, 2 stages,
CPU, gloo): PipelineNTLLoss on the last stage -- after an nn.Linear head (logits), after
FusedLMHead as the last LayerSpec, and after tied_head on a TiedLayerSpec embedding (logits
never materialised) -- gives the unpipelined model's
loss (mean over 2 micro-batches) and the gradient of every parameter on both stages (one
process, F.cross_entropy + ntl_loss, autograd), under ZeRO 0 and 1 and the micro_batch / token /
global normalisations; the last stage's metrics (CE, NTL, number accuracy, MAE) equal the
reference's."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import free_port
from ntl_deepspeed import NTLConfig, NumberVocab
from ntl_deepspeed.integrations.pipeline import (FusedLMHead, HeadInputs, PipelineNTLLoss,
                                                 tied_head)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "pipeline.py")


def test_pp2_equals_the_unpipelined_model(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), SCRIPT, str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = [json.loads((tmp_path / f"result.json.{r}").read_text()) for r in (0, 1)]
    assert set(stages[0]) == {"zero0_logits", "zero1_fused", "zero1_fused_global_mse",
                              "zero0_tied"}
    for name in stages[0]:
        first, last = stages[0][name], stages[1][name]
        assert (first["stage"], last["stage"]) == (0, 1) and last["first_layer"] == 3
        assert len(first["grad_rel_err"]) + len(last["grad_rel_err"]) == 16  # every parameter
        if name == "zero0_tied":  # the embedding on stage 0 is the head on stage 1
            assert "tied_modules.embed.weight" in first["grad_rel_err"]
            assert "tied_modules.embed.weight" in last["grad_rel_err"]
        for row in (first, last):
            assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-6), name
            assert max(row["grad_rel_err"].values()) < 1e-5, (name, row["grad_rel_err"])
        assert last["loss_inputs"] == (["Tensor"] if "logits" in name else ["HeadInputs"])
        for key, want in last["ref_metrics"].items():
            assert last["metrics"][key] == pytest.approx(want, rel=1e-5, abs=1e-7), (name, key)


def test_fused_head_layer_and_loss_in_one_process():
    """FusedLMHead: HeadInputs in training, logits in eval; the loss takes both and matches."""
    torch.manual_seed(0)
    vocab = NumberVocab.from_tokens(["<pad>"] + [str(d) for d in range(10)] + ["a", "b"])
    head, hidden = FusedLMHead(8, 13, bias=True), torch.randn(2, 5, 8)
    labels = torch.tensor([[1, 2, 11, -100, 4], [12, 3, 3, 7, 0]])
    loss_fn = PipelineNTLLoss(vocab, NTLConfig(weight=0.3))
    fused = loss_fn(head.train()(hidden), labels)
    logits = head.eval()(hidden)
    assert isinstance(head.train()(hidden), HeadInputs) and logits.shape == (2, 5, 13)
    assert fused.item() == pytest.approx(loss_fn(logits, labels).item(), rel=1e-6)
    embedding = torch.nn.Embedding(13, 8)
    tied = loss_fn(tied_head(embedding.train(), hidden), labels)
    assert tied.item() == pytest.approx(
        loss_fn(tied_head(embedding.eval(), hidden), labels).item(), rel=1e-6)
    with pytest.raises(TypeError, match="logits or FusedLMHead"):
        loss_fn([logits], labels)
    with pytest.raises(TypeError, match="not a deepspeed.pipe.PipelineModule"):
        loss_fn.bind(torch.nn.Linear(2, 2))
