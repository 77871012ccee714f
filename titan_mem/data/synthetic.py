"""The embedded default corpus: synthetic people and their facts, generated on the fly from a seed.

Why synthetic: fact learning needs facts we control. Every person has six attributes (birth date, birth
city, university, field of study, employer, work city). People 0..n_known-1 form the *known* population:
their biographies (and some QA about them) are in the pretraining corpus. People n_known.. form the *new*
population: held back, to be taught by finetuning and then asked about. The two never share a person
(distinct ids and distinct full names). Each fact renders through several paraphrase templates, and as a
`Question: ... Answer: ...` pair for evaluation. Generic templated prose (cities, companies, animals,
daily life, recipes) is mixed in so the model is not a pure biography machine.

Determinism: pools and people come from a seeded Faker; document k of the stream is a pure function of
(seed, k), so any rank can generate any document, with no state but an index.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import random
from dataclasses import dataclass

from titan_mem.data.config import SYNTHETIC_POPULATIONS, DataConfig
from titan_mem.data.records import FactExample, QAExample
from titan_mem.data.synthetic_prose import GENERIC_SECTIONS, day_text
from titan_mem.errors import ConfigError

ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer", "work_city")

# Statement templates: {name}, {value}, {subj}/{pos} = pronoun forms. Every template contains the value
# verbatim so the canonical answer is a substring of every paraphrase.
STATEMENTS: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name}'s date of birth is {value}.",
        "{name} came into the world on {value}.",
        "The birthday of {name} is {value}.",
        "Records show that {name} was born on {value}.",
        "On {value}, {name} was born.",
        "{name} has a birth date of {value}.",
        "{name} entered the world on {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name}'s birthplace is {value}.",
        "{name} is a native of {value}.",
        "{value} is the birthplace of {name}.",
        "The city where {name} was born is {value}.",
        "{name} spent {pos} early childhood in {value}, the city of {pos} birth.",
        "{name} first saw the light of day in {value}.",
        "{name} comes from {value}, where {subj} was born.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received {pos} degree from {value}.",
        "{name} is a graduate of {value}.",
        "{name} attended {value}.",
        "{value} is where {name} went to university.",
        "{name} completed {pos} education at {value}.",
        "For university, {name} chose {value}.",
    ),
    "field": (
        "{name} majored in {value}.",
        "{name} studied {value} at university.",
        "{name} holds a degree in {value}.",
        "{name}'s field of study was {value}.",
        "{name} specialized in {value}.",
        "{value} was the subject that {name} studied.",
        "At university, {name} focused on {value}.",
        "{name} earned a degree in the field of {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name}'s employer is {value}.",
        "{value} employs {name}.",
        "{name} has a job at {value}.",
        "{name} earns a living at {value}.",
        "The company {name} works for is {value}.",
        "{name} is on the staff of {value}.",
    ),
    "work_city": (
        "{name} works in {value}.",
        "{name}'s workplace is located in {value}.",
        "{name} commutes to an office in {value}.",
        "{name}'s job is based in {value}.",
        "{name} goes to work in {value} every day.",
        "The office where {name} works is in {value}.",
        "{name} is employed in the city of {value}.",
        "{value} is where {name} works.",
    ),
}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_date": ("When was {name} born?", "What is the date of birth of {name}?"),
    "birth_city": ("Where was {name} born?", "In which city was {name} born?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?"),
    "field": ("What did {name} study?", "What was the major of {name}?"),
    "employer": ("Which company does {name} work for?", "Who employs {name}?"),
    "work_city": ("In which city does {name} work?", "Where does {name} work?"),
}

FIELDS = (
    "physics", "chemistry", "biology", "mathematics", "computer science", "economics", "history",
    "philosophy", "psychology", "sociology", "linguistics", "geology", "astronomy", "architecture",
    "civil engineering", "mechanical engineering", "electrical engineering", "medicine", "nursing",
    "law", "music", "fine arts", "journalism", "political science", "anthropology", "statistics",
    "accounting", "marketing", "education", "agriculture", "oceanography", "pharmacology", "ecology",
    "literature", "theology", "archaeology", "materials science", "neuroscience", "finance", "dentistry",
)  # fmt: skip


@dataclass(frozen=True)
class Person:
    pid: int
    name: str
    gender: str  # "f" | "m": only chooses pronouns
    birth_date: str
    birth_city: str
    university: str
    field: str
    employer: str
    work_city: str
    population: str

    @property
    def subj(self) -> str:
        return "she" if self.gender == "f" else "he"

    @property
    def pos(self) -> str:
        return "her" if self.gender == "f" else "his"

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def _date_text(d: datetime.date) -> str:
    return f"{calendar.month_name[d.month]} {d.day}, {d.year}"


def _unique(gen, n: int, max_tries: int = 100) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        v = gen()
        if v in seen:
            tries += 1
            if tries > max_tries * n:
                raise RuntimeError(f"synthetic corpus: could not draw {n} distinct values")
            continue
        seen.add(v)
        out.append(v)
    return out


class SyntheticWorld:
    """People, their facts and the renderings, for one (seed, n_known, n_new)."""

    def __init__(self, seed: int = 0, n_known: int = 1000, n_new: int = 100, qa_people: int = 0) -> None:
        from faker import Faker  # imported here: ~0.1 s, only needed for the synthetic corpus

        if not 0 <= qa_people <= n_known:
            raise ConfigError(f"data.synthetic_qa_people: expected 0..{n_known} got {qa_people}")
        self.seed, self.n_known, self.n_new = seed, n_known, n_new
        # Known people 0..qa_people-1 appear in pretraining as biographies *and* QA pairs; the rest only as
        # biographies, so QA about them measures extraction (Allen-Zhu & Li 2023, mixed training). 0 = all.
        self.qa_people = qa_people or n_known
        fake = Faker("en_US")
        fake.seed_instance(seed)
        self.cities = _unique(fake.city, 200)
        self.companies = _unique(fake.company, 200)
        self.states = _unique(fake.state, 30)
        uni_forms = (
            lambda: f"University of {fake.city()}",
            lambda: f"{fake.last_name()} University",
            lambda: f"{fake.city()} Institute of Technology",
            lambda: f"{fake.state()} State University",
            lambda: f"{fake.last_name()} College",
        )
        self.universities = _unique(lambda: uni_forms[fake.random_int(0, len(uni_forms) - 1)](), 120)
        # People come from their own stream so the pools above do not depend on population sizes.
        fake.seed_instance(seed * 7919 + 1)
        rng = random.Random(f"titan_mem.synthetic.people.{seed}")
        names: set[str] = set()
        people: list[Person] = []
        for pid in range(n_known + n_new):
            gender = "f" if rng.random() < 0.5 else "m"
            while True:
                first = fake.first_name_female() if gender == "f" else fake.first_name_male()
                name = f"{first} {fake.last_name()}"
                if name not in names:
                    break
            names.add(name)
            birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=rng.randrange(65 * 365))
            people.append(
                Person(
                    pid=pid,
                    name=name,
                    gender=gender,
                    birth_date=_date_text(birth),
                    birth_city=rng.choice(self.cities),
                    university=rng.choice(self.universities),
                    field=rng.choice(FIELDS),
                    employer=rng.choice(self.companies),
                    work_city=rng.choice(self.cities),
                    population="known" if pid < n_known else "new",
                )
            )
        self._people = people

    # ---- populations ---------------------------------------------------------------------------------
    def people(self, population: str = "known", taught: int = 0) -> list[Person]:
        """A population: known | new | all; the known people split by whether pretraining shows QA about
        them: known_qa | known_bio (biographies only), or into two disjoint halves for evaluation:
        known_val | known_test; the new people split by `taught` (the first `taught` new people are taught
        by finetuning, 0 = all of them): new_taught | new_untaught."""
        new = self._people[self.n_known :]
        k = taught or len(new)
        if population == "known":
            return self._people[: self.n_known]
        if population in ("known_val", "known_test"):
            return self._known_halves[population == "known_test"]
        if population == "known_qa":
            return self._people[: self.qa_people]
        if population == "known_bio":
            return self._people[self.qa_people : self.n_known]
        if population == "new":
            return new
        if population == "new_taught":
            return new[:k]
        if population == "new_untaught":
            return new[k:]
        if population == "all":
            return list(self._people)
        choices = ", ".join(repr(c) for c in SYNTHETIC_POPULATIONS)
        raise ConfigError(f"data.synthetic_population: expected one of {choices}, got {population!r}")

    @functools.cached_property
    def _known_halves(self) -> tuple[list[Person], list[Person]]:
        """(known_val, known_test): the QA-trained then the biography-only people, each kind in a seeded
        random order, dealt alternately into two halves, so selecting on one half and reporting on the other
        compares like with like (each half holds both kinds in proportion, one person more at most)."""
        rng = random.Random(f"titan_mem.synthetic.known_split.{self.seed}")
        qa, bio = self._people[: self.qa_people], self._people[self.qa_people : self.n_known]
        dealt = rng.sample(qa, len(qa)) + rng.sample(bio, len(bio))
        return sorted(dealt[0::2], key=lambda p: p.pid), sorted(dealt[1::2], key=lambda p: p.pid)

    def person_kind(self, pid: int) -> str:
        """What pretraining showed of person `pid`: known_qa (biographies and QA), known_bio (biographies
        only) or new (nothing): how a per-item record's group (its person id) splits known facts."""
        if not 0 <= pid < len(self._people):
            raise ValueError(f"person id {pid}: expected 0..{len(self._people) - 1}")
        return "known_qa" if pid < self.qa_people else "known_bio" if pid < self.n_known else "new"

    # ---- renderings ----------------------------------------------------------------------------------
    @staticmethod
    def statement(person: Person, attribute: str, template: int, *, pronoun: bool = False) -> str:
        """One fact through one template; `pronoun` replaces a leading name by he/she (biographies)."""
        tpl = STATEMENTS[attribute][template]
        if pronoun and tpl.startswith("{name}'s "):
            tpl = person.pos.capitalize() + tpl[len("{name}'s") :]
        elif pronoun and tpl.startswith("{name} "):
            tpl = person.subj.capitalize() + tpl[len("{name}") :]
        return tpl.format(name=person.name, value=person.value(attribute), subj=person.subj, pos=person.pos)

    def facts(self, population: str = "new", n_paraphrases: int = 8, taught: int = 0) -> list[FactExample]:
        """Every (person, attribute) of a population with `n_paraphrases` renderings (templates cycled)."""
        out = []
        for p in self.people(population, taught):
            for attr in ATTRIBUTES:
                k = len(STATEMENTS[attr])
                paraphrases = [self.statement(p, attr, i % k) for i in range(n_paraphrases)]
                out.append(
                    FactExample(
                        fact_id=f"{p.population}-{p.pid}-{attr}",
                        paraphrases=paraphrases,
                        question=QUESTIONS[attr][0].format(name=p.name),
                        answer=p.value(attr),
                        meta={"person": p.name, "pid": p.pid, "attribute": attr},
                    )
                )
        return out

    def qa_examples(self, population: str = "new", variant: int = 0, taught: int = 0) -> list[QAExample]:
        """Evaluation questions, one per fact (question template `variant`)."""
        return [
            QAExample(
                question=QUESTIONS[attr][variant % len(QUESTIONS[attr])].format(name=p.name),
                answers=[p.value(attr)],
                id=f"{p.population}-{p.pid}-{attr}",
            )
            for p in self.people(population, taught)
            for attr in ATTRIBUTES
        ]

    def statement_prompt(self, fact_id: str) -> str:
        """A fact's first statement template cut before its value ("Ada Lovelace was born in"): the
        statement-completion probe; every first template ends in " {value}." so the answer follows a space."""
        _, pid, attribute = fact_id.split("-", 2)
        person = self._people[int(pid)]
        template = STATEMENTS[attribute][0]
        head = template[: template.index("{value}")].rstrip()
        return head.format(name=person.name, subj=person.subj, pos=person.pos)

    def biography(self, person: Person, rng: random.Random) -> str:
        """All six facts in random order and random templates; later sentences may use a pronoun."""
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        sentences = [
            self.statement(person, a, rng.randrange(len(STATEMENTS[a])), pronoun=i > 0 and rng.random() < 0.5)
            for i, a in enumerate(attrs)
        ]
        return " ".join(sentences)

    def article(self, person: Person, rng: random.Random, sections: int) -> str:
        """A long document about one person, for the document regime (Lin et al. 2025, sec. 4.2: facts inside
        mostly other text): the six facts stated twice in random templates, spread in order over `sections`
        paragraphs of generic prose. Always by name: a pronoun after a paragraph about a town is ambiguous."""
        statements = []
        for _ in range(2):
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            statements += [self.statement(person, a, rng.randrange(len(STATEMENTS[a]))) for a in attrs]
        n = len(statements)
        paragraphs = [
            " ".join([*statements[j * n // sections : (j + 1) * n // sections], self.generic_section(rng)])
            for j in range(sections)
        ]
        return "\n\n".join(paragraphs)

    def finetune_documents(self, people: list[Person], seed: int, article_sections: int = 0) -> list[str]:
        """The document regime's texts, one per taught person: the biography, or an article when
        `article_sections` > 0 (`data.synthetic_article_sections`)."""
        texts = []
        for p in people:
            rng = random.Random(f"titan_mem.documents.{seed}.{p.pid}")
            text = self.article(p, rng, article_sections) if article_sections else self.biography(p, rng)
            texts.append(text)
        return texts

    def qa_document(self, person: Person, rng: random.Random) -> str:
        attrs = rng.sample(ATTRIBUTES, k=rng.randint(1, len(ATTRIBUTES)))
        pairs = [
            f"Question: {rng.choice(QUESTIONS[a]).format(name=person.name)}\nAnswer: {person.value(a)}"
            for a in attrs
        ]
        return "\n\n".join(pairs)

    def generic_section(self, rng: random.Random) -> str:
        """One paragraph of generic descriptive prose (a town, a company, an animal, a day or a recipe)."""
        return GENERIC_SECTIONS[rng.randrange(len(GENERIC_SECTIONS))](self, rng)

    def generic_document(self, rng: random.Random) -> str:
        n = rng.randint(2, 4)
        return "\n\n".join(self.generic_section(rng) for _ in range(n))

    def heldout_prose(self, n: int) -> list[str]:
        """`n` generic documents drawn from a random stream pretraining never reads (its own seed
        namespace): prose of the pretraining distribution the model has not seen, to measure forgetting."""
        return [
            self.generic_document(random.Random(f"titan_mem.synthetic.heldout.{self.seed}.{i}"))
            for i in range(n)
        ]

    def heldout_days(self, n: int) -> list[str]:
        """`n` "day" paragraphs (`synthetic_prose.day_text`: a first name, then the same name again) from a
        stream of their own that pretraining never reads: the in-context copying probe (`synthetic_copy`)."""
        return [day_text(self, random.Random(f"titan_mem.synthetic.days.{self.seed}.{i}")) for i in range(n)]

    def document(
        self,
        index: int,
        *,
        population: str = "known",
        generic_fraction: float = 0.3,
        qa_fraction: float = 0.1,
    ) -> str:
        """Document `index` of the pretraining stream: a pure function of (world, index, mix)."""
        rng = random.Random(f"titan_mem.synthetic.doc.{self.seed}.{index}")
        u = rng.random()
        people = self.people(population) if u >= generic_fraction else []
        if not people:
            return self.generic_document(rng)
        person = people[rng.randrange(len(people))]
        if u < generic_fraction + qa_fraction:
            if population == "known":  # QA only about the QA-exposed part of the known population
                person = people[rng.randrange(self.qa_people)]
            return self.qa_document(person, rng)
        return self.biography(person, rng)


@functools.lru_cache(maxsize=4)
def get_world(seed: int = 0, n_known: int = 1000, n_new: int = 100, qa_people: int = 0) -> SyntheticWorld:
    """Cached world: building 1,100 people takes ~0.1 s; experiments ask for the same world often."""
    return SyntheticWorld(seed, n_known, n_new, qa_people)


def world_of(cfg: DataConfig) -> SyntheticWorld:
    """The synthetic world a data config describes (one place that reads its world keys)."""
    return get_world(
        cfg.world_seed(), cfg.synthetic_known_people, cfg.synthetic_new_people, cfg.synthetic_qa_people
    )
