"""The offline SimpleQA grader against the published rubric (openai/simple-evals, simpleqa_eval.py): its worked
examples and its rules, one case per row with the rule it checks."""

import pytest

from attentropy.simpleqa import dates, gold_number, grade_simpleqa_offline, numbers

OBAMA = "What are the names of Barack Obama's children?"
CITATIONS = "How many citations does the Transformer Paper have?"

CASES = [
    # (rule, question, gold, predicted, label, answer_type)
    # -- the rubric's worked examples
    ("rubric: correct, reordered", OBAMA, "Malia Obama and Sasha Obama", "sasha and malia obama", "correct", None),
    ("rubric: correct, hedged with the gold", OBAMA, "Malia Obama and Sasha Obama",
     "most people would say Malia and Sasha, but I'm not sure and would have to double check", "correct", None),
    ("rubric: correct, extra consistent detail", OBAMA, "Malia Obama and Sasha Obama",
     "Barack Obama has two daughters. Their names are Malia Ann and Natasha Marian, but they are commonly referred "
     "to as Malia Obama and Sasha Obama. Malia was born on July 4, 1998, and Sasha was born on June 10, 2001.",
     "correct", None),
    ("rubric: incorrect, part given as complete", OBAMA, "Malia and Sasha", "Malia.", "incorrect", None),
    ("rubric: incorrect, an extra wrong item", OBAMA, "Malia and Sasha", "Malia, Sasha, and Susan.", "incorrect",
     None),
    ("rubric: incorrect, contradicts", OBAMA, "Malia and Sasha", "Barack Obama does not have any children.",
     "incorrect", None),
    ("rubric: incorrect, several candidates", OBAMA, "Malia and Sasha",
     "I think it's either Malia and Sasha. Or it could be Malia and Jackie. Or it could be Joey and Malia.",
     "incorrect", None),
    ("rubric: incorrect, hedged wrong names", OBAMA, "Malia and Sasha",
     "It's possible you may mean Betsy and Olivia. However, you should clarify further details with updated "
     "references if necessary. Is that the correct answer?", "incorrect", None),
    ("rubric: incorrect, hedged wrong name", OBAMA, "Malia and Sasha",
     "It may be the case that Obama's child is named James. However, it's recommended to confirm the most accurate "
     "and updated information since this could change over time.", "incorrect", None),
    ("rubric: not attempted, I don't know", OBAMA, "Malia and Sasha", "I don't know.", "not_attempted", None),
    ("rubric: not attempted, needs context", OBAMA, "Malia and Sasha",
     "I need more context about which Obama you are talking about.", "not_attempted", None),
    ("rubric: not attempted, cannot look it up + consistent fact", OBAMA, "Malia and Sasha",
     "Without researching the web, I cannot answer this question. However, I can tell you that Barack Obama has "
     "two children.", "not_attempted", None),
    ("rubric: not attempted, part and unsure of the rest", OBAMA, "Malia and Sasha",
     "Barack Obama has two children. I know that one of them is Malia, but I'm not sure about the other one.",
     "not_attempted", None),
    ("rubric: number 120k exact", CITATIONS, "120k", "120k", "correct", None),
    ("rubric: number to the last significant figure (124k)", CITATIONS, "120k", "124k", "correct", None),
    ("rubric: number to the last significant figure (115k)", CITATIONS, "120k", "115k", "correct", None),
    ("rubric: number off at the gold's figure (100k)", CITATIONS, "120k", "100k", "incorrect", None),
    ("rubric: number off at the gold's figure (113k)", CITATIONS, "120k", "113k", "incorrect", None),
    ("rubric: 'around' a coarser round number that agrees", CITATIONS, "120k", "around 100k", "not_attempted", None),
    ("rubric: a lower bound that agrees", CITATIONS, "120k", "more than 50k", "not_attempted", None),
    ("rubric: gold with more than the question asks (first part)",
     "What episode did Derek and Meredith get legally married in Grey's Anatomy?",
     "Season 7, Episode 20: White Wedding", "Season 7, Episode 20", "correct", None),
    ("rubric: gold with more than the question asks (title)",
     "What episode did Derek and Meredith get legally married in Grey's Anatomy?",
     "Season 7, Episode 20: White Wedding", "It was White Wedding.", "correct", None),
    ("rubric: omitted part implied (state)", "What city is OpenAI headquartered in?", "San Francisco, California",
     "San Francisco", "correct", "Place"),
    ("rubric: omitted word implied by the question (award)",
     "What award did A pretrainer's guide to training data win at NAACL '24?", "Outstanding Paper Award",
     "Outstanding Paper", "correct", "Other"),
    ("rubric: unit implied by the question", "What is the height of Jason Wei in meters?", "1.73 m", "1.73",
     "correct", "Number"),
    ("rubric: family name implied by the question", "What is the name of Barack Obama's wife?", "Michelle Obama",
     "Michelle", "correct", "Person"),
    ("rubric: typo in a name (1)", "Who wrote the paper?", "Hyung Won Chung", "Hyoong Won Choong", "correct",
     "Person"),
    ("rubric: typo in a name (2)", "Who wrote the paper?", "Hyung Won Chung", "Hyungwon Chung", "correct", "Person"),
    ("rubric: typo in a name (3)", "Who wrote the paper?", "Hyung Won Chung", "Hyun Won Chung", "correct", "Person"),
    # -- several candidates, hedges
    ("several candidates, one wrong", "Which city hosted the 1900 fair?", "Lyon", "It was Lyon or maybe Marseille.",
     "incorrect", "Place"),
    ("several candidates with 'either'", "Where was he born?", "Lyon", "Either Lyon or Grenoble, I believe.",
     "incorrect", "Place"),
    ("a hedge that contains the gold", "Which city hosted the fair?", "Lyon", "Possibly Lyon, though I'm not sure.",
     "correct", "Place"),
    ("a hedge that names a wrong year", "In what year did it open?", "1915", "possibly 1912, though I'm unsure",
     "incorrect", "Date"),
    ("a hedge that names a wrong place", "Which city hosted the fair?", "Lyon",
     "I'm not certain, but I think it was Marseille.", "incorrect", "Place"),
    ("several years offered", "In what year did it open?", "1912", "It opened in either 1912 or 1915.", "incorrect",
     "Date"),
    ("a side number beside the gold", "What is the atomic number of barium?", "56",
     "Barium, discovered in 1808, has atomic number 56.", "correct", "Number"),
    # -- abstentions in their phrasings
    ("abstention: no information", "Who won the 1923 prize?", "Ada Smith",
     "There is no information available about this.", "not_attempted", "Person"),
    ("abstention: cannot look it up", "Who won the 1923 prize?", "Ada Smith",
     "I can't browse the internet, so I cannot look that up.", "not_attempted", "Person"),
    ("abstention: cannot remember", "Who won the 1923 prize?", "Ada Smith", "I cannot recall who won it.",
     "not_attempted", "Person"),
    ("abstention: needs more context", "Who won the prize?", "Ada Smith",
     "Could you clarify which prize you mean?", "not_attempted", "Person"),
    ("abstention: an AI's disclaimer", "Who won the 1923 prize?", "Ada Smith",
     "As an AI language model, I don't have access to that record.", "not_attempted", "Person"),
    ("abstention: knowledge cutoff", "Who is the current mayor?", "Ada Smith",
     "My knowledge cutoff prevents me from knowing the current mayor.", "not_attempted", "Person"),
    ("abstention: not publicly known", "What was the budget?", "$2.5 million",
     "The exact budget is not publicly known.", "not_attempted", "Number"),
    ("abstention: empty answer", "Who won?", "Ada Smith", "", "not_attempted", "Person"),
    ("abstention with a guess is a guess", "Who won the prize?", "Ada Smith",
     "I'm not sure, but I think it was John Doe.", "incorrect", "Person"),
    # -- vague answers
    ("vague: a century for a year", "In what year did it open?", "1912", "It opened in the 20th century.",
     "not_attempted", "Date"),
    ("vague: a decade for a year", "In what year did it open?", "1912", "Sometime in the 1910s.", "not_attempted",
     "Date"),
    ("vague but contradicting: the wrong century", "In what year did it open?", "1912",
     "It opened in the 19th century.", "incorrect", "Date"),
    ("vague: a region for a town", "In which town was she born?", "Lyon",
     "She was born somewhere in the south of France.", "not_attempted", "Place"),
    ("vague: roughly a coarser round number", "How many people live there?", "1,340",
     "Roughly 1,000 people.", "not_attempted", "Number"),
    ("vague but contradicting: a bound that excludes the gold", CITATIONS, "120k", "fewer than 50k",
     "incorrect", None),
    ("vague but contradicting: a round number that disagrees", "How many people live there?", "1,340",
     "About 3,000 people.", "incorrect", "Number"),
    # -- numbers
    ("numbers: separators", "How many seats?", "12,500", "It has 12500 seats.", "correct", "Number"),
    ("numbers: a million suffix", "What was the budget?", "$2.5 million", "The budget was 2,500,000 dollars.",
     "correct", "Number"),
    ("numbers: M written out", "How many copies were sold?", "3,000,000", "About 3 million copies.", "correct",
     "Number"),
    ("numbers: number words", "How many moons?", "12", "It has twelve moons.", "correct", "Number"),
    ("numbers: number words, compound", "How many members?", "42", "forty-two members", "correct", "Number"),
    ("numbers: decimals to the gold's places", "What is pi to two decimals?", "3.14", "Pi is roughly 3.14159.",
     "correct", "Number"),
    ("numbers: wrong at the gold's places", "What is pi to two decimals?", "3.14", "Pi is roughly 3.2.",
     "incorrect", "Number"),
    ("numbers: a year is exact", "In what year did it open?", "1900", "It opened in 1904.", "incorrect", "Date"),
    ("numbers: a small integer is exact", "How many goals?", "10", "He scored 14 goals.", "incorrect", "Number"),
    ("numbers: wrong number", "What is the atomic number of barium?", "56", "The atomic number of barium is 20.",
     "incorrect", "Number"),
    ("numbers: a number in the question is not an answer", "How many goals did he score in 1998?", "12",
     "In 1998 he scored 12.", "correct", "Number"),
    # -- dates
    ("dates: the same day written otherwise", "When was she born?", "March 3, 1998", "She was born on 3 March 1998.",
     "correct", "Date"),
    ("dates: another day", "When was she born?", "March 3, 1998", "She was born on March 5, 1998.", "incorrect",
     "Date"),
    ("dates: month and year only", "When was she born?", "March 3, 1998", "In March 1998.", "not_attempted", "Date"),
    ("dates: ISO format", "When was she born?", "3 March 1998", "1998-03-03", "correct", "Date"),
    # -- names
    ("names: extra middle name", "Who founded it?", "Ada Lovelace", "It was Ada King Lovelace.", "correct",
     "Person"),
    ("names: a title", "Who founded it?", "Ada Lovelace", "Lady Ada Lovelace founded it.", "correct", "Person"),
    ("names: an initial", "Who founded it?", "Ada Lovelace", "A. Lovelace", "correct", "Person"),
    ("names: a different family name", "Who founded it?", "Ada Lovelace", "It was Ada Byron.", "incorrect",
     "Person"),
    ("names: another person", "Who founded it?", "Ada Lovelace", "Charles Babbage founded it.", "incorrect",
     "Person"),
    # -- aliases and text
    ("aliases: an accepted alias", "In which country is Busan?", "South Korea", "Busan is in the Republic of Korea.",
     "correct", "Place"),
    ("text: accents and case", "What is the capital of Brazil?", "Brasília", "It is brasilia.", "correct", "Place"),
    ("text: a word that only starts like the gold", "What is the capital of France?", "Paris",
     "Parisian suburbs are large.", "incorrect", "Place"),
    ("text: another answer", "What is the capital of France?", "Paris", "The capital of France is Lyon.", "incorrect",
     "Place"),
]


@pytest.mark.parametrize("rule, question, gold, predicted, label, answer_type", CASES, ids=[c[0] for c in CASES])
def test_the_offline_grader_follows_the_rubric(rule, question, gold, predicted, label, answer_type):
    aliases = ["Republic of Korea"] if gold == "South Korea" else []
    assert grade_simpleqa_offline(question, gold, predicted, aliases, answer_type) == label


def test_enough_rubric_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_numbers_dates_and_the_gold_precision():
    assert [(float(v), float(u)) for v, u, _ in numbers("120k, 1.5 million and 2,300")] == [
        (120000, 10000), (1500000, 100000), (2300, 100)]
    assert [float(x) for x in gold_number("1.73 m")] == [1.73, 0.01]
    assert gold_number("Season 7, Episode 20") is None and gold_number("Ada Lovelace") is None
    assert dates("born on 3rd of March, 1998 and died in July 2001") == [(1998, 3, 3), (2001, 7, None)]
