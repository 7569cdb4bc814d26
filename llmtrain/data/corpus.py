# The built-in corpus: seeded short stories from a small probabilistic grammar, plus the exact
# negative log-likelihood of the generated text under that grammar (the floor no model can beat).
#
# What a model can learn from it, from easy to hard: punctuation and sentence templates; which
# verbs go with which subject ("the dog barked", "the king ruled the land"); number agreement
# (was/were, runs/run, they/he/she); the protagonist's name, chosen once per story from 50 and
# reused in later sentences (always in the last one); the secondary character met mid-story.
#
# Invariant (UNAMBIGUITY): every story text has exactly one derivation, so its probability is the
# product of the probabilities of the choices made, and the reported NLL is exact. It holds because
# the text can be parsed left to right without guessing:
#  * one story per line; every sentence ends with "." and "." occurs nowhere else; a story ends
#    with the one sentence that starts "In the end," (so the stop choice is visible in the text);
#  * a middle sentence's first word tells its kind: "Every" habit, "One" meeting, "Then"/"Later,"/
#    "After" action, otherwise it starts with its subject and the word after the subject tells an
#    action (a verb form) from a state ("was"/"were") or a wish ("wanted"), which are no verb form;
#  * names, pronouns and "the"+noun are disjoint word sets, the secondary character's noun differs
#    from the protagonist's and only the protagonist gets pronouns, so a subject names its referent
#    and its surface form (name/pronoun/noun);
#  * within one subject class, distinct verbs have distinct surface forms, a verb's complements
#    start differently, and optional parts start with a word that cannot come next otherwise
#    ("very", "with", an adverb, or the final ".").
# `_check_grammar` asserts the local conditions at import; tests/test_corpus.py re-derives every
# choice of sampled stories by exhaustive search and checks there is exactly one derivation.
from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple, Sequence

VERSION = 1


class _Dist:
    """A categorical distribution over `items` (weights need not sum to 1)."""

    def __init__(self, items: Sequence, weights: Sequence[float] | None = None):
        weights = [1.0] * len(items) if weights is None else list(weights)
        assert len(items) == len(weights) > 0 and all(w > 0 for w in weights)
        total = sum(weights)
        self.items = list(items)
        self.probs = [w / total for w in weights]
        self.logp = [math.log(p) for p in self.probs]
        self.cum = list(accumulate(self.probs))


def _zipf(items: Sequence, s: float = 0.7) -> _Dist:
    """Earlier items are more frequent, like words in real text."""
    return _Dist(items, [1.0 / (i + 1) ** s for i in range(len(items))])


def _coin(p_true: float) -> _Dist:
    return _Dist([True, False], [p_true, 1.0 - p_true])


class _Sampler:
    """Makes the grammar's choices with a seeded RNG and adds up their -log p (nats)."""

    def __init__(self, rng: random.Random):
        self.rng, self.nll = rng, 0.0

    def pick(self, d: _Dist, exclude=None):
        """Draw from `d`, or from `d` conditioned on not drawing `exclude`."""
        last = len(d.items) - 1
        while True:
            i = min(bisect_right(d.cum, self.rng.random()), last)
            if exclude is None or d.items[i] != exclude:
                break
        self.nll -= d.logp[i]
        if exclude is not None:
            self.nll += math.log1p(-d.probs[d.items.index(exclude)])
        return d.items[i]


# ---------------------------------------------------------------------------- vocabulary
_MALE = ("Max Ben Sam Tom Leo Jack Finn Oscar Hugo Theo Felix Oliver Milo Jasper Arthur Henry Louis "
         "Otto Rex Bruno Charlie Toby Ollie Rudy Eddie").split()
_FEMALE = ("Lily Mia Rose Ella Lucy Anna Emma Daisy Ruby Zoe Luna Ivy Alice Clara Sophie Grace Hazel "
           "Nora Molly Poppy Stella Fiona Greta Maya Willow").split()
_NAMES = {"m": _Dist(_MALE), "f": _Dist(_FEMALE), "-": _Dist(_MALE + _FEMALE)}

