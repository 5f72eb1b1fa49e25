"""The generated request schema and the validation agree (a property test that needs no schemathesis): values drawn
from the schema's own bounds are accepted, values just outside them are refused naming the field."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from omni_runtime.runtime.requests import FIELDS, RequestError, openapi_request_schema, parse_request

SCHEMA = openapi_request_schema()["properties"]


def _valid(name: str) -> st.SearchStrategy:
    s = SCHEMA[name]
    if "oneOf" in s:  # cache: one method's object with its keys within their bounds
        def variant(v: dict) -> st.SearchStrategy:
            p = v["properties"]
            keys = {k: (st.integers(b["minimum"], b["maximum"]) if b["type"] == "integer"
                        else st.floats(b["minimum"], b["maximum"], allow_nan=False)) for k, b in p.items()
                    if k != "method"}
            return st.fixed_dictionaries({"method": st.just(p["method"]["enum"][0])}, optional=keys)
        return st.one_of([variant(v) for v in s["oneOf"] if v["type"] == "object"])
    types = s["type"] if isinstance(s["type"], list) else [s["type"]]
    base = types[0]
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if base == "array":  # lora: objects of the item schema
        item = s["items"]["properties"]
        names = st.from_regex(item["name"]["pattern"], fullmatch=True)
        scales = st.floats(item["scale"]["minimum"], item["scale"]["maximum"], allow_nan=False)
        return st.lists(st.fixed_dictionaries({"name": names}, optional={"scale": scales}), max_size=s["maxItems"])
    if base == "integer":
        return st.integers(s["minimum"], s["maximum"]) | st.sampled_from([s["minimum"], s["maximum"]])
    if base == "number":
        return st.floats(s["minimum"], s["maximum"], allow_nan=False) | st.sampled_from([s["minimum"], s["maximum"]])
    if "pattern" in s and name == "size":
        return st.from_regex(s["pattern"], fullmatch=True)
    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=min(s.get("maxLength", 50), 50))
    if "pattern" in s:
        text = text.filter(lambda v: re.search(s["pattern"], v) is not None)
    long = st.integers(0, 3).map(lambda k: "a" * (s["maxLength"] - k)) if "maxLength" in s else st.nothing()
    return text | long


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"prompt": _valid("prompt")},
                             optional={n: _valid(n) for n in FIELDS if n != "prompt"}))
def test_schema_valid_bodies_are_accepted(body):
    req = parse_request(body)
    assert req.prompt == body["prompt"]
    if body.get("num_inference_steps") is not None:
        assert req.num_inference_steps == body["num_inference_steps"]


def _just_outside(name: str) -> list:
    s = SCHEMA[name]
    if "oneOf" in s:  # cache
        return [5, "a", {}, {"method": "x"}, {"method": "first_block", "threshold": 1.001},
                {"method": "first_block", "fn": 1}, {"method": "dbcache", "fn": 0}]
    base = s["type"][0] if isinstance(s["type"], list) else s["type"]
    if "enum" in s:
        return ["not-" + str(s["enum"][0])]
    if base == "array":
        scale = s["items"]["properties"]["scale"]
        return [5, "a", {"name": "a"}, [{"name": "a", "scale": scale["maximum"] + 0.001}], [{"name": ""}],
                [{"name": f"n{i}"} for i in range(s["maxItems"] + 1)], [{"name": "a", "x": 1}]]
    if base == "integer":
        return [s["minimum"] - 1, s["maximum"] + 1, 1.5, True]
    if base == "number":
        return [s["minimum"] - 0.001, s["maximum"] + 0.001, float("nan"), "1"]
    out: list = [5]
    if "maxLength" in s:
        out.append("a" * (s["maxLength"] + 1))
    if name == "size":
        out += ["2064x16", "16x8", "0x16", "16x0032"]
    if name == "prompt":
        out += ["", " \t\n"]
    return out


def test_values_just_outside_the_schema_are_refused_naming_the_field():
    checked = 0
    for name in FIELDS:
        for value in _just_outside(name):
            try:
                parse_request({"prompt": "x", name: value})
            except RequestError as e:
                assert e.param == name, (name, value, str(e))
                checked += 1
            else:
                raise AssertionError(f"{name}={value!r} is outside the schema but was accepted")
    assert checked >= 35
