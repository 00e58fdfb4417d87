"""The shipped task: a one-sentence order description -> one line of JSON, checked by exact match.

    input:  "On 5 March 2024, Maria Lopez bought three lamps at $45.50 apiece."
    output: {"name":"Maria Lopez","item":"lamp","qty":3,"price":45.5,"date":"2024-03-05"}

The output has a fixed key order and normalized values (singular item, quantity as a number even
when written as a word, the price without its "$" and trailing zeros, the date in ISO form), so a
base model that roughly understands the request still misses most answers exactly, while a LoRA
adapter learns the mapping in a few minutes of CPU training. Records are alpaca-style
(instruction, input, output), 120-136 tokens each under the default model's chat template
(26 of them its default system prompt and turn markers).

Generation is pure Python seeded with `random.Random(seed)`: the same seed gives the same files on
any machine, and train and eval never share an input sentence.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from lorakit.io import atomic_write_text

DEFAULT_SEED = 0
DEFAULT_N_TRAIN = 1000
DEFAULT_N_EVAL = 50
DEFAULT_MAX_NEW_TOKENS = 48
"""Above the longest answer (42 tokens with the default tokenizer) and its end token."""
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"

INSTRUCTION = "Write this order as JSON with keys name, item (singular), qty, price, date (YYYY-MM-DD)."

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Chen", "Olga", "Pedro", "Fatima", "Liam", "Yuki", "Noah", "Priya", "Lucas", "Amara",
    "Ivan", "Sofia", "Omar", "Hannah", "Mateo", "Leila", "Ethan", "Zara", "Kofi", "Elena", "Raj", "Grace", "Tomas",
)
LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Wang", "Petrova", "Silva", "Haddad", "Murphy", "Tanaka", "Brown", "Patel", "Rossi",
    "Okafor", "Novak", "Garcia", "Nasser", "Fischer", "Costa", "Karimi", "Walsh", "Mensah", "Ivanova", "Dubois", "Berg",
)
ITEMS = (  # each takes a plain "s" in the plural
    "lamp", "chair", "notebook", "mug", "pillow", "candle", "towel", "basket", "blanket", "kettle", "backpack", "helmet",
    "jacket", "scarf", "glove", "plate", "bottle", "speaker", "cable", "charger", "mirror", "clock", "poster", "sticker",
    "pencil", "marker", "umbrella", "wallet", "sock", "bucket",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")

SENTENCES = (
    "{name} ordered {qty} {items} on {date} for {price} each.",
    "On {date}, {name} bought {qty} {items} at {price} apiece.",
    "{qty} {items} were purchased by {name} on {date}, priced at {price} each.",
    "Order placed {date}: {qty} {items} for {name}, {price} per unit.",
    "{name} paid {price} per item for {qty} {items} ({date}).",
    "Customer {name} picked up {qty} {items} on {date}; unit price {price}.",
)


def make_record(rng: random.Random) -> dict[str, str]:
    """One alpaca-style record drawn from `rng`."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    item = rng.choice(ITEMS)
    quantity = rng.randint(1, 12)
    cents = rng.randint(100, 9999) if rng.random() < 0.8 else rng.randint(1, 99) * 100
    year, month, day = rng.randint(2019, 2026), rng.randint(1, 12), rng.randint(1, 28)
    qty_text = NUMBER_WORDS[quantity - 1] if rng.random() < 0.5 else str(quantity)
    date_text = f"{MONTHS[month - 1]} {day}, {year}" if rng.random() < 0.5 else f"{day} {MONTHS[month - 1]} {year}"
    sentence = rng.choice(SENTENCES).format(
        name=name, qty=qty_text, items=item if quantity == 1 else item + "s", date=date_text, price=f"${cents // 100}.{cents % 100:02d}"
    )
    answer = {"name": name, "item": item, "qty": quantity, "price": _price(cents), "date": f"{year:04d}-{month:02d}-{day:02d}"}
    return {"instruction": INSTRUCTION, "input": sentence[0].upper() + sentence[1:], "output": json.dumps(answer, separators=(",", ":"))}


def _price(cents: int) -> int | float:
    """12.50 -> 12.5, 7.00 -> 7, 3.99 -> 3.99: the shortest JSON number, as json.dumps writes it."""
    return cents // 100 if cents % 100 == 0 else round(cents / 100, 2)


def make_records(n: int, seed: int = DEFAULT_SEED, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """`n` records with distinct inputs (none of them in `exclude`), the same for the same seed."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    records: list[dict[str, str]] = []
    while len(records) < n:
        record = make_record(rng)
        if record["input"] not in seen:
            seen.add(record["input"])
            records.append(record)
    return records


def train_eval_records(n_train: int = DEFAULT_N_TRAIN, n_eval: int = DEFAULT_N_EVAL, seed: int = DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """Disjoint train and eval records: the first `n_train` drawn train, the next `n_eval` eval."""
    records = make_records(n_train + n_eval, seed)
    return records[:n_train], records[n_train:]


def write_dataset(directory: str | os.PathLike, n_train: int = DEFAULT_N_TRAIN, n_eval: int = DEFAULT_N_EVAL, seed: int = DEFAULT_SEED) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl under `directory` (created if needed); returns their paths."""
    directory = Path(directory)
    train, held = train_eval_records(n_train, n_eval, seed)
    paths = directory / TRAIN_FILE, directory / EVAL_FILE
    for path, records in zip(paths, (train, held)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return paths
