"""Concept groups from keyword lists, and the rule that puts SAE features into them.

Lan et al.'s semantic subspaces (docs/references.md, "Concept features and geometry"): a
concept group is a list of keywords; an SAE feature belongs to a group when one of its top
activating tokens is a keyword. Built-in lists: `BUILTIN` (Time, Calendar, Months, Days of
week, Emotions, Countries, Nature, People/Roles, Biology, Food, Numbers; the default set),
`NAMED` (keyword lists used only when named: Arabic food) and `SCRIPTS` (Arabic, Cyrillic,
Greek, Hebrew, Devanagari, CJK, by Unicode block: a `ScriptGroup` matches every token written
in that script, so no word list is needed); user lists come from a JSON file ``{"Group":
["word", ...], ...}`` or a text file with one ``Group: word, word, ...`` line per group (``#``
starts a comment). `builtin_group` gives any built-in group by name.

Matching rule (`normalize_token`, `token_matches`), applied the same way to keywords and to
tokens:

* sub-word markers are removed: ``Ġ`` (GPT-2 / Pythia byte-level space), ``▁`` (SentencePiece
  space), ``Ċ`` (byte-level newline) anywhere, and a leading ``##`` (WordPiece continuation);
* surrounding whitespace is stripped;
* case is ignored (``str.casefold``);
* the match is WHOLE-TOKEN: the normalised token must equal a normalised keyword (``"Ġmonday"``
  matches ``Monday``; ``"mon"``, ``"mondays"`` and ``"monday,"`` do not). A keyword made of
  several words can therefore never match a single token and is refused when loaded;
* a script group matches a normalised token whose letters (``str.isalpha``) all lie in the
  script's Unicode ranges, with at least one letter (digits and punctuation are ignored, so
  ``"٣٣"`` or ``","`` never match; a token mixing scripts does not match).

A feature joins a group when any of its first ``top_n`` top-activating tokens matches (features
may join several groups). Group names are resolved case-insensitively, ignoring spaces, ``_``,
``-`` and ``/`` (``days_of_week`` == ``Days of week``; ``people`` == ``People/Roles`` through
`ALIASES`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from engine import checks

_MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

#: Built-in keyword lists (lower case; matching is case-insensitive anyway). They include the
#: words an old English text (the shipped KJV sample) uses, so the language-model preset finds
#: groups on the sample.
BUILTIN: dict[str, tuple[str, ...]] = {
    "Time": (
        "time",
        "day",
        "days",
        "night",
        "nights",
        "morning",
        "evening",
        "noon",
        "hour",
        "hours",
        "minute",
        "minutes",
        "second",
        "seconds",
        "week",
        "weeks",
        "month",
        "months",
        "year",
        "years",
        "today",
        "tomorrow",
        "yesterday",
        "now",
        "then",
        "before",
        "after",
        "while",
        "ago",
        "soon",
        "early",
        "late",
        "season",
        "seasons",
        "age",
        "ages",
        "generation",
        "generations",
        "ever",
        "always",
        "never",
        "hereafter",
        "henceforth",
        "daily",
        "tonight",
    ),
    "Calendar": _MONTHS
    + _DAYS
    + (
        "sabbath",
        "holiday",
        "feast",
        "passover",
        "calendar",
        "date",
        "week",
        "weekend",
        "month",
        "year",
        "spring",
        "summer",
        "autumn",
        "winter",
        "harvest",
        "newmoon",
    ),
    "Months": _MONTHS
    + (
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "nisan",
        "adar",
        "sivan",
        "tebeth",
    ),
    "Days of week": _DAYS
    + (
        "mon",
        "tue",
        "tues",
        "wed",
        "thu",
        "thur",
        "thurs",
        "fri",
        "sat",
        "sun",
        "weekday",
        "weekdays",
        "sabbath",
    ),
    "Emotions": (
        "joy",
        "joyful",
        "happy",
        "happiness",
        "glad",
        "gladness",
        "sad",
        "sadness",
        "sorrow",
        "sorrows",
        "grief",
        "anger",
        "angry",
        "wrath",
        "fear",
        "afraid",
        "feared",
        "love",
        "loved",
        "hate",
        "hated",
        "hatred",
        "envy",
        "jealous",
        "jealousy",
        "pride",
        "shame",
        "ashamed",
        "hope",
        "despair",
        "peace",
        "rejoice",
        "rejoiced",
        "mourn",
        "mourning",
        "weep",
        "wept",
        "laugh",
        "laughter",
        "delight",
        "pity",
        "compassion",
        "surprise",
        "disgust",
        "anxiety",
        "trouble",
        "troubled",
        "comfort",
        "lonely",
    ),
    "Countries": (
        "egypt",
        "israel",
        "assyria",
        "babylon",
        "persia",
        "media",
        "ethiopia",
        "canaan",
        "moab",
        "edom",
        "syria",
        "greece",
        "rome",
        "judah",
        "galilee",
        "samaria",
        "france",
        "germany",
        "italy",
        "spain",
        "china",
        "japan",
        "india",
        "russia",
        "england",
        "britain",
        "america",
        "canada",
        "mexico",
        "brazil",
        "australia",
        "iran",
        "iraq",
        "turkey",
        "poland",
        "portugal",
        "norway",
        "sweden",
        "kenya",
        "nigeria",
    ),
    "Nature": (
        "earth",
        "land",
        "ground",
        "dust",
        "water",
        "waters",
        "sea",
        "seas",
        "river",
        "rivers",
        "rain",
        "cloud",
        "clouds",
        "wind",
        "fire",
        "heaven",
        "heavens",
        "sky",
        "sun",
        "moon",
        "star",
        "stars",
        "light",
        "darkness",
        "tree",
        "trees",
        "grass",
        "herb",
        "flower",
        "flowers",
        "field",
        "fields",
        "mountain",
        "mountains",
        "hill",
        "hills",
        "valley",
        "wilderness",
        "forest",
        "stone",
        "stones",
        "rock",
        "sand",
        "snow",
        "storm",
        "fountain",
        "well",
        "garden",
    ),
    "People/Roles": (
        "man",
        "men",
        "woman",
        "women",
        "child",
        "children",
        "father",
        "fathers",
        "mother",
        "son",
        "sons",
        "daughter",
        "daughters",
        "brother",
        "brethren",
        "brothers",
        "sister",
        "wife",
        "husband",
        "king",
        "kings",
        "queen",
        "prince",
        "princes",
        "servant",
        "servants",
        "maid",
        "priest",
        "priests",
        "prophet",
        "prophets",
        "people",
        "master",
        "lord",
        "shepherd",
        "elders",
        "judge",
        "judges",
        "disciples",
        "disciple",
        "teacher",
        "doctor",
        "soldier",
        "soldiers",
        "captain",
        "stranger",
        "friend",
        "friends",
        "neighbour",
        "worker",
        "farmer",
    ),
    "Biology": (
        "blood",
        "flesh",
        "bone",
        "bones",
        "body",
        "heart",
        "hand",
        "hands",
        "head",
        "eye",
        "eyes",
        "face",
        "mouth",
        "ear",
        "ears",
        "foot",
        "feet",
        "skin",
        "hair",
        "seed",
        "womb",
        "birth",
        "born",
        "life",
        "death",
        "breath",
        "cell",
        "cells",
        "gene",
        "genes",
        "protein",
        "organ",
        "brain",
        "animal",
        "animals",
        "beast",
        "beasts",
        "cattle",
        "sheep",
        "goat",
        "goats",
        "ox",
        "oxen",
        "camel",
        "camels",
        "fish",
        "bird",
        "birds",
        "fowl",
        "serpent",
        "lion",
        "dog",
        "dogs",
        "horse",
        "horses",
        "ass",
    ),
    "Food": (
        "bread",
        "wine",
        "meat",
        "fish",
        "honey",
        "milk",
        "butter",
        "oil",
        "corn",
        "wheat",
        "barley",
        "flour",
        "figs",
        "grapes",
        "fruit",
        "fruits",
        "apple",
        "apples",
        "olive",
        "olives",
        "salt",
        "water",
        "eat",
        "ate",
        "eaten",
        "eating",
        "drink",
        "drank",
        "feast",
        "supper",
        "dinner",
        "meal",
        "food",
        "loaves",
        "cake",
        "cakes",
        "rice",
        "cheese",
        "egg",
        "eggs",
        "soup",
        "pottage",
        "lentils",
        "beans",
        "vinegar",
        "hunger",
        "hungry",
        "famine",
    ),
    "Numbers": (
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "twenty",
        "thirty",
        "forty",
        "fifty",
        "sixty",
        "seventy",
        "hundred",
        "thousand",
        "thousands",
        "million",
        "first",
        "second",
        "third",
        "fourth",
        "fifth",
        "sixth",
        "seventh",
        "tenth",
        "twice",
        "half",
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "10",
        "12",
        "100",
    ),
}

#: Keyword groups available by name (``--group_concepts``, ``--families``, ``--topic``) but not
#: in the default set (`resolve_groups` with no names uses `BUILTIN` only): the notes' "Arabic
#: food" beside the Arabic script.
NAMED: dict[str, tuple[str, ...]] = {
    "Arabic food": (
        "hummus",
        "falafel",
        "shawarma",
        "kebab",
        "kebabs",
        "tabbouleh",
        "baklava",
        "couscous",
        "tahini",
        "pita",
        "halloumi",
        "labneh",
        "fattoush",
        "kofta",
        "tagine",
        "harissa",
        "sumac",
        "zaatar",
        "dates",
        "baba",
        "ghanoush",
        "mezze",
        "knafeh",
        "kibbeh",
        "mansaf",
        "shakshuka",
    ),
}

#: Script groups: Unicode code-point ranges (inclusive) of each script's blocks.
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "Arabic script": (
        (0x0600, 0x06FF),  # Arabic
        (0x0750, 0x077F),  # Arabic Supplement
        (0x08A0, 0x08FF),  # Arabic Extended-A
        (0xFB50, 0xFDFF),  # Arabic Presentation Forms-A
        (0xFE70, 0xFEFF),  # Arabic Presentation Forms-B
    ),
    "Cyrillic script": ((0x0400, 0x04FF), (0x0500, 0x052F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "Greek script": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "Hebrew script": ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)),
    "Devanagari script": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "CJK script": (
        (0x3040, 0x30FF),  # Hiragana, Katakana
        (0x3400, 0x4DBF),  # CJK Extension A
        (0x4E00, 0x9FFF),  # CJK Unified Ideographs
        (0xAC00, 0xD7AF),  # Hangul syllables
    ),
}


@dataclasses.dataclass(frozen=True)
class ScriptGroup:
    """A concept group defined by a writing system instead of a word list.

    ``normalised_token in group`` is the script rule of the module docstring, so a script group
    works wherever a keyword set does (`token_matches`, `assign_features`, `mentions`, topic
    rows). Iterating yields nothing: a script has no finite word list (`describe_group`).
    """

    name: str
    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, token: object) -> bool:
        letters = [ch for ch in str(token) if ch.isalpha()]
        return bool(letters) and all(
            any(lo <= ord(ch) <= hi for lo, hi in self.ranges) for ch in letters
        )

    def __iter__(self):
        return iter(())

    def describe(self) -> str:
        return f"{self.name}: letters in " + ", ".join(
            f"U+{lo:04X}-U+{hi:04X}" for lo, hi in self.ranges
        )


#: A concept group: normalised keywords, or a script.
Group = frozenset | ScriptGroup

#: Short names accepted for the built-in groups (after `_name_key`).
ALIASES = {
    "days": "Days of week",
    "daysofweek": "Days of week",
    "weekdays": "Days of week",
    "people": "People/Roles",
    "roles": "People/Roles",
    "peopleroles": "People/Roles",
    "monthnames": "Months",
    "emotion": "Emotions",
    "country": "Countries",
    "number": "Numbers",
    "arabic": "Arabic script",
    "cyrillic": "Cyrillic script",
    "greek": "Greek script",
    "hebrew": "Hebrew script",
    "devanagari": "Devanagari script",
    "cjk": "CJK script",
    "chinese": "CJK script",
}

_MARKERS = ("Ġ", "▁", "Ċ")


class ConceptError(checks.InputError):
    """A bad concept group specification (one line)."""


def normalize_token(token: str) -> str:
    """The matching form of a token or keyword (module docstring: markers, space, case)."""
    s = str(token)
    for marker in _MARKERS:
        s = s.replace(marker, " ")
    s = s.strip()
    if s.startswith("##"):
        s = s[2:]
    return s.strip().casefold()


def _name_key(name: str) -> str:
    return re.sub(r"[\s_\-/]+", "", str(name)).casefold()


_BUILTIN_KEYS = {_name_key(n): n for n in (*BUILTIN, *NAMED, *SCRIPTS)}


def builtin_names() -> list[str]:
    """Every built-in group name: `BUILTIN` (the default set), `NAMED`, `SCRIPTS`."""
    return [*BUILTIN, *NAMED, *SCRIPTS]


def canonical_name(name: str) -> str:
    """The built-in group called ``name`` (case/space/underscore-insensitive; aliases)."""
    key = _name_key(name)
    if key in _BUILTIN_KEYS:
        return _BUILTIN_KEYS[key]
    if key in ALIASES:
        return ALIASES[key]
    raise ConceptError(
        f"unknown concept group {name!r}; expected one of {builtin_names()} (or "
        "give user lists with --concepts_file)"
    )


def builtin_group(name: str) -> Group:
    """The built-in group called ``name`` (any spelling `canonical_name` accepts)."""
    canon = canonical_name(name)
    if canon in SCRIPTS:
        return ScriptGroup(canon, SCRIPTS[canon])
    return make_group(canon, BUILTIN[canon] if canon in BUILTIN else NAMED[canon])


def describe_group(group: Group) -> list[str] | str:
    """results.json form of a group: its sorted keywords, or the script's ranges."""
    return group.describe() if isinstance(group, ScriptGroup) else sorted(group)