# singular/plural, gender of its names (m, f, or - for either), group whose verbs it shares
_NOUN_SPEC = """dog/dogs:-:animal cat/cats:-:animal bird/birds:-:animal rabbit/rabbits:-:animal fox/foxes:-:animal
bear/bears:-:animal mouse/mice:-:animal horse/horses:-:animal duck/ducks:-:animal frog/frogs:-:animal owl/owls:-:animal
boy/boys:m:person girl/girls:f:person king/kings:m:person queen/queens:f:person prince/princes:m:person
princess/princesses:f:person farmer/farmers:-:person baker/bakers:-:person knight/knights:-:person
wizard/wizards:-:person pirate/pirates:-:person dragon/dragons:-:creature robot/robots:-:creature
giant/giants:-:creature"""

# "who: base/past:frame,frame ..." -- who is "*" (everyone), a group or a noun. A frame is a slot
# ("to"/"in" the PLACE, "thing"/"food" with a/an, "at" the THING, "-" nothing) or literal words_like_this.
_VERB_SPEC = """
*: walk/walked:to,in play/played:in,- run/ran:to,- sleep/slept:in,- find/found:thing eat/ate:food
*: jump/jumped:- sit/sat:in look/looked:at rest/rested:in,- carry/carried:thing
animal: hide/hid:in,- chase/chased:thing sniff/sniffed:at
person: read/read:a_book,a_letter dance/danced:in,- cook/cooked:food write/wrote:a_letter,a_song,a_poem
person: laugh/laughed:- smile/smiled:- buy/bought:food,thing sing/sang:-
creature: roar/roared:- stomp/stomped:to lift/lifted:thing
dog: bark/barked:- dig/dug:in fetch/fetched:thing
cat: purr/purred:- climb/climbed:to nap/napped:in scratch/scratched:at
bird: fly/flew:to sing/sang:- build/built:a_nest peck/pecked:at
rabbit: hop/hopped:to,in nibble/nibbled:food dig/dug:in
fox: sneak/sneaked:to hunt/hunted:in dig/dug:in
bear: growl/growled:- climb/climbed:to fish/fished:in
mouse: squeak/squeaked:- nibble/nibbled:food scurry/scurried:to
horse: gallop/galloped:to trot/trotted:to neigh/neighed:-
duck: swim/swam:in quack/quacked:- waddle/waddled:to
frog: hop/hopped:to,in croak/croaked:- swim/swam:in
owl: hoot/hooted:- fly/flew:to watch/watched:the_moon,the_stars
boy: climb/climbed:to kick/kicked:thing
girl: climb/climbed:to draw/drew:a_picture,a_map
king: rule/ruled:the_land,the_kingdom speak/spoke:to_the_people feast/feasted:in
queen: rule/ruled:the_land,the_kingdom speak/spoke:to_the_people wave/waved:to_the_people
prince: ride/rode:to fight/fought:a_dragon,a_giant
princess: ride/rode:to wave/waved:to_the_people
farmer: plant/planted:seeds,a_tree feed/fed:the_animals,the_chickens plow/plowed:the_field
baker: bake/baked:food sell/sold:food
knight: ride/rode:to fight/fought:a_dragon,a_giant guard/guarded:the_castle,the_gate
wizard: cast/cast:a_spell mix/mixed:a_potion fly/flew:to
pirate: sail/sailed:to dig/dug:in
dragon: fly/flew:to breathe/breathed:fire guard/guarded:the_gold,the_cave
robot: beep/beeped:- clean/cleaned:the_house,the_room fix/fixed:thing
giant: shout/shouted:- build/built:a_house,a_wall"""
_SLOTS = ("to", "in", "thing", "food", "at", "-")
_VERB_WEIGHT = {"*": 1.0, "animal": 2.0, "person": 2.0, "creature": 2.0}  # a noun's own verbs: 5.0

_PLACES = _zipf("park garden forest river lake castle market farm beach hill village cave field meadow "
                "pond school kitchen barn library bridge tower mountain city sea".split())
_THINGS = _zipf("ball stick box hat key book map bone shell stone flower kite bell coin rope feather cup "
                "lamp boat drum toy ring leaf basket blanket".split())
_FOODS = _zipf("apple cake carrot cookie pie egg berry banana orange pear plum nut sandwich muffin peach "
               "melon".split())
