"""Exploring ordinary text generation: free prompts (`run --benchmark prompts`), ungraded runs in the report (alone
and beside graded ones), and `attentropy trace` on the embedded model, checked in a real headless browser."""

import json
import re

import pytest

from attentropy import load_run
from attentropy.cli import main
from attentropy.data import DataError, read_prompts
from attentropy.run import run_benchmark
from synthetic import write_synthetic_run


@pytest.mark.parametrize("name, text, error", [
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "a", "max_new_tokens": "8"}\n', r"p.jsonl: line 2: field 'max_new_tokens' must be an integer"),
    ("p.jsonl", '{"prompt": "ok"}\nnot json\n', r"p.jsonl: line 2: not valid JSON"),
    ("p.jsonl", '{"prompt": ""}\n', r"p.jsonl: line 1: field 'prompt' is missing or empty"),
    ("p.jsonl", '{"text": "hi"}\n', r"p.jsonl: line 1: unknown field\(s\) \['text'\]"),
    ("p.jsonl", '["hi"]\n', r"p.jsonl: line 1: expected an object"),
    ("p.jsonl", '{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}\n', r"line 3: id 'a' already used on line 1"),
    ("p.jsonl", '{"id": "a/b", "prompt": "x"}\n', r"line 1: field 'id' must be"),
    ("p.jsonl", '{"prompt": "x", "max_new_tokens": 0}\n', r"line 1: field 'max_new_tokens' must be at least 1"),
    ("p.txt", "\n\n  \n", r"p.txt: no prompts"),
])
def test_malformed_prompt_files_name_file_line_and_field(tmp_path, name, text, error):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=error):
        read_prompts(path)


def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("Tell me a story.\n\nA line\\nand its second line\n")
    assert [(q.id, q.question) for q in read_prompts(text)] == [
        ("prompts-00001", "Tell me a story."), ("prompts-00003", "A line\nand its second line")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": "story", "prompt": "Once", "system": "Be brief.", "max_new_tokens": 5}\n')
    q = read_prompts(jsonl)[0]
    assert (q.id, q.metadata["system"], q.metadata["max_new_tokens"]) == ("story", "Be brief.", 5)
    with pytest.raises(DataError, match="line 1: field 'system' needs the chat template"):
        read_prompts(jsonl, raw=True)


@pytest.fixture(scope="module")
def prompts_runs(tmp_path_factory, tiny_model_dir):
    """Free prompts through `attentropy run` with the chat template (one prompt with its own system turn and bound)
    and raw; then a report of the chat run beside a graded one."""
    root = tmp_path_factory.mktemp("prompts")
    data = root / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"id": "story", "prompt": "Tell me a story.", "max_new_tokens": 4},
        {"id": "sky", "prompt": "Why is the sky blue?", "system": "Answer in one sentence."},
        {"prompt": "Count to five."}]) + "\n")
    assert main(["run", "--benchmark", "prompts", "--data", str(data), "--model", tiny_model_dir, "--out",
                 str(root / "chat"), "--max-new-tokens", "10", "--save-attention", "sky", "--quiet"]) == 0
    raw = root / "raw.txt"
    raw.write_text("The capital of France is\nOnce upon a time\n")
    run_benchmark("prompts", root / "raw", model=tiny_model_dir, data=str(raw), max_new_tokens=6, raw=True,
                  progress=False)
    write_synthetic_run(root / "facts", benchmark="facts", n_questions=30)
    assert main(["report", str(root / "chat"), str(root / "facts"), "--out", str(root), "--n-boot", "20",
                 "--quiet"]) == 0
    return root


def test_free_prompts_run_with_their_own_settings(prompts_runs, tokenizer):
    run = load_run(prompts_runs / "chat")
    s = run.samples.set_index("question_id")
    assert sorted(s.index) == ["prompts-00003", "sky", "story"]  # (committed in the order answers ended)
    assert len(s.completion_ids["story"]) <= 4 and len(s.completion_ids["sky"]) <= 10
    assert "Answer in one sentence." in tokenizer.decode(s.prompt_ids["sky"])  # its system turn
    assert "<|im_start|>user" in tokenizer.decode(s.prompt_ids["story"])  # the chat template
    assert run.attention_map("sky")  # --save-attention works as for the benchmarks
    assert len(run.tokens) == sum(map(len, s.completion_ids)) and run.attn("entropy").shape[0] == len(run.tokens)
    raw = load_run(prompts_runs / "raw").samples
    assert list(raw.prompt_ids[0]) == tokenizer("The capital of France is")["input_ids"]  # no template
    assert load_run(prompts_runs / "raw").config["protocol"]["chat_template"] is False


def test_grading_free_prompts_is_refused_clearly(prompts_runs, capsys):
    assert main(["grade", str(prompts_runs / "raw")]) == 2
    assert "free prompts, which have no gold answer" in capsys.readouterr().err


def test_mixed_graded_and_ungraded_report_in_a_real_browser(prompts_runs, browser):
    from selenium.webdriver.common.by import By

    html = (prompts_runs / "report.html").read_text()
    assert "chat: no contrasts — free prompts have no gold answer" in html
    assert "facts: hallucinated" in html  # the graded run's contrasts are there
    browser.get((prompts_runs / "report.html").as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    runs = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#run option")]
    assert runs == ["chat", "facts"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#answers .answer")) == 3  # the chat run's answers
    labels = [el.get_attribute("data-filter") for el in browser.find_elements(By.CSS_SELECTOR, "#filters input")]
    assert labels == ["ungraded"]


def test_trace_on_the_embedded_model_in_a_real_browser(tmp_path, browser, capsys):
    from selenium.webdriver.common.by import By

    out = tmp_path / "trace"
    assert main(["trace", "What is the capital of France?", "--max-new-tokens", "6", "--out", str(out),
                 "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"trace: {(out / 'trace.html').resolve()}"
    browser.get((out / "trace.html").as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    tokens = browser.find_elements(By.CSS_SELECTOR, "#answers .tok")
    n = len(load_run(out / "run").tokens)
    assert len(tokens) == n and 1 <= n <= 6
    assert all(t.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)" for t in tokens)  # coloured
    tokens[-1].click()  # its attention over the prompt and the answer so far, for layer 0 head 0
    keys = browser.find_elements(By.CSS_SELECTOR, "#keys .key")
    prompt_len = len(load_run(out / "run").samples.prompt_ids[0])
    assert len(keys) == prompt_len + n - 1
    assert re.search(rf"token {n - 1} attends over {prompt_len + n - 1} keys; entropy \d\.\d+ nats",
                     browser.find_element(By.ID, "mapinfo").text)
    assert browser.find_element(By.ID, "map").size["width"] > 0
    assert (out / "figures" / "trace.png").exists() and (out / "figures" / "trace.csv").exists()
    # --text: the same answer coloured in a terminal, reusing the generation
    assert main(["trace", "What is the capital of France?", "--max-new-tokens", "6", "--out", str(out), "--text",
                 "--stat", "logit_entropy", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.count("\x1b[48;2;") >= n and "logit_entropy (per token)" in text
