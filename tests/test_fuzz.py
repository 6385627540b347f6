"""Property-based fuzzing of the condition parser and the AnnData loader: clear errors or valid output, never a crash."""

import anndata as ad
import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perturbedvae.data.conditions import CONTROL, ConditionSyntax, canonical_name, genes_of
from perturbedvae.data.loading import load_dataset
from perturbedvae.errors import PerturbedVAEError

gene_names = st.text(alphabet=st.characters(blacklist_characters="+", blacklist_categories=("Cs",)), min_size=0, max_size=6)
condition_strings = st.one_of(
    st.text(max_size=20),
    st.lists(gene_names, min_size=1, max_size=4).map("+".join),
    st.sampled_from(["ctrl", "control", "A+ctrl", "ctrl+ctrl", "+", "++", " + "]),
)


@given(condition_strings)
@settings(max_examples=400, deadline=None)
def test_parser_returns_a_canonical_set_or_a_clear_error(text):
    syntax = ConditionSyntax()
    try:
        genes = syntax.parse(text)
    except PerturbedVAEError:
        return
    assert list(genes) == sorted(set(genes))
    name = canonical_name(genes)
    assert genes_of(name) == genes or name == CONTROL
    assert syntax.canonical(name) == name  # canonical names are fixed points


@given(st.lists(st.sampled_from(["A", "B", "C", "ctrl"]), min_size=1, max_size=3, unique=True))
def test_order_of_genes_does_not_matter(genes):
    syntax = ConditionSyntax()
    assert syntax.canonical("+".join(genes)) == syntax.canonical("+".join(reversed(genes)))


obs_values = st.one_of(condition_strings, st.none(), st.floats(allow_nan=True), st.integers())


@given(
    conditions=st.lists(obs_values, min_size=1, max_size=12),
    genes=st.lists(st.text(min_size=0, max_size=4), min_size=1, max_size=5),
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8]),
    with_control=st.booleans(),
    data=st.data(),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_loader_raises_only_clear_errors_and_never_modifies_input(conditions, genes, dtype, with_control, data):
    if with_control:
        conditions = [*conditions, "control"]
    cell_values = st.one_of(st.floats(min_value=-1, max_value=1e4), st.sampled_from([np.nan, np.inf, 0.0, 3.0]))
    values = data.draw(st.lists(cell_values, min_size=len(conditions) * len(genes), max_size=len(conditions) * len(genes)))
    matrix = np.nan_to_num(np.asarray(values).reshape(len(conditions), len(genes)), nan=0.0, posinf=0.0, neginf=0.0)
    if data.draw(st.booleans()):
        matrix = np.asarray(values).reshape(len(conditions), len(genes))
    with np.errstate(all="ignore"):
        matrix = matrix if np.issubdtype(dtype, np.floating) else np.abs(np.nan_to_num(matrix)).clip(0, 200)
        matrix = matrix.astype(dtype)
    obs = pd.DataFrame({"condition": pd.Series(conditions, dtype=object)}, index=[f"c{i}" for i in range(len(conditions))])
    adata = ad.AnnData(matrix, obs=obs)
    adata.var_names = [str(name) for name in genes]
    before_x, before_obs = adata.X.copy(), adata.obs.copy()
    try:
        data_out = load_dataset(adata, min_cells=0)
    except PerturbedVAEError:
        pass
    else:
        assert CONTROL in data_out.condition_names
        assert np.isfinite(data_out.mean_profiles.to_numpy()).all()
    np.testing.assert_array_equal(adata.X, before_x)
    pd.testing.assert_frame_equal(adata.obs, before_obs)