_PLACE_ADJ = _Dist([""] + "big old quiet dark sunny green little busy secret windy".split(), [20.0] + [1.0] * 10)
_THING_ADJ = _Dist([""] + "red blue green shiny old new golden tiny wooden broken".split(), [20.0] + [1.0] * 10)
_INTRO_ADJ = _Dist([""] + "little big small old young brave clever kind shy curious lazy funny gentle wise "
                   "silly".split(), [10.0] + [1.0] * 15)
_STATE_ADJ = _zipf("happy sad tired hungry sleepy brave proud scared excited curious angry calm lonely busy "
                   "cold warm bored surprised glad worried hopeful grumpy cheerful quiet".split(), 0.5)
_END_ADJ = _Dist("happy glad proud safe tired cheerful".split(), [4, 2, 2, 1, 1, 1])
_ADVERB = _Dist([""] + "happily quickly slowly quietly loudly carefully again bravely proudly gently".split(),
                [30.0] + [1.0] * 10)
_TIMES = _zipf("morning day night evening afternoon week spring summer autumn winter".split())
_INTRO = _Dist([("Once", "upon", "a", "time", ","), ("Long", "ago", ","), ("Not", "long", "ago", ",")], [6, 3, 1])
_OPENER = _Dist([(), ("Then",), ("Later", ","), ("After", "that", ",")], [6, 2, 1, 1])
_KIND = {False: _Dist(["action", "habit", "want", "state", "meet"], [5, 2, 1.5, 2, 2]),  # before the meeting
         True: _Dist(["action", "habit", "want", "state"], [5, 2, 1.5, 2])}
_FORM = _Dist(["name", "pronoun", "noun"], [4, 4, 2])  # how the protagonist is referred to
_WHO = _Dist(["hero", "friend"], [2, 1])  # who the sentence is about, once there is a friend
_PAIR, _FRIEND_PAIR, _VERY, _WITH, _STOP = _coin(0.25), _coin(0.25), _coin(0.3), _coin(0.3), _coin(0.2)
_MIN_MIDDLE, _MAX_MIDDLE = 3, 13  # stories have 1 + (3..13) + 1 = 5..15 sentences


class _Verb(NamedTuple):
    base: str  # plural present: "they run"
    past: str
    s3: str  # singular present: "he runs"
    frames: _Dist


class _Noun(NamedTuple):
    sing: str
    plur: str
    gender: str
    verbs: _Dist


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _third_person(base: str) -> str:
    if base.endswith(("s", "sh", "ch", "x", "z")):
        return base + "es"
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ies"
    return base + "s"


def _build_nouns() -> _Dist:
    verbs: dict[str, list[tuple[_Verb, float]]] = {}
    for line in _VERB_SPEC.strip().splitlines():
        who, specs = line.split(":", 1)
        for spec in specs.split():
            forms, frames = spec.split(":")
            base, past = forms.split("/")
            frames = [f if f in _SLOTS else tuple(f.split("_")) for f in frames.split(",")]
            verbs.setdefault(who, []).append((_Verb(base, past, _third_person(base), _Dist(frames)),
                                              _VERB_WEIGHT.get(who, 5.0)))
    nouns = []
    for spec in _NOUN_SPEC.split():
        forms, gender, group = spec.split(":")
        sing, plur = forms.split("/")
        own = verbs["*"] + verbs[group] + verbs[sing]
        nouns.append(_Noun(sing, plur, gender, _Dist([v for v, _ in own], [w for _, w in own])))
    return _Dist(nouns)


_NOUNS = _build_nouns()


def _expand_np(adjs: _Dist, nouns: _Dist, det: str | None = None) -> list[tuple]:
    """Every noun phrase `phrase` in `_story` can say: "the old park", "an old box", "a box"."""
    return [(det or _a(a or n),) + ((a, n) if a else (n,)) for a in adjs.items for n in nouns.items]


