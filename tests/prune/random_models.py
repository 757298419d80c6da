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
    # LayerNorm with bias (weight applied as 1 + w), squared-ReLU MLP, half the head_dim rotated.
    "nemotron": dict(model_type="nemotron", num_attention_heads=8, num_key_value_heads=2, head_dim=12),
    # Four norms per layer, scaled tied embeddings, attention and final logit soft-caps set low
    # enough to bite, alternating sliding-window layers.
    "gemma2": dict(model_type="gemma2", num_attention_heads=8, num_key_value_heads=2, head_dim=12,
                   query_pre_attn_scalar=10, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   sliding_window=8),
    "gemma2_untied": dict(model_type="gemma2", num_attention_heads=8, num_key_value_heads=2, head_dim=12,
                          query_pre_attn_scalar=10, final_logit_softcapping=3.0, tie_word_embeddings=False),
    "gemma3_text": dict(model_type="gemma3_text", num_attention_heads=8, num_key_value_heads=2, head_dim=12,
                        query_pre_attn_scalar=10, final_logit_softcapping=3.0, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    # Fused qkv_proj and gate_up_proj.
    "phi3": dict(model_type="phi3", num_attention_heads=8, num_key_value_heads=2,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


# Mixtures of experts: every MLP is 4 experts of 32 neurons, top 2 per token; Qwen3-MoE without
# renormalising the top-k weights (they stay softmax probabilities over all experts).
MOE_FAMILIES = {
    "mixtral": dict(model_type="mixtral", num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=32),
    "qwen3_moe": dict(model_type="qwen3_moe", num_attention_heads=8, num_key_value_heads=2, head_dim=12,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False),
}


def random_model(family: str, seed: int = 0):
    spec = {"intermediate_size": 96, **(FAMILIES.get(family) or MOE_FAMILIES[family])}
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=97, hidden_size=64, num_hidden_layers=4,
                               max_position_embeddings=64, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model