def make_group(name: str, keywords: Iterable[str]) -> frozenset[str]:
    """Normalised keyword set of one group; refuses empty lists and multi-word keywords."""
    if not str(name).strip():
        raise ConceptError("concept group: empty group name")
    if isinstance(keywords, str):
        raise ConceptError(
            f"concept group {name!r}: keywords must be a list of words, got one string"
        )
    words = set()
    for kw in keywords:
        norm = normalize_token(kw)
        if not norm:
            continue
        if any(ch.isspace() for ch in norm):
            raise ConceptError(
                f"concept group {name!r}: keyword {kw!r} has several words; "
                "matching is whole-token, give single words"
            )
        words.add(norm)
    if not words:
        raise ConceptError(f"concept group {name!r}: empty keyword list")
    return frozenset(words)


def load_user_groups(path: str) -> dict[str, frozenset[str]]:
    """User keyword lists from ``.json`` (``{name: [words]}``) or text (``name: w1, w2``)."""
    if not os.path.isfile(path):
        raise ConceptError(f"concepts file {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    groups: dict[str, list[str]] = {}
    if path.endswith(".json"):
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConceptError(
                f"concepts file {path!r}: invalid JSON ({e.msg} at line {e.lineno})"
            ) from None
        if not isinstance(doc, dict) or not doc:
            raise ConceptError(
                f"concepts file {path!r}: expected a non-empty JSON object "
                "{group name: [keywords]}"
            )
        for name, words in doc.items():
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise ConceptError(
                    f"concepts file {path!r}: group {name!r} must map to a list of strings"
                )
            groups[name] = words
    else:
        for lineno, line in enumerate(raw.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if ":" not in line:
                raise ConceptError(
                    f"concepts file {path!r} line {lineno}: expected 'Group name: word, word, ...'"
                )
            name, words = line.split(":", 1)
            groups[name.strip()] = [w for w in re.split(r"[,\s]+", words) if w]
        if not groups:
            raise ConceptError(f"concepts file {path!r}: no group found")
    return {name: make_group(name, words) for name, words in groups.items()}


def resolve_groups(
    names: Sequence[str] | None = None, concepts_file: str | None = None
) -> dict[str, Group]:
    """The groups to analyse: built-in ``names`` (None: all of `BUILTIN`, unless a file is
    given; `NAMED` and `SCRIPTS` groups only when named) + file.

    A user group with a built-in's name replaces it.
    """
    out: dict[str, Group] = {}
    user = load_user_groups(concepts_file) if concepts_file else {}
    if names is None:
        names = [] if user else list(BUILTIN)
    for name in names:
        if name in user:
            continue
        canon = canonical_name(name)
        out[canon] = builtin_group(canon)
    out.update(user)
    if not out:
        raise ConceptError("no concept group selected")
    return out


def token_matches(token: str, keywords: Group) -> bool:
    """Whole-token match of one token string against a normalised keyword set."""
    return normalize_token(token) in keywords


def assign_features(
    top_tokens: Sequence[Sequence[str]],
    groups: Mapping[str, Group],
    top_n: int = 5,
    valid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Group name -> sorted feature indices whose first ``top_n`` top tokens hit a keyword.

    Args:
      top_tokens: per feature, its top-activating token strings (best first).
      groups: from `resolve_groups`.
      top_n: how many top tokens count.
      valid: optional bool per feature; invalid (dead / constant) features never join.
    """
    checks.check_positive_int("top_n", top_n)
    norm = [[normalize_token(t) for t in list(toks)[:top_n]] for toks in top_tokens]
    out = {}
    for name, words in groups.items():
        hit = [
            f
            for f, toks in enumerate(norm)
            if any(t in words for t in toks) and (valid is None or bool(valid[f]))
        ]
        out[name] = np.asarray(hit, np.int64)
    return out


def mentions(tokens: Sequence[str], keywords: Group) -> bool:
    """True when any token of a passage matches the keywords (topic-restricted subsets)."""
    return any(normalize_token(t) in keywords for t in tokens)