def _check_grammar() -> None:
    """Assert the local conditions of the unambiguity invariant (see the top of this file)."""
    nouns, names = _NOUNS.items, set(_MALE) | set(_FEMALE)
    words = {n.sing for n in nouns} | {n.plur for n in nouns}
    starts = {"He", "She", "They", "The", "Then", "Later", "After", "Every", "One", "In"}
    assert len(names) == 50 and not names & (words | starts) and len(words) == 2 * len(nouns)
    for d in (_PLACES, _THINGS, _FOODS, _PLACE_ADJ, _THING_ADJ, _STATE_ADJ, _END_ADJ, _ADVERB, _TIMES):
        assert len(set(d.items)) == len(d.items)
    assert not set(_THINGS.items) & set(_FOODS.items)
    assert not (set(_PLACE_ADJ.items) & set(_PLACES.items) or set(_THING_ADJ.items) & set(_THINGS.items + _FOODS.items))
    after = {"", "with", "."} | set(_ADVERB.items)  # what may follow a complement ("": its end)
    slot = {f: [(f,) + p for p in _expand_np(_PLACE_ADJ, _PLACES, "the")] for f in ("to", "in")}
    slot.update({"at": [("at",) + t for t in _expand_np(_THING_ADJ, _THINGS, "the")], "-": [()],
                 "thing": _expand_np(_THING_ADJ, _THINGS), "food": _expand_np(_THING_ADJ, _FOODS)})
    for n in nouns:
        for tense in ("past", "s3", "base"):
            forms = [getattr(v, tense) for v in n.verbs.items]
            assert len(set(forms)) == len(forms) and not {"was", "were", "wanted"} & set(forms), (n.sing, tense)
    for v in {id(v): v for n in nouns for v in n.verbs.items}.values():
        frames = [slot.get(f, [f]) for f in v.frames.items]  # no complement may be read as another
        follow = []
        for seqs in frames:
            assert len(set(seqs)) == len(seqs)
            follow.append({})
            for t in seqs:
                for k in range(len(t) + 1):
                    follow[-1].setdefault(t[:k], set()).add(t[k] if k < len(t) else "")
        for i, seqs in enumerate(frames):
            for j, nxt in enumerate(follow):
                assert not any((nxt.get(t, set()) - ({""} if i == j else set())) & after for t in seqs), v


_check_grammar()


# ---------------------------------------------------------------------------- the grammar
def _story(ch, out: list[str]) -> None:
    """Append one story's tokens to `out` ("," and "." are separate tokens), choosing via `ch.pick`."""
    say = out.extend
    say(ch.pick(_INTRO))
    plural = ch.pick(_PAIR)
    say(("there", "were", "two") if plural else ("there", "was"))
    adj = ch.pick(_INTRO_ADJ)  # words are said as soon as they are chosen, so a parser can follow along
    if adj:
        say((adj,) if plural else (_a(adj), adj))
    noun = ch.pick(_NOUNS)
    say((noun.plur,) if plural else (noun.sing,) if adj else (_a(noun.sing), noun.sing))
    say(("named",))
    hero = (ch.pick(_NAMES[noun.gender]),)
    say(hero)
    if plural:
        say(("and",))
        hero += ("and", ch.pick(_NAMES[noun.gender], exclude=hero[0]))
        say(hero[-1:])
    say((".",))
    pronoun = "they" if plural else "he" if hero[0] in _MALE else "she"
    friend, friend_plural = None, False

    def phrase(det: str | None, adjs: _Dist, nouns: _Dist) -> None:
        """Say e.g. "the old park", "an old box", "a box" (det None means a/an), see `_expand_np`."""
        adj = ch.pick(adjs)
        if adj:
            say((det or _a(adj), adj))
        noun = ch.pick(nouns)
        say((noun,) if adj else (det or _a(noun), noun))

    def subject(cap: bool) -> tuple[_Noun, bool, tuple]:
        """Say who the sentence is about; returns (their noun, plural?, how to say 'with them')."""
        if friend is not None and ch.pick(_WHO) == "friend":
            words = ("the", friend.plur if friend_plural else friend.sing)
            who, is_plural, other = friend, friend_plural, hero
        else:
            form = ch.pick(_FORM)
            words = hero if form == "name" else (pronoun,) if form == "pronoun" else (
                "the", noun.plur if plural else noun.sing)
            who, is_plural = noun, plural
            other = friend and ("the", friend.plur if friend_plural else friend.sing)
        say((words[0].capitalize(),) + words[1:] if cap else words)
        return who, is_plural, other

    def predicate(who: _Noun, is_plural: bool, other: tuple | None, tense: str) -> None:
        verb = ch.pick(who.verbs)
        say((verb.past if tense == "past" else verb.s3 if tense == "present" and not is_plural else verb.base,))
        frame = ch.pick(verb.frames)
        if frame in ("to", "in"):
            say((frame,))
            phrase("the", _PLACE_ADJ, _PLACES)
        elif frame in ("thing", "food"):
            phrase(None, _THING_ADJ, _THINGS if frame == "thing" else _FOODS)
        elif frame == "at":
            say(("at",))
            phrase("the", _THING_ADJ, _THINGS)
        elif frame != "-":
            say(frame)
        if other and ch.pick(_WITH):
            say(("with",) + other)
        adverb = ch.pick(_ADVERB)
        say((adverb, ".") if adverb else (".",))

    for m in range(_MAX_MIDDLE):
        if m >= _MIN_MIDDLE and ch.pick(_STOP):
            break
        kind = ch.pick(_KIND[friend is not None])
        if kind == "action":
            opener = ch.pick(_OPENER)
            say(opener)
            predicate(*subject(cap=not opener), tense="past")
        elif kind == "habit":
            say(("Every", ch.pick(_TIMES), ","))
            predicate(*subject(cap=False), tense="present")
        elif kind == "want":
            who, is_plural, other = subject(cap=True)
            say(("wanted", "to"))
            predicate(who, is_plural, other, tense="base")
        elif kind == "state":
            _, is_plural, _ = subject(cap=True)
            say(("were" if is_plural else "was",))
            if ch.pick(_VERY):
                say(("very",))
            say((ch.pick(_STATE_ADJ), "."))
        else:  # meet: introduces the friend, who is never the same kind as the protagonist
            say(("One", "day", ","))
            subject(cap=False)
            say(("met",))
            friend_plural = ch.pick(_FRIEND_PAIR)
            if friend_plural:
                say(("two",))
            friend = ch.pick(_NOUNS, exclude=noun)
            say((friend.plur, ".") if friend_plural else (_a(friend.sing), friend.sing, "."))
    say(("In", "the", "end", ",") + hero + ("were" if plural else "was",))
    if ch.pick(_VERY):
        say(("very",))
    say((ch.pick(_END_ADJ), "."))


