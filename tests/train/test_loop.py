"""The loop with a real DeepSpeed engine in this process (a world of one)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from minitron.config import DeepSpeedConfig, TrainConfig
from minitron.data.sampler import BlockSampler
from minitron.distributed.engine import deepspeed_config, initialize
from minitron.distributed.gang import LocalGang, init_gang
from minitron.eval import perplexity
from minitron.eval.perplexity import evaluate
from minitron.train.loop import lm_loss, train_loop
from minitron.train.schedule import build_optimizer

VOCAB = 97


class ListTracker:
    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows.append((step, metrics))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_extras_of_the_loss_function_are_logged_as_global_means():
    gang = init_gang()
    blocks = np.random.default_rng(0).integers(0, VOCAB, size=(64, 16))
    cfg = TrainConfig(max_steps=3, micro_batch_size=2, global_batch_size=4, eval_every=3, eval_blocks=8,
                      save_every=0, warmup_steps=1)
    model = tiny_model()
    optimizer, scheduler = build_optimizer(model, cfg)
    engine = initialize(model, optimizer, scheduler, deepspeed_config(cfg, DeepSpeedConfig(), 1))

    def loss_with_extra(m, input_ids):
        loss, _ = lm_loss(m, input_ids)
        return loss, {"twice": 2 * loss.detach()}

    tracker = ListTracker()
    result = train_loop(engine, loss_with_extra, BlockSampler(blocks, 4, 2, 0, 1, seed=0), blocks[:8],
                        cfg, gang, tracker, 0, save_checkpoint=lambda s: None, device=engine.device)
    assert [step for step, _ in tracker.rows] == [1, 2, 3]
    for _, m in tracker.rows:
        assert m["train/twice"] == pytest.approx(2 * m["train/loss"], rel=1e-6)
    assert result.val_loss == tracker.rows[-1][1]["val/loss"]


def test_evaluate_matches_a_float64_reference_with_padding_rows():
    model = tiny_model(1).eval()
    blocks = np.random.default_rng(1).integers(0, VOCAB, size=(7, 12))
    with torch.no_grad():
        ref = model.double()
        x = torch.from_numpy(blocks)
        logits = ref(input_ids=x).logits[:, :-1]
        expected = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean().item()
        model.float()
    # 7 blocks over "3 ranks" would pad; a world of one with micro batch 3 has a partial last batch.
    got = evaluate(model, blocks, micro_batch_size=3, gang=LocalGang(), device=torch.device("cpu"))
    assert got == pytest.approx(expected, rel=1e-5)
    assert evaluate(model, blocks, 3, LocalGang(), torch.device("cpu"), max_blocks=2) == pytest.approx(
        evaluate(model, blocks[:2], 3, LocalGang(), torch.device("cpu")), rel=1e-6)


@pytest.mark.parametrize("chunk", [5, 1024])
def test_chunked_sequence_losses_match_full_logits_in_float64(monkeypatch, chunk):
    """The loss over chunks of tokens (never all logits at once) equals the full-logit loss, for
    chunks that split sequences and for one chunk; tied embeddings go through the same head."""
    monkeypatch.setattr(perplexity, "LOSS_CHUNK_TOKENS", chunk)
    model = tiny_model(2).double().eval()
    x = torch.from_numpy(np.random.default_rng(2).integers(0, VOCAB, size=(3, 11)))
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
        expected = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
        got = perplexity.sequence_losses(model, x)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=0)
