"""Property-based: config.json's guidance block and manifest.json mutated at random (types,
ranges, missing and extra keys, nesting) are either accepted or refused with one clean
CfgExportError, never another exception; and whatever is accepted samples without one."""
import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import Manifest, ModelFacts

GUIDANCE = {"condition": {"kind": "class", "num_classes": 10, "null": 10}, "prediction": "eps",
            "schedule": {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02},
            "sample_shape": [1, 16, 16], "timestep_dtype": "int64"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)


def paths(d, prefix=()):
    """Every key path of a nested dict/list."""
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """A copy of `base` with one to three mutations: a value replaced, a key dropped, a key added."""
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        all_paths = [p for p in paths(d) if p]
        if not all_paths:
            break
        path = draw(st.sampled_from(all_paths))
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "drop" and isinstance(parent, dict):
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return d


def accept_or_refuse(fn, value):
    try:
        return fn(value)
    except CfgExportError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
        return None


@settings(max_examples=300, deadline=None)
@given(mutated(GUIDANCE))
def test_guidance_block_is_accepted_or_refused_cleanly(d):
    facts = accept_or_refuse(ModelFacts.from_dict, d)
    if facts is not None:  # accepted: everything sampling needs from it works
        ac = facts.schedule.alphas_cumprod()
        assert np.all((ac > 0) & (ac < 1)) and np.all(np.diff(ac) < 0)
        assert facts.condition.kind.value != "class" or facts.condition.null >= facts.condition.num_classes
        assert all(isinstance(s, int) and s >= 1 for s in facts.sample_shape)


@pytest.fixture(scope="module")
def manifest_dict(tiny_artifacts):
    return json.loads((tiny_artifacts / "stacked" / "manifest.json").read_text())


def test_manifest_mutations(manifest_dict):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutated(manifest_dict))
    def check(d):
        manifest = accept_or_refuse(Manifest.from_dict, d)
        if manifest is not None:
            manifest.facts.schedule.alphas_cumprod()
            manifest.to_dict()  # what was accepted writes back
            for spec in manifest.inputs:
                assert all(isinstance(s, str) or s >= 1 for s in spec.shape)

    check()


def test_a_wrong_json_type_at_the_top(manifest_dict):
    for value in (3, "x", [manifest_dict], None):
        with pytest.raises(CfgExportError):
            Manifest.from_dict(value)
