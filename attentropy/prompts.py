"""The prompt protocol: the chat each benchmark's question is asked in (the bare question, or GSM8K-style few-shot
exemplars), or for a base model (no chat template, or `--protocol base`) the same as plain-text few-shot Q/A
(`base_prompt`); its token ids, the new-token bounds and what ends an answer (end-of-turn tokens; for the base
protocol also a blank line or the next "Q:", `answer_end`)."""

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

CHAT, BASE = "chat", "base"
# The base protocol's factual exemplars: short Q/A pairs of kinds the offline suites do not ask (no answer leaks)
BASE_FACT_SHOTS = (("Who wrote the novel Pride and Prejudice?", "Jane Austen"),
                   ("In what year did the Apollo 11 mission land on the Moon?", "1969"),
                   ("What is the largest planet in the Solar System?", "Jupiter"),
                   ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
                   ("How many sides does a hexagon have?", "6"))
BASE_STOP_STRINGS = ("\n\n", "\nQ:")  # the end of a base-protocol answer: a blank line, or the next question
STOP_TAIL_TOKENS = 8  # a stop string is looked for in the text of the answer's last tokens (it spans fewer)


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


def run_protocol(requested: str, chat_template: bool, kind: str) -> dict:
    """What a run's config.json adds to its protocol for `--protocol` `requested` (auto: base where the model has
    no chat template): nothing for the chat protocol (the chat template), the base protocol's text format, stop
    strings and factual exemplars for base."""
    if requested not in ("auto", CHAT, BASE):
        raise ValueError(f"--protocol must be auto, chat or base, got {requested!r}")
    if requested == CHAT and not chat_template:
        raise ValueError("--protocol chat needs a chat template, and this model's tokenizer has none (a base model)")
    if requested == CHAT or (requested == "auto" and chat_template):
        return {}
    added = {"format": BASE, "chat_template": False, "user_template": None, "stop_strings": list(BASE_STOP_STRINGS),
             "prompt": "plain text: few-shot 'Q: {question}\nA: {answer}' pairs separated by a blank line, then "
                       "'Q: {question}\nA:'; the answer ends at a blank line or the next 'Q:' (or end of text)"}
    if kind == "factual":
        added["exemplars"] = [f"Q: {q}\nA: {a}" for q, a in BASE_FACT_SHOTS]
    return added if kind != "free" else {"format": BASE, "chat_template": False, "user_template": None}


def protocol_of(tokenizer, question: Question) -> str:
    """The question's protocol: the run's (`metadata["protocol"]`), else base where the tokenizer has no chat
    template."""
    protocol = question.metadata.get("protocol") or (BASE if tokenizer.chat_template is None else CHAT)
    if protocol == CHAT and tokenizer.chat_template is None:
        raise ValueError(f"question {question.id}: the chat protocol needs a chat template, and this tokenizer has "
                         "none (a base model: --protocol base)")
    return protocol


def base_prompt(question: Question, shots: int = MATH_SHOTS) -> str:
    """The base protocol's plain text: few-shot "Q: ...\nA: ..." pairs separated by blank lines (factual: the
    fixed `BASE_FACT_SHOTS`; math: the chat protocol's `shots` exemplars, each answer ending "The final answer is
    N"), then "Q: {question}\nA:"; a free prompt is its text as it is."""
    kind = protocol_kind(question.benchmark)
    if kind == "free":
        return question.question
    pairs = (BASE_FACT_SHOTS if kind == "factual" else
             [(ex.question, exemplar_answer(ex.reference)) for ex in fewshot_exemplars(question)[:shots]])
    return "".join(f"Q: {q}\nA: {a}\n\n" for q, a in pairs) + f"Q: {question.question}\nA:"


def stop_strings(tokenizer, question: Question) -> tuple[str, ...]:
    """Texts that end an answer besides the end-of-turn tokens: the base protocol's for its Q/A prompts."""
    if question.metadata.get("raw") or protocol_kind(question.benchmark) == "free":
        return ()
    return BASE_STOP_STRINGS if protocol_of(tokenizer, question) == BASE else ()


def answer_end(tokenizer, completion: list[int], strings: tuple[str, ...]) -> bool:
    """Whether the last token of `completion` completes one of the stop `strings` (called after every token, so
    the first completion is found when it happens; the text of the last `STOP_TAIL_TOKENS` tokens is read)."""
    if not strings:
        return False
    tail = tokenizer.decode(completion[-STOP_TAIL_TOKENS:], skip_special_tokens=True)
    return any(s in tail for s in strings)


def answer_text(tokenizer, completion: list[int], strings: tuple[str, ...] = ()) -> str:
    """The answer's text: the completion decoded without special tokens, cut before the first stop string."""
    text = tokenizer.decode(completion, skip_special_tokens=True)
    cuts = [text.find(s) for s in strings if s in text]
    return text[:min(cuts)] if cuts else text


def prompt_ids(tokenizer, question: Question, shots: int = MATH_SHOTS) -> list[int]:
    """The prompt's token ids: the chat template applied to `chat_messages`; for a raw free prompt the text
    as the tokenizer encodes it for continuation (with its beginning-of-text token, if it adds one), and for the
    base protocol `base_prompt`'s text so encoded."""
    if question.metadata.get("raw"):
        return list(tokenizer(question.question, add_special_tokens=True)["input_ids"])
    if protocol_of(tokenizer, question) == BASE:
        return list(tokenizer(base_prompt(question, shots), add_special_tokens=True)["input_ids"])
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


def template_prefix(tokenizer) -> list[int]:
    """The chat template's start that chats of one user turn share (a default system turn, the user turn's opening):
    the common token prefix of the template rendered with unlike messages; [] for a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    renders = [list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
               for text in ("a", "What is 2 + 2?", "Zürich 1999")]
    n = min(len(r) for r in renders)
    return renders[0][:next((i for i in range(n) if len({r[i] for r in renders}) > 1), n)]
