"""The prompt protocol: the chat each benchmark's question is asked in (the bare question, or GSM8K-style few-shot
exemplars), its token ids, the new-token bounds and the tokens that end an answer."""

from __future__ import annotations

import re

from .data import Question, fewshot_exemplars, protocol_kind

# Meta's published Llama 3.2 GSM8K protocol: this user turn, 8 worked exemplars as earlier chat turns,
# every answer ending "The final answer is N", up to 1024 new tokens.
MATH_USER_TEMPLATE = (
    "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.'
)
MATH_SHOTS = 8
MAX_NEW_TOKENS = {"factual": 128, "math": 1024, "free": 256}


def exemplar_answer(reference: str) -> str:
    """A GSM8K reference solution as a chain of thought: calculator annotations removed, `#### N` replaced by
    the sentence the protocol asks for."""
    body, _, final = reference.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe final answer is {final.strip()}"


def exemplar_group(question: Question) -> tuple[str, ...]:
    """The few-shot exemplars (their questions) a question's prompt starts with (empty for factual and free prompts):
    questions of one group share their prompt's long prefix, so continuous batching runs each group together."""
    if protocol_kind(question.benchmark) != "math":
        return ()
    return tuple(ex.question for ex in fewshot_exemplars(question))


def chat_messages(question: Question, shots: int = MATH_SHOTS) -> list[dict]:
    """The chat for one question: SimpleQA-style benchmarks get the bare question as the user turn; GSM8K-style
    ones get `shots` exemplars of the benchmark's train split as a multi-turn chat, then the question."""
    kind = protocol_kind(question.benchmark)
    if kind == "factual":
        return [{"role": "user", "content": question.question}]
    if kind == "free":  # a free prompt, with its own system turn if it has one
        system = question.metadata.get("system")
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question.question}]
    messages = []
    for ex in fewshot_exemplars(question)[:shots]:
        messages.append({"role": "user", "content": MATH_USER_TEMPLATE.format(question=ex.question)})
        messages.append({"role": "assistant", "content": exemplar_answer(ex.reference)})
    messages.append({"role": "user", "content": MATH_USER_TEMPLATE.format(question=question.question)})
    return messages


def prompt_ids(tokenizer, question: Question, shots: int = MATH_SHOTS) -> list[int]:
    """The prompt's token ids: the chat template applied to `chat_messages`, or for a raw free prompt the text
    as the tokenizer encodes it for continuation (with its beginning-of-text token, if it adds one)."""
    if question.metadata.get("raw"):
        return list(tokenizer(question.question, add_special_tokens=True)["input_ids"])
    ids = tokenizer.apply_chat_template(chat_messages(question, shots), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids)


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn tokens: the tokenizer's eos plus the generation config's (Llama 3.2 lists several)."""
    ids = set()
    for source in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return sorted(ids)
