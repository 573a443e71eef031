"""English for captions: class names, plurals, articles, counts in words and
lists ("a ship", "3 airplanes", "many cars", "A, B and C"). Used by
Box-to-Caption and by counting sentences.
"""
from __future__ import annotations

import random
import re
from typing import Optional, Sequence


#: counts above this become a vague quantity
MAX_EXACT_COUNT = 10


VAGUE_QUANTITIES = ("many", "a lot of")


# ----------------------------------------------------------------- words --
#: class names that datasets write run together (DIOR and friends)
KNOWN_SPLITS = {
    "baseballfield": "baseball field", "basketballcourt": "basketball court",
    "groundtrackfield": "ground track field", "golffield": "golf field",
    "storagetank": "storage tank", "tenniscourt": "tennis court",
    "trainstation": "train station", "swimmingpool": "swimming pool",
    "soccerballfield": "soccer ball field", "baseballdiamond": "baseball diamond",
    "containercrane": "container crane", "helipad": "helipad",
}


IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "mouse": "mice", "ox": "oxen",
    "leaf": "leaves", "shelf": "shelves", "knife": "knives", "wife": "wives",
    "life": "lives", "half": "halves", "wolf": "wolves", "calf": "calves",
    "thief": "thieves", "loaf": "loaves", "cactus": "cacti", "hypothesis": "hypotheses",
    "analysis": "analyses", "axis": "axes", "datum": "data", "criterion": "criteria",
}


#: nouns whose plural is the singular
INVARIANT_PLURALS = {
    "sheep", "deer", "fish", "aircraft", "spacecraft", "watercraft", "hovercraft",
    "series", "species", "equipment", "cattle", "people", "police", "offspring",
    "swine", "moose", "bison", "salmon", "trout", "headquarters", "means",
}


#: consonant + o nouns that take -es
O_ES = {"potato", "tomato", "hero", "echo", "torpedo", "veto", "volcano", "tornado", "embargo"}


#: vowel-letter words that sound like a consonant ("a uniform") and the reverse ("an hour")
_A_BEFORE_VOWEL = re.compile(r"^(uni|use|usu|usa|uti|ura|ure|uro|euro|eu|one|once|ubiq|u-)")


_AN_BEFORE_H = re.compile(r"^(hour|honest|honou?r|heir)")


#: letters whose spoken name starts with a vowel sound (acronyms: "an SUV", "a UAV")
_VOWEL_LETTER_NAMES = set("AEFHILMNORSX")


def normalise_class_name(name: str) -> str:
    """A dataset's class name as words: "large-vehicle" -> "large vehicle",
    "storage_tank" -> "storage tank", "StorageTank" -> "storage tank",
    "storagetank" -> "storage tank". Acronyms (all capitals) keep their case."""
    s = str(name).strip()
    s = re.sub(r"[_\-./]+", " ", s)
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z][a-z])|(?<=[a-z])(?=[A-Z])", " ", s)
    words = []
    for w in s.split():
        if len(w) >= 2 and w.isupper() and w.isalpha():
            words.append(w)
        else:
            w = w.lower()
            words.append(KNOWN_SPLITS.get(w, w))
    return " ".join(words)


def _plural_word(word: str) -> str:
    low = word.lower()
    if word.isupper() and len(word) >= 2:
        return word + "s"                     # UAV -> UAVs
    if low in INVARIANT_PLURALS:
        return word
    if low in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[low]
    if re.search(r"(s|x|z|ch|sh)$", low):
        return word + "es"                    # bus, box, church, dish
    if re.search(r"[^aeiou]y$", low):
        return word[:-1] + "ies"              # ferry -> ferries
    if low in O_ES:
        return word + "es"
    return word + "s"


def plural(name: str, n: int = 2) -> str:
    """The normalised class name, in the plural unless ``n == 1``.

    The head noun takes the plural: the last word ("storage tanks", "small
    vehicles"), or the word before "of" ("bags of rice")."""
    words = normalise_class_name(name).split()
    if not words or n == 1:
        return " ".join(words)
    head = len(words) - 1
    if "of" in words[1:]:
        head = words.index("of", 1) - 1
    words[head] = _plural_word(words[head])
    return " ".join(words)


def article(phrase: str) -> str:
    """"a" or "an" for a phrase, by the sound of its first word."""
    word = phrase.split()[0] if phrase.split() else ""
    if not word:
        return "a"
    if word.isupper() and len(word) >= 2:
        return "an" if word[0] in _VOWEL_LETTER_NAMES else "a"
    low = word.lower()
    if low[0] in "aeiou":
        return "a" if _A_BEFORE_VOWEL.match(low) else "an"
    if _AN_BEFORE_H.match(low):
        return "an"
    if low[0].isdigit():
        return "an" if low.startswith(("8", "11", "18")) else "a"
    return "a"


def with_count(name: str, n: int, rng: Optional[random.Random] = None) -> str:
    """``n`` objects of class ``name`` in words: "a storage tank", "an airplane",
    "3 small vehicles", and above :data:`MAX_EXACT_COUNT` a vague quantity
    ("many ships", or "a lot of ships" when ``rng`` picks it); "no ships" for 0."""
    if n == 1:
        singular = plural(name, 1)
        return f"{article(singular)} {singular}"
    many = plural(name, n)
    if n <= 0:
        return f"no {many}"
    if n <= MAX_EXACT_COUNT:
        return f"{n} {many}"
    vague = rng.choice(VAGUE_QUANTITIES) if rng is not None else VAGUE_QUANTITIES[0]
    return f"{vague} {many}"


def join_words(items: Sequence[str]) -> str:
    """"A", "A and B", "A, B and C"."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
