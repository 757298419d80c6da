"""The greedy sample minitron-eval and the pipeline show: token healing of a prompt that ends in a
space, the continuation against a step-by-step argmax over full forwards in float64, and the
exported model's special token ids (generate() must stop at the tokenizer's EOS)."""
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitron.eval.sample import format_sample, greedy_sample, healed_prefix


def test_a_trailing_space_is_healed_into_the_next_token(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert tok("def ")["input_ids"] == tok("def")["input_ids"] + tok(" ")["input_ids"]
    context, allowed = healed_prefix(tok, "def ")
    assert context == tok("def")["input_ids"]
    texts = [tok.decode([i]) for i in allowed]
    assert all(t.startswith(" ") for t in texts) and " " in texts
    assert any(len(t) > 1 and t[1:].isidentifier() for t in texts)  # " name" tokens, not only spaces
    assert tok.eos_token_id not in allowed
    # A prompt of one token: the context is the document separator the model saw at every start.
    context, allowed = healed_prefix(tok, "def")
    assert context == [tok.eos_token_id] and tok("def")["input_ids"][0] in allowed


def test_greedy_sample_is_the_argmax_of_full_forwards(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    text = greedy_sample(model, tok, "def ", 12)

    reference = AutoModelForCausalLM.from_pretrained(tiny_teacher).double().eval()
    context, allowed = healed_prefix(tok, "def ")
    ids = list(context)
    with torch.no_grad():
        for step in range(12):
            logits = reference(input_ids=torch.tensor([ids])).logits[0, -1, :len(tok)]
            if step == 0:
                mask = torch.full_like(logits, float("-inf"))
                mask[allowed] = 0
                logits = logits + mask
            ids.append(int(logits.argmax()))
            if ids[-1] == tok.eos_token_id:
                break
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert text.startswith("def ")


def test_trained_models_stop_at_the_tokenizers_eos(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tiny_teacher / name).read_text())
        assert config["eos_token_id"] == tok.eos_token_id and config["bos_token_id"] == tok.bos_token_id, name
        assert config.get("pad_token_id") is None, name  # not the embedding's padding_idx


def test_format_sample_keeps_indentation_behind_a_gutter():
    shown = format_sample("teacher (teacher)", "def ", "def f(x):\n    return x\n\n")
    assert shown.splitlines() == ["teacher (teacher), greedy from 'def ':", "  | def f(x):", "  |     return x"]
