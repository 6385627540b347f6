import pytest

from perturbedvae.data.conditions import CONTROL, ConditionSyntax, canonical_name, check_known_genes, genes_of
from perturbedvae.errors import ConditionError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("control", CONTROL),
        ("ctrl", CONTROL),
        ("Non-Targeting", CONTROL),
        ("A", "A"),
        ("A+ctrl", "A"),
        ("ctrl+A", "A"),
        ("B+A", "A+B"),
        ("A+B", "A+B"),
        (" C + A+B ", "A+B+C"),
    ],
)
def test_canonical_names_merge_conventions(text, expected):
    assert ConditionSyntax().canonical(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "A++B", "+A", "A+", "A+A", "A B+C", None, 3.0])
def test_malformed_conditions_raise(text):
    with pytest.raises(ConditionError):
        ConditionSyntax().parse(text)


def test_custom_delimiter_and_control_label():
    syntax = ConditionSyntax(control_labels=("NT",), delimiter="_")
    assert syntax.canonical("B_A") == "A+B"
    assert syntax.canonical("nt") == CONTROL
    assert syntax.canonical("ctrl") == "ctrl"  # not a control label in this syntax


def test_invalid_syntax_rejected():
    with pytest.raises(ConditionError):
        ConditionSyntax(delimiter="")
    with pytest.raises(ConditionError):
        ConditionSyntax(control_labels=())


def test_canonical_round_trip():
    assert genes_of(canonical_name(["B", "A"])) == ("A", "B")
    assert genes_of(CONTROL) == ()
    assert canonical_name([]) == CONTROL


def test_unknown_gene_lists_close_matches():
    with pytest.raises(ConditionError, match="KLF1"):
        check_known_genes(["KLF2"], ["KLF1", "MAPK1"])
    check_known_genes(["KLF1"], ["KLF1"])


def test_a_gene_that_differs_only_in_case_is_named():
    with pytest.raises(ConditionError, match=r"'klf1': did you mean KLF1\? \(only the case differs\)"):
        check_known_genes(["klf1"], ["KLF1", "MAPK1"])
    with pytest.raises(ConditionError, match=r"'Mapk1': did you mean MAPK1\?"):
        check_known_genes(["KLF1", "Mapk1"], ["KLF1", "MAPK1"])
