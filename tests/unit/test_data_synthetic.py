import pytest

from titan_mem.data.qa import qa_prompt
from titan_mem.data.synthetic import ATTRIBUTES, STATEMENTS, SyntheticWorld


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(seed=7, n_known=60, n_new=15)


def test_deterministic_for_a_seed(world):
    again = SyntheticWorld(seed=7, n_known=60, n_new=15)
    assert again.people("all") == world.people("all")
    assert [again.document(k) for k in range(30)] == [world.document(k) for k in range(30)]
    assert again.facts("new") == world.facts("new")
    other = SyntheticWorld(seed=8, n_known=60, n_new=15)
    assert [p.name for p in other.people("all")] != [p.name for p in world.people("all")]
    assert [other.document(k) for k in range(5)] != [world.document(k) for k in range(5)]


def test_known_and_new_populations_never_share_a_person():
    w = SyntheticWorld(seed=0, n_known=1500, n_new=500)  # large enough that raw Faker names collide
    known, new = w.people("known"), w.people("new")
    assert len(known) == 1500 and len(new) == 500
    assert not {p.pid for p in known} & {p.pid for p in new}
    assert not {p.name for p in known} & {p.name for p in new}
    assert len({p.name for p in known + new}) == 2000
    assert {p.population for p in known} == {"known"} and {p.population for p in new} == {"new"}


def test_known_population_does_not_depend_on_new_population_size():
    a = SyntheticWorld(seed=3, n_known=40, n_new=5)
    b = SyntheticWorld(seed=3, n_known=40, n_new=50)
    assert a.people("known") == b.people("known")


def test_pretraining_documents_mention_only_known_people(world):
    new_names = {p.name for p in world.people("new")}
    known_names = {p.name for p in world.people("known")}
    docs = [world.document(k, population="known") for k in range(400)]
    assert not any(name in doc for doc in docs for name in new_names)
    mentioned = {n for n in known_names if any(n in d for d in docs)}
    assert len(mentioned) > len(known_names) // 2
    generic = [d for d in docs if not any(n in d for n in known_names)]
    qa_docs = [d for d in docs if d.startswith("Question: ")]
    assert 0.15 < len(generic) / len(docs) < 0.45  # generic_fraction 0.3
    assert 0.03 < len(qa_docs) / len(docs) < 0.2  # qa_fraction 0.1


def test_facts_have_paraphrases_containing_the_answer(world):
    facts = world.facts("new", n_paraphrases=10)
    assert len(facts) == 15 * len(ATTRIBUTES)
    assert len({f.fact_id for f in facts}) == len(facts)
    for f in facts:
        assert len(f.paraphrases) == 10
        assert len(set(f.paraphrases)) == len(STATEMENTS[f.meta["attribute"]])  # templates cycled
        assert all(f.answer in p and f.meta["person"] in p for p in f.paraphrases)
        assert f.meta["person"] in f.question and f.question.endswith("?")


def test_qa_renderings(world):
    qa = world.qa_examples("new")
    assert len(qa) == 15 * len(ATTRIBUTES)
    person = world.people("new")[0]
    first = qa[0]
    assert first.question == f"When was {person.name} born?" and first.answers == [person.birth_date]
    assert qa_prompt(first.question) == f"Question: When was {person.name} born?\nAnswer:"
    assert world.qa_examples("new", variant=1)[0].question != first.question


def test_biography_states_all_six_facts(world):
    import random

    person = world.people("known")[0]
    bio = world.biography(person, random.Random(0))
    for attr in ATTRIBUTES:
        assert person.value(attr) in bio
    assert bio.count(".") >= 6


def test_unknown_population_is_an_error(world):
    with pytest.raises(ValueError, match="synthetic_population"):
        world.people("old")


def test_qa_documents_only_about_the_qa_people_and_held_out_prose_is_unseen():
    """synthetic_qa_people=K: pretraining QA pairs name only the first K known people (the rest appear only
    in biographies: population known_bio); held-out prose is drawn from a stream pretraining never reads."""
    w = SyntheticWorld(seed=3, n_known=12, n_new=2, qa_people=4)
    qa_names = {p.name for p in w.people("known_qa")}
    bio_names = {p.name for p in w.people("known_bio")}
    assert len(qa_names) == 4 and len(bio_names) == 8 and not qa_names & bio_names
    docs = [w.document(i, generic_fraction=0.0, qa_fraction=0.5) for i in range(300)]
    qa_docs = [d for d in docs if d.startswith("Question:")]
    bios = [d for d in docs if not d.startswith("Question:")]
    assert len(qa_docs) > 100 and len(bios) > 100
    assert all(any(n in d for n in qa_names) and not any(n in d for n in bio_names) for d in qa_docs)
    assert any(any(n in d for n in bio_names) for d in bios)
    prose = w.heldout_prose(20)
    pretraining = {w.document(i, generic_fraction=1.0) for i in range(2000)}
    assert len(set(prose)) == 20 and not set(prose) & pretraining
    with pytest.raises(ValueError, match="synthetic_qa_people"):
        SyntheticWorld(seed=3, n_known=12, n_new=2, qa_people=13)


def test_known_halves_are_disjoint_stratified_and_seeded():
    """known_val / known_test: all known people in two disjoint halves, each with QA-trained and
    biography-only people in proportion (odd counts: one more at most), a seeded random split."""
    w = SyntheticWorld(seed=5, n_known=23, n_new=3, qa_people=9)
    val, test = w.people("known_val"), w.people("known_test")
    assert sorted(p.pid for p in val + test) == list(range(23)) and abs(len(val) - len(test)) <= 1
    for kind, n in (("known_qa", 9), ("known_bio", 14)):
        counts = [sum(w.person_kind(p.pid) == kind for p in half) for half in (val, test)]
        assert sorted(counts) == [n // 2, n - n // 2]
    assert [w.person_kind(p) for p in (0, 8, 9, 22, 23, 25)] == ["known_qa"] * 2 + ["known_bio"] * 2 + [
        "new"
    ] * 2
    with pytest.raises(ValueError, match="person id 26"):
        w.person_kind(26)
    assert SyntheticWorld(seed=5, n_known=23, n_new=3, qa_people=9).people("known_val") == val
    other = SyntheticWorld(seed=6, n_known=23, n_new=3, qa_people=9)
    assert [p.pid for p in other.people("known_val")] != [p.pid for p in val]
    assert [p.pid for p in val] != list(range(0, 23, 2))  # random, not every other person


def test_heldout_days_repeat_their_name_and_are_not_pretraining_paragraphs():
    w = SyntheticWorld(seed=3, n_known=12, n_new=2)
    days = w.heldout_days(40)
    assert len(set(days)) == 40
    for d in days:
        name = d.split(" ", 1)[0]
        assert d.startswith(f"{name} woke up early on ") and f"After breakfast {name} walked" in d
    pretraining = {p for i in range(3000) for p in w.document(i, generic_fraction=1.0).split("\n\n")}
    assert (
        sum(p.startswith(tuple(f"{n} woke up" for n in "Anna Tom Ben Sam".split())) for p in pretraining)
        > 100
    )
    assert not set(days) & pretraining
    assert not set(days) & {p for d in w.heldout_prose(400) for p in d.split("\n\n")}