def detokenize(tokens: list[str]) -> str:
    """Join tokens into text, attaching "," and "." to the preceding word."""
    return " ".join(tokens).replace(" ,", ",").replace(" .", ".")


# ---------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class Corpus:
    train: list[str]  # one story per item
    validation: list[str]
    validation_nll_per_word: float  # exact NLL of validation under the generator, nats/word
    train_nll_per_word: float
    seed: int


def _generate(stream: str, words: int) -> tuple[list[str], float]:
    """Whole stories from the seeded stream until `words` words; returns (stories, nats per word)."""
    ch = _Sampler(random.Random(stream))
    docs, total = [], 0
    while total < words:
        out: list[str] = []
        _story(ch, out)
        docs.append(detokenize(out))
        total += len(docs[-1].split())
    return docs, ch.nll / max(total, 1)


def generate_corpus(seed: int = 0, train_words: int = 1_000_000, validation_words: int = 50_000) -> Corpus:
    """Generate the built-in story corpus deterministically from `seed`.

    A word is a whitespace-separated token (punctuation stays attached: "park."). The NLLs count
    every choice, including each story's length (its stop choices), and are divided by the words.
    """
    # the seeds' names are fixed strings, not this module's path: moving the code never changes the corpus
    train, train_nll = _generate(f"llmtrain.corpus:{seed}:train", train_words)
    validation, val_nll = _generate(f"llmtrain.corpus:{seed}:validation", validation_words)
    return Corpus(train, validation, val_nll, train_nll, seed)


def unigram_nll_per_word(train: list[str], evaluate_on: list[str]) -> float:
    """Nats/word of `evaluate_on` under a add-one-smoothed unigram word model fitted on `train` (the baseline a model must beat).

    Like the floor, it also pays for each end of document (one extra event per document, not a word);
    all unseen words share one extra vocabulary slot.
    """
    counts = Counter(w for doc in train for w in doc.split())
    denom = math.log(sum(counts.values()) + len(train) + len(counts) + 2)
    end_nll = denom - math.log(len(train) + 1)
    nll, words = 0.0, 0
    for doc in evaluate_on:
        ws = doc.split()
        words += len(ws)
        nll += end_nll + sum(denom - math.log(counts.get(w, 0) + 1) for w in ws)
    return nll / max(words, 1)
