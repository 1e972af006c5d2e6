"""Regexes and fields of PEFT configs: an invalid key is an AdapterError naming it, a catastrophic
one is refused within the time bound, valid ones match as PEFT matches them, and fuzzed
``adapter_config.json`` contents give a typed error or success, in bounded time."""

from __future__ import annotations

import copy
import json
import re
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from flora_graph.adapters import LoRAAdapter, adapters_of, apply_lora
from flora_graph.adapters.patterns import MATCH_BUDGET_S, BoundedPattern
from flora_graph.adapters.peft import CONFIG_FILE, load_peft_adapter, save_peft_adapter
from flora_graph.errors import AdapterError

PATH = "model.layers.0.self_attn.q_proj"  # 30 characters, as in the issue
PEFT_WRAP = r"(.*\.)?({})$"


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(6, 6), nn.Linear(6, 6)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attn()
        self.mlp = nn.Linear(6, 6)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            x = layer.mlp(layer.self_attn.v_proj(layer.self_attn.q_proj(x)))
        return x


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A PEFT folder (rank 2 everywhere) for :class:`Model`, and the plain model."""
    torch.manual_seed(0)
    plain = Model().eval()
    model = copy.deepcopy(plain)
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    for a in adapters_of(model).values():
        nn.init.normal_(a.lora_B)
    out = save_peft_adapter(model, tmp_path_factory.mktemp("peft") / "adapter")
    return plain, out


def _with_config(folder, tmp_path, **changes):
    plain, src = folder
    dst = tmp_path / "edited"
    dst.mkdir(exist_ok=True)
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / CONFIG_FILE).read_text())
    cfg.update(changes)
    (dst / CONFIG_FILE).write_text(json.dumps(cfg))
    return copy.deepcopy(plain), dst


def _untouched(model: nn.Module) -> bool:
    return not adapters_of(model)


@pytest.mark.parametrize(("field", "key"), [("rank_pattern", "("), ("alpha_pattern", "q_proj["), ("rank_pattern", "a{2,1}"),
                                            ("alpha_pattern", "(?P<x>a)(?P<x>b)")])
def test_an_invalid_pattern_key_is_an_adapter_error_naming_it(folder, tmp_path, field, key):
    model, path = _with_config(folder, tmp_path, **{field: {"v_proj": 2, key: 2}})
    with pytest.raises(AdapterError, match=rf"{field} key {re.escape(repr(key))}: .* is not a valid regular expression"):
        load_peft_adapter(model, path)
    assert _untouched(model)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_an_invalid_module_regex_is_an_adapter_error(folder, tmp_path, field):
    model, path = _with_config(folder, tmp_path, **{field: "q_proj|("})
    with pytest.raises(AdapterError, match=rf"{field}: 'q_proj\|\(' is not a valid regular expression"):
        load_peft_adapter(model, path)


@pytest.mark.parametrize("key", [r"(.|.)*Z", r"(.|.)*[0-9]", r"(.*?){20}\d", r"(\w|\w)*Z"])
def test_a_catastrophic_pattern_returns_or_is_refused_within_the_bound(folder, tmp_path, key):
    """``re`` needs minutes for these on a 30-character path; the loader answers within ~1 s."""
    model, path = _with_config(folder, tmp_path, rank_pattern={key: 3})
    start = time.perf_counter()
    try:
        load_peft_adapter(model, path)  # matches nothing: every module keeps r=2
    except AdapterError as exc:
        assert re.escape(repr(key)) and repr(key) in str(exc) and "backtracks catastrophically" in str(exc)
        assert _untouched(model)
    else:
        assert {a.rank for a in adapters_of(model).values()} == {2}
    assert time.perf_counter() - start < MATCH_BUDGET_S + 3


def test_a_pattern_costly_to_compile_is_refused_before_compiling(folder, tmp_path):
    """``regex`` unrolls counted repeats: this one would take minutes and gigabytes to compile."""
    model, path = _with_config(folder, tmp_path, alpha_pattern={"((a{1000}){1000}){1000}": 3.0})
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=r"alpha_pattern key '\(\(a\{1000\}.*nests counted repeats"):
        load_peft_adapter(model, path)
    assert time.perf_counter() - start < 1


def test_the_budget_is_per_pattern_across_all_paths():
    p = BoundedPattern(r"(.|.)*[0-9]", "test", wrap=PEFT_WRAP, budget_s=0.2)
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=r"test: pattern .* takes more than 0.2 s"):
        for _ in range(50):
            p.match(PATH)
    with pytest.raises(AdapterError, match="takes more than"):  # spent: refused at once from now on
        p.match("x")
    assert time.perf_counter() - start < 2


KEYS = ["q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj", "^model.layers.0.self_attn.q_proj", "q", "proj",
        r"layers\.\d+\.self_attn\.(q|v)_proj", ".*", "", "v_proj|q_proj", "(q)_proj", r"\.q_proj", "Q_PROJ", "(?i:Q_PROJ)",
        "layers.[01].*", "model", "0.self_attn.q_proj", r"\w+", "q_proj$", "(?:self_attn)\\.q_proj"]
NAMES = [PATH, "model.layers.1.self_attn.v_proj", "model.layers.0.mlp", "q_proj", "xq_proj", "model.layers.10.self_attn.q_proj"]


@pytest.mark.parametrize("key", KEYS)
def test_valid_patterns_match_as_peft_matches(key):
    from peft.utils.other import get_pattern_key

    p = BoundedPattern(key, "test", wrap=PEFT_WRAP)
    for name in NAMES:
        assert p.match(name) == (get_pattern_key([key], name) == key) == bool(re.match(PEFT_WRAP.format(key), name))


_ATOMS = st.sampled_from(["q", "_", "proj", ".", r"\.", r"\d", r"\w", "[a-z]", "[0-9]+", "0", "layers", "self_attn", "^", "$"])


_QUANTIFIERS = ("*", "+", "?", "{")


@st.composite
def _regexes(draw, depth: int = 0) -> str:
    """A regular expression of :data:`_ATOMS` and groups; a group is quantified only where nothing in it is, so that
    no quantifier nests in another: the reference, ``re.match``, backtracks exponentially on nested ones
    (``((\\w+)*)*`` against a module path ran for minutes) and has no bound of its own."""
    parts = draw(st.lists(_ATOMS if depth > 1 else st.one_of(_ATOMS, _regexes(depth + 1)), min_size=1, max_size=4))
    out = "".join(parts)
    last = parts[-1]  # what a quantifier after ``out`` repeats
    if depth:
        out = last = "(" + out + draw(st.sampled_from(["", "|q", "|proj"])) + ")"
    if any(q in last for q in _QUANTIFIERS):
        return out
    return out + draw(st.sampled_from(["", "", "*", "+", "?", "{1,2}"]))


@settings(max_examples=200, deadline=None)
@given(key=_regexes(), name=st.sampled_from(NAMES))
def test_generated_patterns_match_as_re_does(key, name):
    try:
        want = bool(re.match(PEFT_WRAP.format(key), name))
    except re.error:
        with pytest.raises(AdapterError, match="not a valid regular expression"):
            BoundedPattern(key, "test", wrap=PEFT_WRAP)
        return
    assert BoundedPattern(key, "test", wrap=PEFT_WRAP).match(name) == want


# --------------------------------------------------------------------------- fuzzed configs
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)
_REGEXY = st.one_of(_regexes(), st.text(alphabet="()[]{}|*+?.\\^$qv_proj0-", max_size=16), st.sampled_from(KEYS))
_FIELDS = {
    "r": st.one_of(st.integers(-3, 8), st.integers(2**31, 2**80), _JSON),
    "lora_alpha": st.one_of(st.floats(allow_nan=False), st.integers(), _JSON),
    "target_modules": st.one_of(_REGEXY, st.lists(st.sampled_from(["q_proj", "v_proj", "mlp", "nope"]), max_size=3), _JSON),
    "exclude_modules": st.one_of(st.none(), _REGEXY, st.lists(st.sampled_from(["v_proj", "layers.1.self_attn.q_proj"])), _JSON),
    "rank_pattern": st.one_of(st.dictionaries(_REGEXY, st.one_of(st.integers(-1, 4), _JSON), max_size=3), _JSON),
    "alpha_pattern": st.one_of(st.dictionaries(_REGEXY, st.one_of(st.floats(), st.integers(), _JSON), max_size=3), _JSON),
    "use_rslora": st.one_of(st.booleans(), _JSON),
    "bias": st.one_of(st.sampled_from(["none", "all", "lora_only", "x"]), _JSON),
    "modules_to_save": st.one_of(st.none(), st.lists(st.sampled_from(["model.layers.0.mlp", "mlp", "nope"]), max_size=2), _JSON),
    "peft_type": st.one_of(st.just("LORA"), _JSON),
    "use_dora": st.one_of(st.just(False), _JSON),
    "fan_in_fan_out": st.one_of(st.booleans(), _JSON),
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.fixed_dictionaries({}, optional=_FIELDS), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzzed_configs_give_a_typed_error_or_success_in_bounded_time(folder, tmp_path_factory, changes, raw):
    model, path = _with_config(folder, tmp_path_factory.mktemp("cfg"), **changes)
    if raw is not None:  # not even JSON
        (path / CONFIG_FILE).write_bytes(raw)
    start = time.perf_counter()
    try:
        names = load_peft_adapter(model, path)
    except AdapterError:
        assert _untouched(model)
    else:
        assert names and all(isinstance(a, LoRAAdapter) for a in adapters_of(model).values())
    assert time.perf_counter() - start < 4 * MATCH_BUDGET_S + 2
