import pytest
import torch

torch.set_num_threads(2)  # deliberate: torch's default collapses when another process competes for the cores


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny randomly initialised Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_llama_config(), attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper attention than the default init so rows are far from uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (model, tokenizer, info)."""
    from attentropy.model import load_model

    return load_model("smollm2-135m")
