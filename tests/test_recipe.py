import pytest

from compress.quantize.rtn import RTNConfig
from compress.recipe import Recipe


def test_yaml_round_trip_gives_equal_configs():
    r = Recipe.from_yaml("- pass: rtn\n  bits: 3\n  group_size: 64\n  symmetric: false\n  ignore: ['re:.*down_proj']\n")
    cfg = r.steps[0].config
    assert isinstance(cfg, RTNConfig)
    assert (cfg.bits, cfg.group_size, cfg.symmetric, cfg.ignore) == (3, 64, False, ("re:.*down_proj",))
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_misspelt_key_names_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key 'bit'; valid keys: bits, group_size, symmetric"):
        Recipe.from_yaml("- pass: rtn\n  bit: 4\n")


def test_unknown_pass_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown pass 'gptqq'; known: .*rtn"):
        Recipe.from_yaml("- pass: gptqq\n")


@pytest.mark.parametrize("text,msg", [
    ("- pass: rtn\n  group_size: '128'\n", "expected an integer"),
    ("- pass: rtn\n  group_size: true\n", "expected an integer"),
    ("- pass: rtn\n  bits: '4'\n", "'4' is not one of 2, 3, 4, 8"),
    ("- pass: rtn\n  bits: true\n", "True is not one of 2, 3, 4, 8"),
    ("- pass: rtn\n  symmetric: 1\n", "expected true or false"),
    ("- pass: rtn\n  bits: 6\n", "bits: 6 is not one of 2, 3, 4, 8"),
    ("- pass: rtn\n  ignore: ['re:(']\n", "bad regular expression"),
    ("[]", "non-empty YAML list"),
    ("pass: rtn", "non-empty YAML list"),
    ("- bits: 4\n", "missing 'pass:'"),
    ("- pass: rtn\n  bits: [4\n", "not valid YAML"),
])
def test_bad_recipes_fail_with_a_reason(text, msg):
    with pytest.raises(ValueError, match=msg):
        Recipe.from_yaml(text)


def test_single_step_recipe_matches_yaml():
    assert Recipe.single("rtn", bits=8, group_size=-1) == Recipe.from_yaml("- {pass: rtn, bits: 8, group_size: -1}")
