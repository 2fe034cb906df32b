from compress.models import load_model
from compress.pipeline import apply
from compress.recipe import Recipe
from eval.results import model_identity, parameter_count


def test_parameters_count_logical_weights_once(model_dirs, tmp_path):
    """Tied embeddings count once; a quantized Linear counts out x in weights, not its packed words."""
    from compress.models import save_model

    lm = load_model(model_dirs["llama"])
    unique = {id(p): p.numel() for p in lm.model.parameters()}
    n = parameter_count(lm.model)
    assert n == sum(unique.values())
    apply(lm.model, Recipe.single("rtn", bits=4, group_size=32))
    assert parameter_count(lm.model) == n
    save_model(lm, tmp_path / "w4")
    ident = model_identity(load_model(tmp_path / "w4"))
    assert ident["parameters"] == n and 4 < ident["bits_per_parameter"] < 32
