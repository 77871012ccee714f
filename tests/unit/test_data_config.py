import dataclasses
import typing

import pytest

from titan_mem.data import DataConfig, TokenizerConfig

ALLOWED = {str, int, float, bool, list[str], str | None, int | None}


@pytest.mark.parametrize("cls", [TokenizerConfig, DataConfig])
def test_every_field_has_default_help_and_allowed_type(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
        tp = hints[f.name]
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
        is_choice = bool(choices) and all(isinstance(a, str) for a in choices)
        assert tp in ALLOWED or is_choice, (f.name, tp)
    cls().validate()


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"regime": "pretraining"}, "data.regime"),
        ({"source_type": "s3"}, "data.source_type"),
        ({"text_split": "sentence"}, "data.text_split"),
        ({"synthetic_population": "old"}, "data.synthetic_population"),
        ({"shuffle_buffer": -1}, "data.shuffle_buffer"),
        ({"num_workers": -2}, "data.num_workers"),
        ({"synthetic_generic_fraction": 1.5}, "data.synthetic_generic_fraction"),
        ({"synthetic_generic_fraction": 0.8, "synthetic_qa_fraction": 0.5}, "data.synthetic_qa_fraction"),
        ({"synthetic_paraphrases": 0}, "data.synthetic_paraphrases"),
        ({"regime": "facts", "synthetic_new_people": 0}, "data.synthetic_new_people"),
        ({"source": ""}, "data.source"),
    ],
)
def test_data_validate_names_the_key(changes, key):
    with pytest.raises(ValueError) as err:
        DataConfig(**changes).validate()
    msg = str(err.value)
    assert msg.startswith(key + ":") and "\n" not in msg


def test_regime_error_lists_choices():
    with pytest.raises(
        ValueError,
        match=r"data.regime: expected one of pretrain, facts, qa, chat, documents; got 'x'",
    ):
        DataConfig(regime="x").validate()


def test_tokenizer_validate_names_the_key():
    with pytest.raises(ValueError, match="^tokenizer.num_threads:"):
        TokenizerConfig(num_threads=0).validate()
    with pytest.raises(ValueError, match="^tokenizer.sha256:"):
        TokenizerConfig(sha256="abc").validate()


def test_population_resolves_by_regime():
    assert DataConfig().population() == "known"
    assert DataConfig(regime="facts").population() == "new"
    assert DataConfig(regime="qa", synthetic_population="known").population() == "known"
