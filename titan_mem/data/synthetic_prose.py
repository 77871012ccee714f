"""Generic descriptive prose for the synthetic world (towns, companies, animals, a day, a recipe): mixed into
pretraining so the model is not a pure biography machine, and the held-out prose and copying probes that
measure forgetting of what finetuning does not teach. Each generator is a pure function of its rng."""

from __future__ import annotations

import random
from typing import Protocol


class Places(Protocol):
    """The names a world lends its prose (a `SyntheticWorld`)."""

    cities: list[str]
    companies: list[str]
    states: list[str]


def _words(spec: str) -> tuple[str, ...]:
    return tuple(spec.split("|"))


_ADJ = _words(
    "quiet|busy|old|small|large|green|sunny|windy|peaceful|crowded|modern|historic|colorful|narrow|"
    "wide|cold|warm|friendly|famous|hidden"
)
_PLACE = _words(
    "market|library|harbor|park|museum|bakery|train station|bridge|garden|square|school|theater|"
    "hospital|river bank|hill|bookshop|cafe|stadium"
)
_FEATURE = _words(
    "old stone bridges|tall glass towers|fresh bread|spring festival|long beaches|wooden houses|"
    "busy port|quiet canals|mountain views|night market|apple orchards|red brick factories|"
    "summer concerts|wide avenues|local cheese"
)
_ACTIVITY = _words(
    "walk along the river|visit the museum|buy fruit at the market|ride bicycles|sit in the cafes|"
    "watch the boats|climb the hill|listen to street music|read in the park|"
    "take photographs of the old town"
)
_SEASON = _words("spring|summer|autumn|winter")
_PRODUCT = _words(
    "furniture|software|bicycles|medical devices|shoes|paper|solar panels|kitchen tools|toys|engines|"
    "coffee machines|textiles|glass|batteries"
)
_ANIMAL = _words(
    "fox|owl|heron|badger|otter|deer|hedgehog|crow|salmon|beaver|rabbit|woodpecker|frog|squirrel"
)
_HABITAT = _words("forests|wetlands|rivers|meadows|mountains|coastal cliffs|lakes|grasslands")
_FOOD = _words("berries|insects|seeds|small fish|roots|nuts|grass|worms|leaves")
_TOPIC = _words(
    "the weather|an old film|a new book|their plans for the holidays|a football match|"
    "the price of bread|a trip to the sea|music|their childhood|a strange dream"
)
_DISH = _words(
    "vegetable soup|apple pie|tomato sauce|rice with beans|pancakes|lemon cake|potato salad|bread rolls"
)
_STEP = _words(
    "wash the vegetables|heat the oil in a pan|mix the flour with water|add a pinch of salt|"
    "stir for five minutes|let it rest for an hour|chop the onions|bake it until golden|"
    "pour in the milk|cover the pot"
)
_WEATHER = ("cold", "sunny", "rainy", "windy", "quiet", "busy", "warm", "grey", "bright", "foggy")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_FIRST = ("Anna", "Tom", "Maria", "Leo", "Sara", "Paul", "Nina", "Omar", "Ella", "Ben", "Lucy", "Sam")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _city_text(w: Places, r: random.Random) -> str:
    c, c2 = r.sample(w.cities, 2)
    f1, f2 = r.sample(_FEATURE, 2)
    first = f"{c} is {_a(r.choice(_ADJ))} town about {r.randint(5, 90)} miles from {c2}."
    second = f"It is known for its {f1} and its {f2}."
    season, adj = r.choice(_SEASON), r.choice(_ADJ)
    third = f"In {season} the streets are {adj}, and visitors like to {r.choice(_ACTIVITY)}."
    return f"{first} {second} {third} The {r.choice(_PLACE)} near the center opens early in the morning."


def _company_text(w: Places, r: random.Random) -> str:
    c = r.choice(w.companies)
    p1, p2 = r.sample(_PRODUCT, 2)
    return (
        f"{c} is a company that makes {p1}. It has offices in {r.choice(w.cities)} and in "
        f"{r.choice(w.states)}. Last year it started selling {p2} as well, and the new products were "
        f"{r.choice(('popular', 'expensive', 'hard to find', 'well reviewed', 'delayed'))}."
    )


def _animal_text(w: Places, r: random.Random) -> str:
    a = r.choice(_ANIMAL)
    first = f"The {a} lives in {r.choice(_HABITAT)} and eats {r.choice(_FOOD)}."
    second = f"It is most active in the {r.choice(('morning', 'evening', 'night', 'afternoon'))}."
    third = f"In {r.choice(_SEASON)} {_a(a)} may travel {r.randint(2, 40)} miles to find food,"
    return f"{first} {second} {third} and it often rests near a {r.choice(_PLACE)}."


def day_text(w: Places, r: random.Random) -> str:
    a, b = r.sample(_FIRST, 2)
    return (
        f"{a} woke up early on {_a(r.choice(_WEATHER))} {r.choice(_DAYS)}. After breakfast {a} walked to the "
        f"{r.choice(_PLACE)} and met {b}. They talked about {r.choice(_TOPIC)} for a long time. Later it "
        f"started to rain, so they went to the {r.choice(_PLACE)} "
        f"and stayed until {r.randint(2, 11)} o'clock."
    )


def _recipe_text(w: Places, r: random.Random) -> str:
    s1, s2, s3 = r.sample(_STEP, 3)
    dish = r.choice(_DISH)
    serve = r.choice(("hot", "warm", "cold"))
    return f"To make {dish}, first {s1}. Then {s2}. Finally, {s3}, and serve it {serve}."


GENERIC_SECTIONS = (_city_text, _company_text, _animal_text, day_text, _recipe_text)
