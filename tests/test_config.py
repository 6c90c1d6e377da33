"""tinyBIG's config dicts and YAML/JSON files build the same functions, unchanged."""
import json
from pathlib import Path

import pytest
import torch

import tinyrecon as tr

DATA = Path(__file__).parent / "data"
TUTORIAL = DATA / "reconciliation_function_config.yaml"   # tinyBIG's tutorial: n=6, D=12


def test_tutorial_yaml():
    rec = tr.from_config(TUTORIAL)
    assert type(rec) is tr.dual_lphm_reconciliation
    assert (rec.p, rec.q, rec.r, rec.layout) == (2, 3, 1, "kron")
    assert rec.calculate_l(6, 12) == 12
    # tinyBIG's extra keys are kept for the layer that owns w and bias.
    assert (rec.name, rec.require_parameters, rec.enable_bias, rec.device) == (
        "dual_lphm_reconciliation", True, True, "cpu")
    assert type(tr.from_config(str(TUTORIAL))) is tr.dual_lphm_reconciliation


def test_head_config_json():
    rec = tr.from_config(DATA / "head_config.json")
    assert type(rec) is tr.hm_reconciliation and (rec.p, rec.q) == (2, 3) and rec.enable_bias


@pytest.mark.parametrize("prefix", ["parameter_reconciliation", "parameter_fabrication", "function"])
def test_class_and_parameters_keys(prefix):
    config = {f"{prefix}_class": "tinybig.reconciliation.lphm_reconciliation",
              f"{prefix}_parameters": {"name": "lphm_reconciliation", "p": 2, "q": 4, "r": 3},
              "device": "cpu"}   # tinyBIG's instantiation_functions adds this top-level key
    rec = tr.from_config(config)
    assert type(rec) is tr.lphm_reconciliation and (rec.p, rec.q, rec.r) == (2, 4, 3)


@pytest.mark.parametrize("wrapper", ["parameter_reconciliation_configs", "parameter_fabrication_configs",
                                     "head_parameters"])
def test_wrapped_configs(wrapper):
    inner = {"parameter_fabrication_class": "tinybig.reconciliation.lorr_reconciliation",
             "parameter_fabrication_parameters": {"r": 4}}
    rec = tr.from_config({"name": "a head", wrapper: inner})
    assert type(rec) is tr.lorr_reconciliation and rec.r == 4


@pytest.mark.parametrize("cls", tr.ALL, ids=[c.__name__ for c in tr.ALL])
def test_every_tinybig_class_path(cls):
    rec = tr.from_config({"function_class": f"tinybig.reconciliation.{cls.__name__}"})
    assert type(rec) is cls


def test_missing_parameters_is_defaults():
    rec = tr.from_config({"function_class": "tinybig.reconciliation.lorr_reconciliation",
                          "function_parameters": None})   # YAML's empty mapping
    assert rec.r == 2


def test_unknown_class_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown reconciliation 'tinybig.reconciliation.lorx_reconciliation'; "
                                         r"known: \[.*'dual_lphm'.*'lorr'"):
        tr.from_config({"function_class": "tinybig.reconciliation.lorx_reconciliation"})
    with pytest.raises(ValueError, match="unknown reconciliation 'torch.nn.LayerNorm'"):
        tr.from_config({"function_class": "torch.nn.LayerNorm"})


def test_unknown_parameter_names_the_accepted_ones():
    with pytest.raises(TypeError, match=r"hm_reconciliation: .*'pp'.*its parameters: \['name', 'p', 'q', 'layout'\]"):
        tr.from_config({"function_class": "hm_reconciliation", "function_parameters": {"pp": 2}})


def test_no_class_key():
    with pytest.raises(ValueError, match=r"no reconciliation config found.*got keys \['data_class'\]"):
        tr.from_config({"data_class": "tinybig.data.mnist"})
    with pytest.raises(TypeError, match="dict or a file path"):
        tr.from_config(["function_class"])


def test_not_a_mapping_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        tr.from_config(path)


@pytest.mark.parametrize("where", ["top", "parameters", "override"])
def test_layout_key_selects_tinybig(where):
    config = {"function_class": "tinybig.reconciliation.hm_reconciliation", "function_parameters": {"p": 2, "q": 3}}
    kw = {}
    if where == "top":
        config["layout"] = "tinybig"
    elif where == "parameters":
        config["function_parameters"]["layout"] = "tinybig"
    else:
        kw["layout"] = "tinybig"
    rec = tr.from_config(config, **kw)
    assert rec.layout == "tinybig"
    w = torch.randn(tr.hm_reconciliation(p=2, q=3).calculate_l(6, 12))
    assert torch.equal(rec(n=6, D=12, w=w), tr.hm_reconciliation(p=2, q=3, layout="tinybig")(n=6, D=12, w=w))
    assert not torch.equal(rec(n=6, D=12, w=w), tr.hm_reconciliation(p=2, q=3)(n=6, D=12, w=w))


def test_layout_on_functions_without_one():
    # lorr computes one W in both layouts: the key is accepted and has nothing to select.
    assert type(tr.from_config({"function_class": "lorr_reconciliation", "layout": "tinybig"})) is tr.lorr_reconciliation
    # tinyBIG's frozen random matrices were never saved: asking for them must fail, not guess.
    with pytest.raises(ValueError, match="cannot reproduce tinyBIG 0.2.1's random_matrix_adaption"):
        tr.from_config({"function_class": "random_matrix_adaption_reconciliation", "layout": "tinybig"})
    with pytest.raises(ValueError, match=r"layout must be one of \('kron', 'tinybig'\)"):
        tr.from_config({"function_class": "lorr_reconciliation", "layout": "outer"})


def test_overrides_replace_parameters(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"function_class": "dual_lphm", "function_parameters": {"r": 1}}))
    rec = tr.from_config(path, r=3, backend="torch")
    assert rec.r == 3 and rec.backend == "torch"


def test_resolve_forms():
    from tinyrecon.config import resolve
    rec = tr.hm_reconciliation()
    assert resolve(rec) is rec
    assert type(resolve("dual_lphm")) is tr.dual_lphm_reconciliation
    assert type(resolve(str(TUTORIAL))) is tr.dual_lphm_reconciliation
    assert type(resolve({"function_class": "lorr"})) is tr.lorr_reconciliation
