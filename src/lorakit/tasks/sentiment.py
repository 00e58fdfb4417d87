"""The shipped classification task: short product reviews, positive or negative.

    {"text": "The blender arrived quickly, but the motor is weak and loud. Would not buy again.", "label": "negative"}
    {"text": "Not cheap, yet the tent is sturdy and easy to set up.", "label": "positive"}

Each review joins one to three clauses about a product's aspects; the label is the overall verdict.
About a third of the reviews mix a minor point of the other polarity ("arrived late, but ...") or a
negation ("not flimsy at all"), so single words do not give the answer away: an untrained head is
near chance, a LoRA adapter on the default encoder learns it in under a minute of CPU training.

Generation is pure Python seeded with `random.Random(seed)`; train and eval never share a text.
"""

from __future__ import annotations

import random

DEFAULT_SEED = 0
DEFAULT_N_TRAIN = 800
DEFAULT_N_EVAL = 200
LABELS = ("negative", "positive")

PRODUCTS = (
    "blender", "tent", "laptop", "kettle", "backpack", "headphones", "jacket", "vacuum", "phone case", "desk lamp",
    "coffee maker", "keyboard", "mattress", "water bottle", "camera", "printer", "sofa", "toaster", "drill", "monitor",
    "running shoes", "router", "stroller", "frying pan", "umbrella", "suitcase", "speaker", "charger", "watch", "chair",
)
GOOD = (
    "is sturdy", "works perfectly", "feels well made", "is easy to set up", "is worth every penny", "exceeded my expectations",
    "is quiet", "is comfortable", "looks great", "has held up for months", "is fast", "does exactly what it promises",
    "is a pleasure to use", "is really reliable", "is excellent value",
)
BAD = (
    "broke within a week", "is flimsy", "stopped working", "feels cheap", "is a pain to set up", "is a waste of money",
    "is very loud", "is uncomfortable", "looks worse than the photos", "fell apart", "is slow", "does not do what it claims",
    "is frustrating to use", "is unreliable", "is overpriced",
)
NEGATED_BAD = ("is not flimsy at all", "never stopped working", "is not loud", "is far from cheap-feeling", "did not break")
NEGATED_GOOD = ("is not sturdy", "never worked properly", "is not comfortable", "is anything but reliable", "did not last")
MINOR_BAD = ("It arrived a day late", "The box was dented", "It is a bit pricey", "The manual is confusing", "The color is duller than shown")
MINOR_GOOD = ("Delivery was quick", "The packaging was nice", "The price looked fair", "The color is lovely", "Support answered fast")
CLOSE_GOOD = ("Highly recommended.", "Would buy again.", "Five stars.", "Very happy with it.", "", "")
CLOSE_BAD = ("Would not buy again.", "Returning it.", "One star.", "Very disappointed.", "", "")


def review(rng: random.Random, positive: bool) -> str:
    """One review whose overall verdict is `positive`."""
    product = rng.choice(PRODUCTS)
    main, negated = (GOOD, NEGATED_BAD) if positive else (BAD, NEGATED_GOOD)
    points = rng.sample(main, rng.choice((1, 2)))
    if rng.random() < 0.25:
        points[0] = rng.choice(negated)
    body = f"The {product} " + " and ".join(points) + "."
    if rng.random() < 0.35:  # a minor point the other way, before the verdict
        minor = rng.choice(MINOR_BAD if positive else MINOR_GOOD)
        body = f"{minor}, but the {product} " + " and ".join(points) + "."
    close = rng.choice(CLOSE_GOOD if positive else CLOSE_BAD)
    return f"{body} {close}".strip()


def records(n: int, seed: int = DEFAULT_SEED, avoid: set[str] | None = None) -> list[dict]:
    """`n` balanced records {"text", "label"}, none of whose texts is in `avoid`."""
    rng = random.Random(f"lorakit-sentiment:{seed}")
    seen = set(avoid or ())
    out = []
    while len(out) < n:
        positive = len(out) % 2 == 0
        text = review(rng, positive)
        if text in seen:
            continue
        seen.add(text)
        out.append({"text": text, "label": LABELS[positive]})
    rng.shuffle(out)
    return out


def train_eval_records(n_train: int = DEFAULT_N_TRAIN, n_eval: int = DEFAULT_N_EVAL, seed: int = DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """Training and held-out records; no text appears in both."""
    train = records(n_train, seed)
    held = records(n_eval, seed + 1, avoid={r["text"] for r in train})
    return train, held
