"""Small random models of every supported family, with norms and biases that are not trivial."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = {
    "llama_gqa": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2),
    "llama_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "llama_tied_bias": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=4,
                            tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", num_attention_heads=8, num_key_value_heads=2, sliding_window=8),
    "qwen2": dict(model_type="qwen2", num_attention_heads=8, num_key_value_heads=2,
                  use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "qwen3": dict(model_type="qwen3", num_attention_heads=8, num_key_value_heads=2, head_dim=12),
}


def random_model(family: str, seed: int = 0):
    spec = dict(FAMILIES[family])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=97, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=4, max_position_embeddings=64, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model
