"""Seeded synthetic eval rows large enough for metric comparisons (the shipped fixtures hold 6-16 rows).

Sentences are built from four slots (who, does what, to what, where), each slot with two phrasings of the same
meaning ("a man" / "a guy"), so a real sentence encoder scores them the way it scores real STS pairs: a pair
sharing more slots is closer. Nothing here is from a public dataset (tests must not depend on those).

- `sts_rows(n)`: n distinct pairs, label = the fraction of the four slots they share (0, 0.25, ..., 1).
- `ranking_rows(n, negatives)`: n queries, each with a positive sharing 3 of its 4 slots (in the other
  phrasing) and `negatives` sentences sharing 0 to 2 of them: mostly, not always, ranked below the positive.
"""

from __future__ import annotations

import random

WHO = [("a man", "a guy"), ("a woman", "a lady"), ("a child", "a kid"), ("an old man", "an elderly man"),
       ("a girl", "a young girl"), ("a boy", "a young boy"), ("a dog", "a puppy"), ("a cat", "a kitten"),
       ("two men", "two guys"), ("a group of people", "a crowd"), ("a chef", "a cook"), ("a student", "a pupil")]  # fmt: skip
DOES = [("is playing", "plays"), ("is cutting", "is slicing"), ("is eating", "eats"), ("is holding", "holds"),
        ("is cleaning", "cleans"), ("is painting", "paints"), ("is carrying", "carries"), ("is washing", "washes"),
        ("is throwing", "throws"), ("is looking at", "watches")]  # fmt: skip
WHAT = [("a guitar", "the guitar"), ("an onion", "the onion"), ("a pizza", "some pizza"), ("a ball", "the ball"),
        ("a car", "the car"), ("a fence", "the fence"), ("a box", "a carton"), ("a window", "the window"),
        ("a book", "the book"), ("a bicycle", "a bike"), ("a map", "the map"), ("a red flower", "a red rose")]  # fmt: skip
WHERE = [("in the park", "at the park"), ("in the kitchen", "inside the kitchen"), ("on the beach", "at the beach"),
         ("in the street", "on the road"), ("in a garden", "in the yard"), ("at school", "in the classroom"),
         ("on a stage", "on the stage"), ("near a river", "by the river"), ("in the snow", "outside in the snow")]  # fmt: skip
SLOTS = (WHO, DOES, WHAT, WHERE)


def sentence(choice: list[int], phrasing: list[int]) -> str:
    text = " ".join(SLOTS[k][i][v] for k, (i, v) in enumerate(zip(choice, phrasing, strict=True)))
    return text[0].upper() + text[1:] + "."


def _other(rng: random.Random, slot: int, value: int) -> int:
    return rng.choice([i for i in range(len(SLOTS[slot])) if i != value])


def _sharing(rng: random.Random, choice: list[int], shared: int) -> list[int]:
    """A slot choice that keeps `shared` of `choice`'s four slots and changes the others."""
    keep = set(rng.sample(range(len(SLOTS)), shared))
    return [c if k in keep else _other(rng, k, c) for k, c in enumerate(choice)]


def _phrasing(rng: random.Random) -> list[int]:
    return [rng.randrange(2) for _ in SLOTS]


def sts_rows(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        a = [rng.randrange(len(s)) for s in SLOTS]
        shared = rng.randint(0, len(SLOTS))
        q, r = sentence(a, _phrasing(rng)), sentence(_sharing(rng, a, shared), _phrasing(rng))
        if q != r and (q, r) not in seen:
            seen.add((q, r))
            rows.append({"query": q, "response": r, "label": shared / len(SLOTS)})
    return rows


def ranking_rows(n: int = 30, negatives: int = 5, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows, queries = [], set()
    while len(rows) < n:
        a, phrasing = [rng.randrange(len(s)) for s in SLOTS], _phrasing(rng)
        query = sentence(a, phrasing)
        if query in queries:
            continue
        queries.add(query)
        negs: set[str] = set()
        while len(negs) < negatives:
            negs.add(sentence(_sharing(rng, a, rng.randint(0, 2)), _phrasing(rng)))
        positive = sentence(_sharing(rng, a, 3), [1 - v for v in phrasing])
        rows.append({"query": query, "response": positive, "rejected_response": sorted(negs)})
    return rows
