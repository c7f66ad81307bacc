"""Generate the demo task: name the destination city of a travel sentence, answering with the city alone.

    python recipes/data/make_task.py            # writes recipes/data/destination/{train,heldout}.jsonl

Why this task: SmolLM2-135M-Instruct can already read the sentences, but answers in a chatty sentence ("The
destination city is ..."), so exact match starts near zero; a few minutes of LoRA on CPU teach it the one-word format
and which of the two cities is the destination (origin and destination swap places across templates). Held-out rows
use cities and travellers that never occur in train, so a high held-out score needs the rule, not memorised rows.
Deterministic for a given --seed; stdlib only.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASK = "destination"

CITIES = [
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Beijing", "Berlin", "Bogota", "Boston", "Brussels", "Budapest",
    "Buenos Aires", "Cairo", "Cape Town", "Chicago", "Copenhagen", "Dallas", "Delhi", "Denver", "Dubai", "Dublin",
    "Edinburgh", "Florence", "Geneva", "Hamburg", "Hanoi", "Havana", "Helsinki", "Hong Kong", "Istanbul", "Jakarta",
    "Lagos", "Lima", "Lisbon", "London", "Los Angeles", "Lyon", "Madrid", "Manila", "Marseille", "Melbourne",
    "Mexico City", "Miami", "Milan", "Montreal", "Moscow", "Mumbai", "Munich", "Nairobi", "Naples", "New York",
    "Oslo", "Paris", "Prague", "Rome", "San Francisco", "Santiago", "Seattle", "Seoul", "Shanghai", "Singapore",
    "Stockholm", "Sydney", "Taipei", "Tokyo", "Toronto", "Vancouver", "Venice", "Vienna", "Warsaw", "Zurich",
]
NAMES = [
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "James", "Kenji", "Laura", "Marco",
    "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Samuel", "Tara", "Umar", "Vera", "Walter", "Yara", "Zoe", "Leo",
    "Mia", "Noah", "Olga", "Pablo", "Sofia", "Tom", "Lucy", "Ivan", "Hana", "Diego",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["6 am", "9 am", "noon", "3 pm", "7 pm", "midnight"]

# The destination comes first in some templates and last in others, so "copy the last city" is not enough.
TEMPLATES = [
    "{name} is flying from {origin} to {dest} on {day}.",
    "{name} leaves {origin} at {time} and arrives in {dest} the same evening.",
    "After a week in {origin}, {name} took the train to {dest}.",
    "{name}'s flight to {dest} departs from {origin} at {time}.",
    "On {day}, {name} will travel to {dest}, starting from {origin}.",
    "Ticket for {name}: {origin} to {dest}, {day}.",
    "{name} is heading to {dest} for a conference; the trip starts in {origin}.",
    "Bound for {dest}, {name} boarded a bus in {origin}.",
    "{name} drove out of {origin} on {day}, hoping to reach {dest} by {time}.",
    "From {origin}, {name} is sailing to {dest} next {day}.",
]
QUESTIONS = [
    "What is the destination? Reply with the city only.",
    "Where is {name} going? City name only.",
    "Destination city?",
]


def make_row(rng: random.Random, dests: list[str], cities: list[str], names: list[str]) -> dict:
    dest = rng.choice(dests)
    origin = rng.choice([c for c in cities if c != dest])
    name = rng.choice(names)
    sentence = rng.choice(TEMPLATES).format(
        name=name, origin=origin, dest=dest, day=rng.choice(DAYS), time=rng.choice(TIMES)
    )
    question = rng.choice(QUESTIONS).format(name=name)
    return {"messages": [{"role": "user", "content": f"{sentence}\n{question}"},
                         {"role": "assistant", "content": dest}]}


def make_split(rng: random.Random, n: int, dests: list[str], cities: list[str], names: list[str]) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:  # no duplicate rows
        row = make_row(rng, dests, cities, names)
        if row["messages"][0]["content"] not in seen:
            seen.add(row["messages"][0]["content"])
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=1500, help="train rows")
    parser.add_argument("--heldout", type=int, default=150, help="held-out rows")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / TASK)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    cities, names = sorted(CITIES), sorted(NAMES)
    rng.shuffle(cities)
    rng.shuffle(names)
    # A quarter of the cities and names occur only in held-out rows, so no held-out answer was a train target.
    held_cities, train_cities = cities[: len(cities) // 4], cities[len(cities) // 4 :]
    held_names, train_names = names[: len(names) // 4], names[len(names) // 4 :]
    train = make_split(rng, args.train, train_cities, train_cities, train_names)
    # Held-out destinations are all unseen in train; origins may be any city, travellers are unseen too.
    heldout = make_split(rng, args.heldout, held_cities, cities, held_names)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out rows to {args.out}")


if __name__ == "__main__":
    main()
