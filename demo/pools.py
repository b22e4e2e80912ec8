"""Value pools of the synthetic corpus, split once into train and held-out values.

A model trained from scratch can only write tokens it has seen, so held-out values are new
combinations of seen parts (as held-out arithmetic pairs are new pairs of seen numbers):
- cities: train has every base city alone; held out are unseen "New Oslo" / "Oslo Bay" forms;
- person names: train has every first name alone; held out are unseen "First Last" pairs;
- function names and parameter names: unseen verb_noun / noun_suffix pairs;
- words of the letter tasks: unseen strings of 2-3 letter pieces, kept only when the word,
  with and without a leading space, reversed and in uppercase, tokenizes piece by piece (so
  every token of a held-out example is a piece token seen in training).
"""

from __future__ import annotations

import random
import zlib
from functools import cache

from harmony.tokenizer import load_tokenizer

CITIES = (
    "Paris London Berlin Madrid Rome Vienna Prague Warsaw Lisbon Dublin Oslo Stockholm Helsinki "
    "Copenhagen Amsterdam Brussels Zurich Geneva Munich Hamburg Milan Naples Venice Florence "
    "Barcelona Seville Valencia Porto Athens Sofia Bucharest Budapest Belgrade Zagreb Kyiv Riga "
    "Vilnius Tallinn Moscow Istanbul Ankara Cairo Tunis Algiers Lagos Nairobi Accra Dakar "
    "Johannesburg Tokyo Osaka Kyoto Seoul Busan Beijing Shanghai Shenzhen Taipei Manila Jakarta "
    "Bangkok Hanoi Delhi Mumbai Chennai Dhaka Karachi Lahore Dubai Doha Tehran Baghdad Riyadh "
    "Sydney Melbourne Perth Auckland Toronto Montreal Vancouver Chicago Boston Denver Seattle "
    "Houston Dallas Miami Atlanta Phoenix Portland Austin Detroit Lima Quito Bogota Santiago "
    "Caracas Havana Mexico Lyon Marseille Nice Bordeaux Lille Nantes Toulouse Leeds York Bristol "
    "Glasgow Edinburgh Cardiff Belfast Liverpool Manchester Oxford Cambridge Bergen Malmo Turin "
    "Genoa Bologna Krakow Gdansk Dresden Leipzig Cologne Frankfurt Stuttgart Bern Basel"
).split()
CITY_PREFIXES = "New Old North South East West Upper Lower Port Lake Mount Fort Saint".split()
CITY_SUFFIXES = "Bay Beach Springs Falls Heights Harbor Park Hills Valley Creek Island Junction".split()
NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nina Oscar Paul Quinn "
    "Rosa Sam Tina Victor Wendy Xavier Yara Zoe Adam Bella Chris Diana Ethan Fiona George Hannah "
    "Ivan Julia Kevin Laura Mark Nora Oliver Peter Rachel Simon Sarah Thomas Uma Vera William Anna "
    "Ben Clara Daniel Elena Felix Hugo Isabel James Kate Lucas Mia Noah Olga Pedro Ruth Steve Tom "
    "Lily Max Eva Omar Ali Chen Yuki Ravi Priya Amir Lena Marco Sofia Hans Ingrid Pablo Carmen Luis "
    "Ana Igor Nadia Emil Jonas Mila Sven Lars Rita Gina Tara Dean Ryan Kyle Amy Joy Roy Ray Ken Jim "
    "Tim Dan Eric Alex"
).split()
SURNAMES = (
    "Smith Brown Miller Wilson Moore Taylor Clark Lewis Walker Young King Wright Green Baker Hill "
    "Adams Nelson Carter Turner Parker Evans Collins Stewart Morris Cook Rogers Reed Bell Ward Cox "
    "Gray James Hughes Price Wood Long Foster Ross Perry Fisher Berg Weber Meyer Wagner Becker "
    "Schmidt Rossi Bruno Costa Silva Santos Garcia Lopez Martin Dubois Moreau Laurent Novak Kim "
    "Lee Park Chen Wang Tanaka Sato Ito Khan Shah Patel Singh Ali Haddad Cohen Levi Olsen Hansen"
).split()
WORDS = (
    "apple river stone cloud green house light water music paper table chair window garden bread "
    "happy quiet simple yellow orange purple silver golden little bright dark cold warm fresh "
    "sweet tiger horse mouse eagle snake whale shark zebra panda camel lemon mango grape peach "
    "melon cherry ocean forest desert island valley mountain castle bridge tower market school "
    "office doctor teacher planet rocket comet star moon night morning summer winter spring "
    "autumn dream story poem song dance brave clever gentle proud calm wild kind smart funny "
    "strong soft loud slow fast early late book pen cup door road city town farm field lake hill "
    "sand snow rain wind fire gold iron wood glass red blue pink gray black white brown time year "
    "day week hour word name game ball ship train plane"
).split()
VERBS = (
    "get set find list make send check open close read update create delete fetch book add "
    "remove start stop track"
).split()
NOUNS = (
    "order user file email ticket price stock flight hotel movie song note task event invoice "
    "account report photo message device room table seat color score city recipe budget"
).split()
PARAM_SUFFIXES = ("", "_id", "_name", "_code", "_type", "_date", "_url", "_key")
HELD_OUT_FRACTION = 0.2


