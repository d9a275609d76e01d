"""The config table (vgg_jax.config_checks.RULES): every field is listed, each range's boundaries and each
choice are accepted or refused as the table says, and every field is classed for resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from configs import default
from vgg_jax import config_checks
from vgg_jax.config_checks import BOOL, RULES, Bound
from vgg_jax.errors import ConfigError

DEFAULTS = config_checks.flatten(json.loads(default.get_config().to_json_best_effort()))
REPO = Path(__file__).resolve().parents[1]


def documented_resumable(field: str) -> bool:
    """Whether docs/training.md#resuming's first row lets ``field`` change (``section.*`` covers a section)."""
    text = (REPO / "docs" / "training.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `num_train_steps`;"))
    names = re.findall(r"`([a-z_.*]+)`", row.split(" | ")[0])
    return any(field == n or (n.endswith(".*") and field.startswith(n[:-1])) for n in names)


def with_value(field: str, value):
    config = default.get_config()
    *sections, name = field.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value
    return config


def boundary_cases(field: str, rule: Bound) -> list[tuple[object, bool]]:
    """(value, accepted?) at and just beyond each end of ``rule``'s range, and its extra values."""
    integer = rule.integer or isinstance(DEFAULTS[field], int)
    cases = [(v, True) for v in rule.also]
    for end, is_open, outward in ((rule.low, rule.open_low, -1), (rule.high, rule.open_high, 1)):
        if end is None:
            continue
        if integer:
            end = int(end)
            cases += [(end, not is_open), (end + outward, False), (end - outward, True)]
        else:
            end = float(end)
            cases += [(end, not is_open), (float(np.nextafter(end, end + outward)), False)]
            cases += [(float(np.nextafter(end, end - outward)), True)]
    return cases


BOUNDARIES = [
    (field, value, ok)
    for field, rule in RULES.items()
    if isinstance(rule, Bound)
    for value, ok in boundary_cases(field, rule)
]
CHOICES = [(field, choice) for field, rule in RULES.items() if isinstance(rule, tuple) for choice in rule]


def test_the_table_lists_every_config_field_as_the_docs_do():
    """RULES covers every field, and docs/training.md's table of valid values says the same field by field (an
    independent statement of each range: a changed end or choice in RULES must be changed there too)."""
    assert set(RULES) == set(DEFAULTS)
    config_checks.validate(default.get_config())  # the defaults pass
    lines = (REPO / "docs" / "training.md").read_text().splitlines()
    start = lines.index("| valid values | fields |") + 2
    documented = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        values, fields = line[2:-2].rsplit(" | ", 1)
        documented |= {f: values for f in re.findall(r"`([a-z_.]+)`", fields)}
    assert documented == {field: config_checks.describe(rule) for field, rule in RULES.items()}


@pytest.mark.parametrize("field, value, ok", BOUNDARIES, ids=[f"{f}={v!r}" for f, v, _ in BOUNDARIES])
def test_each_boundary_is_accepted_or_refused_as_the_table_says(field, value, ok):
    config = with_value(field, value)
    if ok:
        config_checks.validate(config)
    else:
        with pytest.raises(ConfigError, match=rf"^--config\.{field}={value!r}: must be "):
            config_checks.validate(config)


@pytest.mark.parametrize("field, choice", CHOICES, ids=[f"{f}={c!r}" for f, c in CHOICES])
def test_each_choice_is_accepted(field, choice):
    config_checks.validate(with_value(field, choice))


@pytest.mark.parametrize("field", [f for f, rule in RULES.items() if isinstance(rule, tuple) and rule != BOOL])
def test_a_value_outside_the_choices_is_refused(field):
    with pytest.raises(ConfigError, match=rf"^--config\.{field}='nonsense': must be one of "):
        config_checks.validate(with_value(field, "nonsense"))


def changed(field: str, value):
    """A value of ``field``'s type that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return (*value, value[-1]) if value else (1,)
    rule = RULES[field]
    return 1 if value is None and isinstance(rule, Bound) and rule.integer else f"{value or ''}x"


@pytest.mark.parametrize("field", sorted(DEFAULTS))
def test_every_field_is_classed_for_resume_and_a_change_to_it_tried(field):
    """Each field's change is applied or refused as docs/training.md#resuming says (its first row lists what may
    change; sections as ``checkpoint.*``); a refused change is applied once allow_resume_changes names it."""
    stored = json.loads(default.get_config().to_json_best_effort())  # as a checkpoint's meta holds it
    config = with_value(field, changed(field, DEFAULTS[field]))
    allowed, refused = config_checks.resume_changes(stored, config)
    assert [c.field for c in allowed + refused] == [field]
    if documented_resumable(field):
        assert refused == []
    else:
        assert allowed == []
        config.allow_resume_changes = field  # changed knowingly
        allowed, refused = config_checks.resume_changes(stored, config)
        assert {c.field for c in allowed} == {field, "allow_resume_changes"} and refused == []
