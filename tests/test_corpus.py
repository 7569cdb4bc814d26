"""The built-in story corpus: deterministic, sized as asked, learnable, and with an exact NLL floor."""
import math
import random
import re
import time

import pytest

from llmtrain.data import corpus
from llmtrain.data.corpus import generate_corpus, unigram_nll_per_word


@pytest.fixture(scope="module")
def medium():
    return generate_corpus(seed=0, train_words=200_000, validation_words=20_000)


def words(docs):
    return sum(len(d.split()) for d in docs)


def tokens(text):
    """Words with their trailing "," / "." split off, the token stream the grammar emits."""
    out = []
    for w in text.split():
        m = re.fullmatch(r"([^,.]+)([,.]?)", w)
        assert m, w
        out += [m[1], m[2]] if m[2] else [m[1]]
    return out


# ---------------------------------------------------------------- re-deriving choices from the text
class _Frontier(Exception):
    def __init__(self, n_options):
        self.n_options = n_options


class _Replay:
    """A chooser that makes the choices in `path` (indices among the allowed options), then stops."""

    def __init__(self, path):
        self.path, self.i, self.logp, self.made = path, 0, 0.0, []

    def pick(self, d, exclude=None):
        options = [(item, p) for item, p in zip(d.items, d.probs) if exclude is None or item != exclude]
        if self.i == len(self.path):
            raise _Frontier(len(options))
        item, p = options[self.path[self.i]]
        self.i += 1
        self.made.append((d, item))
        self.logp += math.log(p / sum(q for _, q in options))
        return item


def derivations(text):
    """Every choice sequence under which the grammar says exactly `text`, with its NLL (exhaustive search)."""
    target, found, stack = tokens(text), [], [[]]
    while stack:
        path = stack.pop()
        out, chooser = [], _Replay(path)
        try:
            corpus._story(chooser, out)
        except _Frontier as f:
            if out == target[:len(out)]:  # still consistent with the text: try every option next
                stack.extend(path + [k] for k in range(f.n_options))
            continue
        if out == target:
            found.append((path, -chooser.logp))
    return found


def test_every_story_has_exactly_one_derivation_with_the_reported_nll():
    sampler = corpus._Sampler(random.Random("test"))
    for _ in range(30):
        before, out = sampler.nll, []
        corpus._story(sampler, out)
        text = corpus.detokenize(out)
        assert tokens(text) == out and "\n" not in text
        found = derivations(text)
        assert len(found) == 1, (text, found)
        assert math.isclose(found[0][1], sampler.nll - before, rel_tol=1e-9)


def test_reported_floor_equals_the_nll_re_derived_from_the_text():
    c = generate_corpus(seed=5, train_words=100, validation_words=400)
    for docs, reported in ((c.validation, c.validation_nll_per_word), (c.train, c.train_nll_per_word)):
        nll = 0.0
        for doc in docs:
            (found,) = derivations(doc)
            nll += found[1]
        assert math.isclose(nll / words(docs), reported, rel_tol=1e-9)


def test_story_length_is_a_choice_that_is_paid_for():
    c = generate_corpus(seed=2, train_words=1_500, validation_words=0)
    lengths = set()
    for doc in c.train:
        ((path, _),) = derivations(doc)
        replay = _Replay(path)
        corpus._story(replay, [])
        stops = [item for d, item in replay.made if d is corpus._STOP]
        middle = doc.count(".") - 2  # the intro and the ending are always there
        lengths.add(middle)
        # one "go on" per sentence past the minimum, then "stop" unless the maximum forced it
        assert stops == [False] * (middle - corpus._MIN_MIDDLE) + [True] * (middle < corpus._MAX_MIDDLE)
    assert len(lengths) >= 5


# ---------------------------------------------------------------- determinism and size
def test_same_seed_same_text_and_different_seed_different_text():
    a = generate_corpus(seed=3, train_words=20_000, validation_words=5_000)
    b = generate_corpus(seed=3, train_words=20_000, validation_words=5_000)
    c = generate_corpus(seed=4, train_words=20_000, validation_words=5_000)
    assert a == b and "\n".join(a.train) == "\n".join(b.train)
    assert a.train != c.train and a.validation != c.validation
    assert a.validation_nll_per_word != c.validation_nll_per_word
    assert len(set(a.validation) & set(a.train)) <= len(a.validation) // 100  # independent streams


@pytest.mark.parametrize("train_words,validation_words", [(1, 1), (5_000, 700), (30_000, 3_000)])
def test_whole_stories_until_the_word_budget(train_words, validation_words):
    c = generate_corpus(seed=1, train_words=train_words, validation_words=validation_words)
    for docs, budget in ((c.train, train_words), (c.validation, validation_words)):
        assert words(docs) >= budget > words(docs[:-1])
        for d in docs:
            assert d == d.strip() and "\n" not in d and d.endswith(".")
            assert 5 <= d.count(".") <= 15 and d.startswith(("Once upon a time,", "Long ago,", "Not long ago,"))