def held_out(value: str, salt: str = "") -> bool:
    """A fixed hash bucket: one value in five is held out for the eval."""
    return zlib.crc32(f"{salt}:{value}".encode()) % 5 == 0


def _split(values: list[str], split: str, salt: str) -> list[str]:
    return sorted(v for v in set(values) if held_out(v, salt) == (split == "eval"))


def _pieces() -> list[str]:
    tok = load_tokenizer()

    def one(s: str) -> bool:
        return len(tok.encode(s)) == 1

    cands = {w[k : k + n] for w in WORDS for n in (2, 3) for k in range(len(w) - n + 1)}
    return sorted(
        p
        for p in cands
        if all(one(f) for f in (p, " " + p, p[::-1], " " + p[::-1], p.upper(), " " + p.upper()))
    )


def _piecewise(pieces: list[str]) -> bool:
    """The word spells as its pieces in every form the corpus writes it."""
    tok = load_tokenizer()

    def ids(parts: list[str]) -> list[int]:
        return [tok.encode(p)[0] for p in parts]

    w = "".join(pieces)
    upper = [p.upper() for p in pieces]
    rev = [p[::-1] for p in reversed(pieces)]
    return (
        tok.encode(w) == ids(pieces)
        and tok.encode(" " + w) == ids([" " + pieces[0], *pieces[1:]])
        and tok.encode(w[::-1]) == ids(rev)
        and tok.encode(" " + w[::-1]) == ids([" " + rev[0], *rev[1:]])
        and tok.encode(w.upper()) == ids(upper)
        and tok.encode(" " + w.upper()) == ids([" " + upper[0], *upper[1:]])
    )


@cache
def letter_words(n: int = 6000) -> list[str]:
    pieces, rng, words = _pieces(), random.Random(7), set()
    while len(words) < n:
        parts = [rng.choice(pieces) for _ in range(rng.choice((2, 2, 3)))]
        if 4 <= len("".join(parts)) <= 9 and _piecewise(parts):
            words.add("".join(parts))
    return sorted(words)


@cache
def pools(split: str) -> dict[str, list[str]]:
    """split "train" or "eval" -> named value pools (eval pools hold only the held-out values)."""
    composites = [f"{p} {c}" for p in CITY_PREFIXES for c in CITIES]
    composites += [f"{c} {s}" for c in CITIES for s in CITY_SUFFIXES]
    full_names = [f"{f} {s}" for f in NAMES for s in SURNAMES]
    train = split == "train"
    return {
        "city": (CITIES if train else []) + _split(composites, split, "city"),
        "name": (NAMES if train else []) + _split(full_names, split, "name"),
        "word": _split(letter_words(), split, "word"),
        "fn": _split([f"{v}_{n}" for v in VERBS for n in NOUNS], split, "fn"),
        "param": _split([f"{n}{s}" for n in NOUNS for s in PARAM_SUFFIXES], split, "param"),
        "phrase_word": WORDS,
    }
