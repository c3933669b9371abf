"""Malformed Loom bundles are FormatErrors with a clear message, never raw Python errors."""

from __future__ import annotations

import base64
import json

import pytest

from loomx.errors import FormatError
from loomx.io.loom_bundle import parse_bundle
from tests.conftest import LOOM_FIXTURES

FIXTURE = LOOM_FIXTURES / "dense_mlp_b1.json"


@pytest.fixture(scope="module")
def good():
    if not FIXTURE.is_file():
        pytest.skip("Loom fixtures not available")
    return json.loads(FIXTURE.read_text())["bundle"]


def _variant(good, change):
    d = json.loads(good)
    change(d)
    return json.dumps(d)


def _weights(d):
    return json.loads(base64.b64decode(d["models"][0]["weights"]["data"]))


def _set_weights(d, w):
    d["models"][0]["weights"]["data"] = base64.b64encode(json.dumps(w).encode()).decode()


def _first_weight(d, **kw):
    w = _weights(d)
    w["layers"][0] = {**w["layers"][0], **kw} if kw else "x"
    _set_weights(d, w)


CASES = {
    "layers_not_list": (lambda d: d["models"][0]["cfg"].__setitem__("layers", 5),
                        "'layers' must be a list"),
    "layer_entry_str": (lambda d: d["models"][0]["cfg"]["layers"].__setitem__(0, "dense"),
                        "layer definition 0 must be an object"),
    "weight_entry_str": (lambda d: _first_weight(d), "weight entry 0 must be an object"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_structure(good, case):
    change, match = CASES[case]
    with pytest.raises(FormatError, match=match):
        parse_bundle(_variant(good, change))


@pytest.mark.parametrize("kernel", ["abc", "nulls"])
def test_non_numeric_weights_are_rejected_not_nan(good, kernel):
    from loomx.grid.loom_format import load_loom_bundle

    def change(d):
        n = len(_weights(d)["layers"][0]["kernel"])
        _first_weight(d, kernel="abc" if kernel == "abc" else [None] * n)

    with pytest.raises(FormatError, match="'kernel' must be a list of numbers"):
        load_loom_bundle(_variant(good, change))


def test_deep_nesting_is_a_format_error():
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_bundle('{"a":' + "[" * 50000 + "]" * 50000 + "}")


@pytest.mark.parametrize("value", ["8", 8.5, True, float("nan"), float("inf")])
def test_integer_fields_must_be_integers(good, value):
    """Go's decoder refuses strings, fractions and bools for Loom's int fields; so does loomx,
    instead of reading them as some number."""
    from loomx.grid.loom_format import load_loom_bundle

    def change(d):
        d["models"][0]["cfg"]["layers"][0]["output_height"] = value

    with pytest.raises(FormatError, match=f"output_height must be an integer, got {value!r}"):
        load_loom_bundle(_variant(good, change), backend="numpy")