def test_generation_is_fast():
    start = time.perf_counter()
    generate_corpus(seed=0, train_words=100_000, validation_words=0)
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------- learnability
def test_floor_is_well_below_the_unigram_baseline(medium):
    unigram = unigram_nll_per_word(medium.train, medium.validation)
    assert 0.5 < medium.validation_nll_per_word < unigram - 2.0
    assert abs(medium.validation_nll_per_word - medium.train_nll_per_word) < 0.1
    assert unigram < math.log(len({w for d in medium.train for w in d.split()}))  # below uniform


def test_vocabulary_is_modest(medium):
    vocab = {w for d in medium.train for w in d.split()}
    assert 300 <= len(vocab) <= 1500


def verb_forms():
    verbs = [v for n in corpus._NOUNS.items for v in n.verbs.items]
    past, s3, base = ({getattr(v, k) for v in verbs} for k in ("past", "s3", "base"))
    return past, s3, base


def test_agreement(medium):
    past, s3, base = verb_forms()
    wrong_after = {False: (base - past) | {"were"}, True: (s3 - past) | {"was"}}  # keyed by plural subject
    singular_nouns = {n.sing for n in corpus._NOUNS.items}
    plural_nouns = {n.plur for n in corpus._NOUNS.items}
    names = set(corpus._MALE) | set(corpus._FEMALE)
    checked = {False: 0, True: 0}
    for story in medium.train[:3000]:
        ws = story.split()
        pair = ws[ws.index("named") + 2] == "and"
        for i in range(1, len(ws) - 1):
            w, prev, nxt = ws[i], ws[i - 1], ws[i + 1]
            if w.lower() in ("he", "she", "they"):
                plural = w.lower() == "they"
                assert plural == pair  # pronouns match the protagonist
                if not pair:
                    assert (w.lower() == "he") == (ws[ws.index("named") + 1].rstrip(".") in corpus._MALE)
            elif prev.lower() == "the" and w in singular_nouns | plural_nouns:
                plural = w in plural_nouns
            elif w in names and nxt != "and":
                plural = prev == "and"
            else:
                continue
            assert nxt not in wrong_after[plural], story
            checked[plural] += nxt in {"was", "were"} | past | s3 | base
    assert min(checked.values()) > 1000


def test_verbs_depend_on_the_subject_class(medium):
    for verb, nouns in (("barked", {"dog", "dogs"}), ("purred", {"cat", "cats"}),
                        ("ruled", {"king", "kings", "queen", "queens"}), ("beeped", {"robot", "robots"})):
        uses = [s for s in medium.train if verb in s.replace(".", "").split()]
        assert len(uses) > 20
        assert all(nouns & set(s.replace(".", "").split()) for s in uses), verb
    # "The dog ..." and "The king ..." are followed by quite different verbs
    after = {n: {ws[i + 1] for s in medium.train for ws in [s.split()] for i in range(len(ws) - 1)
                 if ws[i] == n and ws[i - 1] == "The"} for n in ("dog", "king")}
    assert {"barked", "dug", "was"} <= after["dog"] and {"ruled", "spoke", "was"} <= after["king"]
    assert not {"barked", "dug"} & after["king"] and not {"ruled", "spoke"} & after["dog"]


def test_the_protagonists_name_recurs(medium):
    used, in_middle = set(), 0
    for story in medium.validation:
        intro, rest = story.split(". ", 1)
        names = intro.split(" named ")[1].split(" and ")
        used.update(names)
        assert all(n in corpus._MALE + corpus._FEMALE for n in names)
        ending = rest.rsplit("In the end, ", 1)[1]
        assert ending.startswith(" and ".join(names) + (" were" if len(names) == 2 else " was"))
        in_middle += names[0] in rest.rsplit("In the end, ", 1)[0].replace(".", " ").replace(",", " ").split()
    assert len(used) == 50
    assert in_middle > 0.5 * len(medium.validation)


def test_unigram_baseline_pays_for_unseen_words_and_document_ends():
    train = ["a b a.", "a c."]
    nll = unigram_nll_per_word(train, ["a z"])
    # counts: a 2, b 1, a. 1, c. 1 (5 words) + 2 ends; vocab 4 seen + end + unseen = 6; denominator 13
    expect = -(math.log(3 / 13) + math.log(1 / 13) + math.log(3 / 13)) / 2
    assert math.isclose(nll, expect)
