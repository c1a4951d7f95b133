import shutil

import numpy as np
import pytest
import torch

from attentropy.attention import recorded_layers
from attentropy.entropy import entropy_varentropy
from attentropy.schema import ATTN_STATS

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
def tiny_mllama():
    """A tiny random Llama 3.2 Vision (Mllama): 5 text layers, of which 1 and 3 are cross-attention layers (they
    run only with an image)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1, 3], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=32,
                  intermediate_layers_indices=[0])
    config = MllamaConfig(text_config=text, vision_config=vision)
    model = MllamaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # open the cross-attention layers' gates (0 at init): a layer that runs changes the output
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded):
    """A tiny random Llama saved as a local model directory with the embedded model's tokenizer."""
    from transformers import LlamaForCausalLM

    _, tokenizer, _ = embedded
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=2,
                                                            eos_token_id=2))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (model, tokenizer, info)."""
    from attentropy.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(embedded):
    """The embedded model's tokenizer."""
    return embedded[1]


def eager_forward(model, ids: list[int]):
    """The output of an eager forward over `ids` with `output_attentions` (attentions: [1, H, T, T] per layer)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation(previous)


def eager_reference(model, prompt, completion):
    """Every statistic recomputed from `output_attentions` of an eager forward over the unpadded sequence."""
    first, n = len(prompt) - 1, len(completion)
    out = eager_forward(model, prompt + completion[:-1])
    att = torch.stack(out.attentions, 1)[0].float()  # [L, H, T, T]
    rows = att[:, :, first:first + n].permute(2, 0, 1, 3)  # [n, L, H, K]
    h, v = entropy_varentropy(rows.log())
    pos = torch.arange(first, first + n)
    idx = pos.view(-1, 1, 1, 1).expand(-1, rows.shape[1], rows.shape[2], 1)
    stats = {
        "entropy": h, "varentropy": v, "sink_mass": rows[..., 0],
        "prompt_mass": rows[..., : len(prompt)].sum(-1),
        "diag_mass": rows.gather(-1, idx).squeeze(-1),
        "prev_mass": rows.gather(-1, (idx - 1).clamp(min=0)).squeeze(-1),
    }
    logp = torch.log_softmax(out.logits[0, first:first + n].float(), -1)
    lh, lv = entropy_varentropy(logp)
    token = {"logprob": logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), "logit_entropy": lh,
             "logit_varentropy": lv}
    return stats, token


def assert_matches_eager(model, prompts, completions, results, atol=1e-4):
    for p, c, r in zip(prompts, completions, results):
        stats, token = eager_reference(model, p, c)
        assert r.attn.shape == (len(c), len(recorded_layers(model)), model.config.num_attention_heads, 6)
        for s, name in enumerate(ATTN_STATS):
            np.testing.assert_allclose(r.attn[..., s], stats[name].numpy(), atol=atol, err_msg=name)
        for name, ref in token.items():
            np.testing.assert_allclose(getattr(r, name), ref.numpy(), atol=atol, err_msg=name)
        np.testing.assert_array_equal(r.n_keys, np.arange(len(p), len(p) + len(c)))


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium, headless, through selenium (the HTML pages are tested in a real browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("Debian's chromium and chromium-driver are needed for the report tests: run scripts/setup.sh "
                    "--browser (./test.sh does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


def assert_matches_eager_mllama(model, prompts, completions, results):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for p, c, r in zip(prompts, completions, results):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([p + c[:-1]]), output_attentions=True)
            # eager returns one attention tensor per layer that ran: the self-attention layers only
            att = torch.stack([a for a in out.attentions if a is not None], 1)[0].float()
            assert att.shape[0] == 3 and r.attn.shape[1] == 3
            rows = att[:, :, len(p) - 1:len(p) - 1 + len(c)].permute(2, 0, 1, 3)
            h, v = entropy_varentropy(rows.log())
            np.testing.assert_allclose(r.attn[..., 0], h.numpy(), atol=1e-4)
            np.testing.assert_allclose(r.attn[..., 1], v.numpy(), atol=1e-4)
    finally:
        model.set_attn_implementation(previous)
