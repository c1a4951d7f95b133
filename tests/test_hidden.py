"""Hidden states captured in the recording pass: equal to `output_hidden_states` of a plain forward, stored with
the run (crash-safe, resumed, read lazily), and the hidden-state probe of the instrument's evaluation."""

import numpy as np
import pytest
import torch
from synthetic import write_synthetic_run

from attentropy.answers import load_answers
from attentropy.evaluation import evaluate
from attentropy import load_run
from attentropy.capture import capture
from attentropy.data import make_facts
from attentropy.generate import generate
from attentropy.hidden_states import HiddenSpec, hidden_spec
from attentropy.model import load_model
from attentropy.run import run_benchmark


def reference(model, prompt, completion, layers):
    """(last prompt token, mean over the completion's rows) per hidden-state index, from a plain forward."""
    with torch.no_grad():
        out = model(torch.tensor([prompt + completion[:-1]]), output_hidden_states=True)
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
    states = torch.stack([out.hidden_states[i][0, rows] for i in layers])  # [L_h, n, d]
    return states[:, 0].numpy(), states.mean(1).numpy(), states.permute(1, 0, 2).numpy()


def test_hidden_states_equal_output_hidden_states(tiny_model_dir):
    model, tokenizer, _ = load_model(tiny_model_dir)
    n_layers = model.config.num_hidden_layers
    spec = HiddenSpec(layers=tuple(range(n_layers + 1)), token_layers=(1, n_layers))
    questions = make_facts(4)
    first = generate(model, tokenizer, questions, max_new_tokens=10, record=True, hidden=spec)[0]
    # a token that the random model emits mid-answer becomes a stop token: answers of different lengths
    stop = first[1].completion_ids[4]
    model.generation_config.eos_token_id = [stop]
    try:
        gens = generate(model, tokenizer, questions, max_new_tokens=10, record=True, hidden=spec)[0]
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert len({len(g.completion_ids) for g in gens}) > 1 and any(g.finish_reason == "stop" for g in gens)
    forced = capture(model, [g.prompt_ids for g in gens], [g.completion_ids for g in gens], hidden=spec)
    for g, c_forced in zip(gens, forced):
        last, mean, tokens = reference(model, g.prompt_ids, g.completion_ids, spec.layers)
        for c in (g.capture, c_forced):  # recorded while generating, and teacher-forced
            np.testing.assert_allclose(c.hidden_last_prompt, last, atol=1e-4)
            np.testing.assert_allclose(c.hidden_mean, mean, atol=1e-4)
            np.testing.assert_allclose(c.hidden_tokens.astype(np.float32), tokens[:, [1, n_layers]], atol=5e-3,
                                       rtol=2e-3)


def test_hidden_spec_choices():
    assert hidden_spec(30).layers == (0, 4, 8, 11, 15, 19, 22, 26, 30) and hidden_spec(30).token_layers == ()
    assert hidden_spec(30, "none", "auto") == HiddenSpec((), (10, 15, 20))
    assert hidden_spec(3, "all").layers == (0, 1, 2, 3) and hidden_spec(30, "15,0").layers == (0, 15)
    with pytest.raises(ValueError, match="from 0"):
        hidden_spec(30, "31")


def test_a_run_stores_hidden_states_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    settings = dict(model=tiny_model_dir, batch_size=2, max_new_tokens=6, progress=False, hidden_layers="0,2,3",
                    hidden_token_layers="2")
    run_benchmark("facts", out, limit=3, **settings)
    run_benchmark("facts", out, limit=5, model=tiny_model_dir, batch_size=2, max_new_tokens=6, progress=False)
    run = load_run(out)  # resumed with its own hidden-state settings
    assert run.config["capture"]["hidden"]["layers"] == [0, 2, 3]
    mean = run.hidden("answer_mean")
    assert mean.shape == (5, 3, 32) and mean.dtype == np.float32
    assert run.hidden("last_prompt", layers=[3]).shape == (5, 1, 32)
    tokens = run.hidden_tokens()
    assert tokens.shape == (len(run.tokens), 1, 32) and tokens.dtype == np.float16
    model, _, _ = load_model(tiny_model_dir)
    for i, sample in enumerate(run.samples.itertuples()):
        last, answer_mean, _ = reference(model, list(sample.prompt_ids), list(sample.completion_ids), [0, 2, 3])
        np.testing.assert_allclose(mean[i], answer_mean, atol=1e-4)
        np.testing.assert_allclose(run.hidden("last_prompt")[i], last, atol=1e-4)
    with pytest.raises(KeyError, match="not kept"):
        run.hidden("answer_mean", layers=[1])
    with pytest.raises(ValueError, match="different 'capture'"):
        run_benchmark("facts", out, limit=6, **{**settings, "hidden_layers": "1"})
    plain = tmp_path / "plain"
    run_benchmark("facts", plain, limit=2, model=tiny_model_dir, batch_size=2, max_new_tokens=6, progress=False,
                  hidden_layers="none")
    with pytest.raises(KeyError, match="no hidden states"):
        load_run(plain).hidden()


def test_the_hidden_state_probe_finds_a_planted_direction(tmp_path):
    labels = ["incorrect" if i % 2 else "correct" for i in range(80)]
    path = write_synthetic_run(tmp_path / "facts", benchmark="facts", labels=labels, n_questions=80,
                               hidden=([0, 5, 10], 24), hidden_shift=3.0)
    a, _, _ = load_answers([path])
    assert a.hidden_layers == [0, 5, 10] and a.hidden["answer_mean"].shape == (80, 3, 24)
    rows, _ = evaluate(a, "factual", n_boot=100)
    auc = rows.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method").value
    assert auc["hidden"] > 0.85 and auc["attention_hidden"] > 0.75  # the direction is at index 5
    assert auc["bag_of_tokens"] < 0.7 and auc["hidden_prompt"] < 0.7 and auc["instrument"] < 0.7  # nothing there
