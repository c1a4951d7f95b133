"""Loaders of the published formats, their errors, and the offline suites."""

import json
from pathlib import Path

import pytest

from attentropy.data import DataError, fewshot_exemplars, gsm8k_final_answer, load_questions, read_gsm8k, read_simpleqa

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


SIMPLEQA_HEADER = "metadata,problem,answer\n"
SIMPLEQA_ROW = "\"{'topic': 'Art', 'answer_type': 'Person', 'urls': ['https://example.org']}\",Who painted X?,Jane Doe\n"


def test_simpleqa_published_format(tmp_path):
    path = write(tmp_path, "s.csv", SIMPLEQA_HEADER + SIMPLEQA_ROW * 3)
    qs = read_simpleqa(path)
    assert [q.id for q in qs] == ["simpleqa-00000", "simpleqa-00001", "simpleqa-00002"]
    assert qs[0].question == "Who painted X?" and qs[0].target == "Jane Doe"
    assert qs[0].metadata == {"topic": "Art", "answer_type": "Person", "urls": ["https://example.org"]}


@pytest.mark.parametrize("text, message", [
    ("problem,answer\nq,a\n", r"line 1: expected columns .*missing \['metadata'\]"),
    (SIMPLEQA_HEADER + SIMPLEQA_ROW + "\"{'topic': \",Q?,A\n", r"line 3: field 'metadata' is not a Python dict"),
    (SIMPLEQA_HEADER + "\"[1, 2]\",Q?,A\n", r"line 2: field 'metadata' must be a dict"),
    (SIMPLEQA_HEADER + SIMPLEQA_ROW + "\"{}\",Q?,\n", r"line 3: field 'answer' is empty"),
])
def test_simpleqa_errors_name_file_line_and_field(tmp_path, text, message):
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(DataError, match=message) as e:
        read_simpleqa(path)
    assert str(path) in str(e.value)


def test_gsm8k_published_format(tmp_path):
    rows = [{"question": "Q1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
            {"question": "Q2?", "answer": "It is 1,000 + 200 = <<1000+200=1200>>1,200\n#### 1,200"}]
    path = write(tmp_path, "g.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    qs = read_gsm8k(path)
    assert [q.id for q in qs] == ["gsm8k-00000", "gsm8k-00001"]
    assert [q.target for q in qs] == ["2", "1200"]
    assert qs[0].reference == rows[0]["answer"]


@pytest.mark.parametrize("text, message", [
    ('{"question": "Q", "answer": "#### 1"}\n{"question": "Q", "answer": "#### 1"\n', r"line 2: not valid JSON"),
    ('{"question": "Q", "answer": "#### 1"}\n\n{"question": "Q"}\n', r"line 3: expected an object with string"),
    ('{"question": "Q", "answer": "no final line"}\n', r"line 1: field 'answer' must end with a line '#### <number>'"),
    ("", r"no rows"),
])
def test_gsm8k_errors_name_file_line_and_field(tmp_path, text, message):
    path = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(DataError, match=message) as e:
        read_gsm8k(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("solution, expected", [("a\n#### 72", "72"), ("#### -3", "-3"), ("#### 1,234", "1234"),
                                                ("#### 0.5", "0.5"), ("no answer", None)])
def test_gsm8k_final_answer(solution, expected):
    assert gsm8k_final_answer(solution) == expected


@pytest.mark.skipif(not SHARED.exists(), reason="the real benchmark files are not beside this checkout")
def test_real_files_load():
    simpleqa = read_simpleqa(SHARED / "simple_qa_test_set.csv")
    gsm8k = read_gsm8k(SHARED / "gsm8k_test.jsonl")
    assert len(simpleqa) == 4326 and len(gsm8k) == 1319
    assert gsm8k[0].target == "18" and simpleqa[0].target == "Michio Sugeno"
    assert all(q.metadata.get("topic") for q in simpleqa)


def test_offset_and_limit_keep_stable_ids(tmp_path):
    path = write(tmp_path, "g.jsonl", "".join(json.dumps({"question": f"Q{i}", "answer": f"#### {i}"}) + "\n"
                                              for i in range(10)))
    qs = load_questions("gsm8k", path, offset=3, limit=4)
    assert [q.id for q in qs] == ["gsm8k-00003", "gsm8k-00004", "gsm8k-00005", "gsm8k-00006"]
    assert [q.id for q in load_questions("facts", offset=5, limit=2)] == ["facts-00005", "facts-00006"]


def test_unknown_benchmark_and_data_for_a_suite_are_errors():
    with pytest.raises(DataError, match="unknown benchmark"):
        load_questions("mmlu")
    with pytest.raises(DataError, match="does not apply"):
        load_questions("facts", "x.csv")


def test_gsm8k_from_hub_offline_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-attentropy-test")
    with pytest.raises(DataError, match="--data PATH"):
        load_questions("gsm8k")




def test_fewshot_exemplars_are_the_first_train_rows():
    ex = fewshot_exemplars()
    assert len(ex) == 8 and ex[0].question.startswith("Natalia sold clips") and ex[0].target == "72"
    if SHARED.exists():
        train = read_gsm8k(SHARED / "gsm8k_train.jsonl")[:8]
        assert [q.question for q in train] == [q.question for q in ex]
