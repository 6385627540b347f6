"""Simulated perturbation screens whose sparse mechanism shifts are known.

Real screens never tell us which latent mechanisms a perturbation moves, so identifiability (does the
model recover the true sparse shifts up to permutation and scale?) can only be measured on data we
generate ourselves. The generative story is the one PerturbedVAE and SAMS-VAE assume, so a model that
works should recover it:

    z_inv ~ N(0, I)                                    invariant cell state
    shift(g) = m_g * e_g, m_gk ~ Bernoulli(mask_prob), e_gk ~ N(0, effect_scale^2)
    z = z_inv + sum of shift(g) over the perturbed genes g (+ an interaction term for combinations)
    counts ~ NB(library_size * softmax(decoder(z)), inverse dispersion)

With `composition="graph"` the latent nodes instead follow a linear structural causal model with a
random DAG A (A[i, j]: edge i -> j, i < j) whose interventions change mechanisms, the story of the
`mechanism` composition of the head: a condition S targets the nodes M_S = OR of its genes' masks,
shifts their noise by s_S = sum of m_g * e_g, and cuts their incoming edges, so

    u_j = s_j + (1 - M_j) * sum_i A[i, j] u_i        z = z_inv + u

A single's shift then also moves the nodes downstream of its targets, and a combination differs from
the sum of its singles wherever one gene's target sits downstream of the other's (its edge is cut).

The decoder is a fixed random one-hidden-layer MLP, so expression depends nonlinearly on the latent.
Each part of the truth (mechanisms, decoder, design, cells) draws from its own seeded stream, so e.g.
asking for more cells keeps the same masks, effects and decoder.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbedvae.checks import check_number
from perturbedvae.data.conditions import CONTROL, canonical_name
from perturbedvae.errors import ConfigError

LIBRARY_SIZE_LOG_SD = 0.3
"""Spread of log library sizes, about what droplet screens show after cell filtering."""

LEAKY_RELU_SLOPE = 0.2

COMPOSITIONS = ("additive", "graph")
"""How conditions combine their genes' shifts in the true latent space (see the module docstring)."""

GROUND_TRUTH_KEY = "ground_truth"
"""uns key of the simulated truth: perturbations, masks, effects, interactions and the config."""


@dataclass
class SimulationConfig:
    """Size and strength of a simulated screen.

    Attributes:
        n_genes: Measured genes; named `GENE000`, `GENE001`, ...
        n_latent: Dimensions of the true latent space.
        n_perturbations: Perturbed genes, the first `n_perturbations` measured genes.
        n_combinations: Distinct two-gene combinations, drawn from all pairs of perturbed genes.
        cells_per_condition: Cells of each single and each combination.
        n_control_cells: Unperturbed cells.
        mask_prob: Probability that a perturbation moves a latent dimension; every perturbation moves
            at least one, so 0 means exactly one.
        effect_scale: Standard deviation of a perturbation's shift along a dimension it moves.
        interaction_strength: Scale of a fixed sparse non-additive shift added to each combination;
            0 makes every combination exactly the sum of its singles in latent space (composition
            "additive"), or exactly the SCM's answer (composition "graph").
        composition: "additive" (shifts add) or "graph" (a latent SCM with interventions that cut
            the targets' incoming edges; see the module docstring).
        edge_prob: Probability of each edge i -> j (i < j) of the true DAG (composition "graph").
        edge_weight: Edge weights are ±U(0.5, 1.0) times this (composition "graph").
        decoder_hidden: Hidden units of the random nonlinear decoder.
        library_size_mean: Mean of the log-normal total counts per cell.
        dispersion: Negative-binomial inverse dispersion (larger is closer to Poisson).
        seed: Seed of every random draw.
    """

    n_genes: int = 200
    n_latent: int = 10
    n_perturbations: int = 12
    n_combinations: int = 20
    cells_per_condition: int = 50
    n_control_cells: int = 300
    mask_prob: float = 0.2
    effect_scale: float = 2.0
    interaction_strength: float = 0.0
    decoder_hidden: int = 64
    library_size_mean: float = 2000.0
    dispersion: float = 5.0
    composition: str = "additive"
    edge_prob: float = 0.3
    edge_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_genes", "n_latent", "n_perturbations", "cells_per_condition", "n_control_cells", "decoder_hidden"):
            check_number(name, getattr(self, name), low=1, integer=True)
        for name in ("n_combinations", "seed"):
            check_number(name, getattr(self, name), low=0, integer=True)
        for name in ("effect_scale", "library_size_mean", "dispersion", "edge_weight"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        check_number("interaction_strength", self.interaction_strength, low=0)
        for name in ("mask_prob", "edge_prob"):  # probabilities
            check_number(name, getattr(self, name), low=0, high=1)
        if self.composition not in COMPOSITIONS:
            raise ConfigError(f"composition must be one of {', '.join(COMPOSITIONS)}; got {self.composition!r}")
        if self.n_perturbations > self.n_genes:
            raise ConfigError(
                f"n_perturbations ({self.n_perturbations}) > n_genes ({self.n_genes}): perturbed genes are "
                "measured genes, so raise n_genes or lower n_perturbations"
            )
        n_pairs = self.n_perturbations * (self.n_perturbations - 1) // 2
        if self.n_combinations > n_pairs:
            raise ConfigError(
                f"n_combinations ({self.n_combinations}) > the {n_pairs} distinct pairs of "
                f"{self.n_perturbations} perturbed genes; lower n_combinations or raise n_perturbations"
            )


@dataclass
class SimulatedTruth:
    """The hidden truth: which genes move which latent dimensions, by how much, and the decoder."""

    genes: list[str]
    perturbations: list[str]
    masks: np.ndarray  # [P, K] int
    effects: np.ndarray  # [P, K] float, the shift along a dimension if masked in
    combinations: list[tuple[int, int]]
    interaction_shifts: np.ndarray  # [C, K] added to a combination on top of its composed shift
    graph: np.ndarray  # [K, K] strictly upper-triangular DAG of composition "graph"; zeros for "additive"
    hidden_weights: np.ndarray  # [K, H]
    hidden_bias: np.ndarray  # [H]
    output_weights: np.ndarray  # [H, G]
    gene_baseline: np.ndarray  # [G] log relative abundance

    @property
    def noise_shifts(self) -> np.ndarray:
        """[P, K] m_g * e_g: what each gene does at its targets, before any propagation."""
        return self.masks * self.effects

    def combination_name(self, index: int) -> str:
        first, second = self.combinations[index]
        return canonical_name([self.perturbations[first], self.perturbations[second]])

    def composed_shift(self, genes: tuple[int, ...]) -> np.ndarray:
        """Latent shift u of the condition perturbing `genes`: the SCM solved under their interventions."""
        shift = self.noise_shifts[list(genes)].sum(axis=0)
        targets = self.masks[list(genes)].max(axis=0)
        response = np.zeros_like(shift)
        for node in range(len(shift)):  # nodes are in topological order (the graph is upper-triangular)
            response[node] = shift[node] + (1 - targets[node]) * self.graph[:node, node] @ response[:node]
        return response

    def condition_shifts(self) -> dict[str, np.ndarray]:
        """Latent shift of every condition: control, singles, then combinations."""
        latent = self.masks.shape[1]
        shifts = {CONTROL: np.zeros(latent)}
        shifts.update((name, self.composed_shift((index,))) for index, name in enumerate(self.perturbations))
        for index, pair in enumerate(self.combinations):
            shifts[self.combination_name(index)] = self.composed_shift(pair) + self.interaction_shifts[index]
        return shifts

    def non_additive_shifts(self, shifts: dict[str, np.ndarray]) -> np.ndarray:
        """[C, K] each combination's shift minus the sum of its singles' shifts, from `condition_shifts()`."""
        return np.array([
            shifts[self.combination_name(index)] - shifts[self.perturbations[first]] - shifts[self.perturbations[second]]
            for index, (first, second) in enumerate(self.combinations)
        ]).reshape(len(self.combinations), self.masks.shape[1])

    def expression_fractions(self, latent: np.ndarray) -> np.ndarray:
        """Decode latent states [N, K] into per-gene expression fractions [N, G] (rows sum to 1)."""
        pre_activation = latent @ self.hidden_weights + self.hidden_bias
        hidden = np.where(pre_activation > 0, pre_activation, LEAKY_RELU_SLOPE * pre_activation)
        logits = hidden @ self.output_weights + self.gene_baseline
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)


def _draw_mechanisms(config: SimulationConfig, streams: list[np.random.Generator]) -> SimulatedTruth:
    mechanism_rng, decoder_rng, design_rng = streams
    latent, perturbed = config.n_latent, config.n_perturbations
    width = max(3, len(str(config.n_genes - 1)))
    genes = [f"GENE{index:0{width}d}" for index in range(config.n_genes)]

    masks = (mechanism_rng.random((perturbed, latent)) < config.mask_prob).astype(np.int64)
    forced_dims = mechanism_rng.integers(latent, size=perturbed)
    inactive = masks.sum(axis=1) == 0
    masks[inactive, forced_dims[inactive]] = 1
    effects = mechanism_rng.normal(0.0, config.effect_scale, size=(perturbed, latent))

    pairs = list(itertools.combinations(range(perturbed), 2))
    chosen = np.sort(design_rng.choice(len(pairs), size=config.n_combinations, replace=False))
    interaction_masks = design_rng.random((config.n_combinations, latent)) < config.mask_prob
    interaction_draws = design_rng.normal(0.0, config.effect_scale, size=(config.n_combinations, latent))

    graph = np.zeros((latent, latent))
    if config.composition == "graph":
        edges = np.triu(design_rng.random((latent, latent)) < config.edge_prob, k=1)
        weights = design_rng.uniform(0.5, 1.0, size=(latent, latent)) * design_rng.choice([-1.0, 1.0], size=(latent, latent))
        graph = edges * weights * config.edge_weight

    hidden = config.decoder_hidden
    return SimulatedTruth(
        genes=genes,
        perturbations=genes[:perturbed],
        masks=masks,
        effects=effects,
        combinations=[pairs[index] for index in chosen],
        interaction_shifts=config.interaction_strength * interaction_masks * interaction_draws,
        graph=graph,
        hidden_weights=decoder_rng.normal(0.0, 1.0 / np.sqrt(latent), size=(latent, hidden)),
        hidden_bias=decoder_rng.normal(0.0, 0.5, size=hidden),
        output_weights=decoder_rng.normal(0.0, 1.0 / np.sqrt(hidden), size=(hidden, config.n_genes)),
        gene_baseline=decoder_rng.normal(0.0, 1.0, size=config.n_genes),
    )


def _negative_binomial(rng: np.random.Generator, mean: np.ndarray, inverse_dispersion: float) -> np.ndarray:
    """Gamma-Poisson draw: mean `mean`, variance mean + mean^2 / inverse_dispersion."""
    rates = rng.gamma(shape=inverse_dispersion, scale=mean / inverse_dispersion)
    return rng.poisson(rates)


def simulated_truth(config: SimulationConfig) -> SimulatedTruth:
    """The hidden truth `simulate(config)` draws its cells from: masks, effects, design and the decoder.

    The same seed gives the same truth, so oracles (`scripts/identifiability_ceiling.py`) can use the
    decoder that `uns['ground_truth']` does not store.
    """
    mechanism_seed, decoder_seed, design_seed, _ = _seed_streams(config)
    return _draw_mechanisms(config, [np.random.default_rng(seed) for seed in (mechanism_seed, decoder_seed, design_seed)])


def _seed_streams(config: SimulationConfig) -> list[np.random.SeedSequence]:
    """The simulation's independent seed streams, in order: mechanisms, decoder, design, cells."""
    return np.random.SeedSequence(config.seed).spawn(4)


def simulate(config: SimulationConfig) -> ad.AnnData:
    """Simulate a screen of controls, singles and two-gene combinations with known sparse shifts.

    Returns:
        AnnData with raw counts in `X` (sparse float32), `obs['condition']` in PerturBench spelling
        (`control`, `GENE003`, `GENE003+GENE007`), `obsm['z_inv']` the invariant latent state,
        `obsm['z']` the perturbed latent the counts were decoded from, `var['perturbed']`, and
        `uns['ground_truth']` with `perturbations` (names), `masks` and `effects` ([P, K]; the true
        noise shift of perturbation p is masks[p] * effects[p]; with composition "additive" that is
        its latent shift), `graph` ([K, K] true DAG, zeros for "additive"), `interactions`
        (`combinations` names and their non-additive `shifts` [C, K]: combination minus the sum of its
        singles in latent space) and `config`.
    """
    if not isinstance(config, SimulationConfig):
        raise ConfigError(f"simulate expects a SimulationConfig, got {type(config).__name__}")
    truth = simulated_truth(config)
    cell_rng = np.random.default_rng(_seed_streams(config)[3])

    shifts = truth.condition_shifts()
    cell_counts = {name: config.cells_per_condition for name in shifts}
    cell_counts[CONTROL] = config.n_control_cells
    labels = np.concatenate([np.repeat(name, count) for name, count in cell_counts.items()])
    shift_of_cell = np.concatenate([np.tile(shifts[name], (count, 1)) for name, count in cell_counts.items()])

    z_inv = cell_rng.standard_normal((len(labels), config.n_latent))
    z = z_inv + shift_of_cell
    library_sizes = cell_rng.lognormal(
        np.log(config.library_size_mean) - LIBRARY_SIZE_LOG_SD**2 / 2, LIBRARY_SIZE_LOG_SD, size=len(labels)
    )
    mean_counts = library_sizes[:, None] * truth.expression_fractions(z)
    counts = _negative_binomial(cell_rng, mean_counts, config.dispersion)

    obs = pd.DataFrame({"condition": pd.Categorical(labels, categories=list(cell_counts))})
    obs.index = [f"cell{index:06d}" for index in range(len(labels))]
    var = pd.DataFrame({"perturbed": np.isin(truth.genes, truth.perturbations)}, index=truth.genes)
    adata = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
    adata.obsm["z_inv"] = z_inv.astype(np.float32)
    adata.obsm["z"] = z.astype(np.float32)
    adata.uns[GROUND_TRUTH_KEY] = {
        "perturbations": list(truth.perturbations),
        "masks": truth.masks,
        "effects": truth.effects,
        "graph": truth.graph,
        "interactions": {
            "combinations": [truth.combination_name(index) for index in range(len(truth.combinations))],
            "shifts": truth.non_additive_shifts(shifts),
        },
        "config": asdict(config),
    }
    return adata


def simulate_to_file(out_path: str | Path, *, overwrite: bool = False, **config_overrides: object) -> Path:
    """Simulate a screen and write it as `.h5ad`; the CLI's `simulate` command.

    Args:
        out_path: Destination `.h5ad` file; missing parent folders are created.
        overwrite: Replace an existing file instead of refusing.
        **config_overrides: Fields of `SimulationConfig`, e.g. `n_genes=500, seed=3`.

    Raises:
        ConfigError: for an unknown or invalid config field, a path that is not `.h5ad`, or an existing
            file without `overwrite=True`.
    """
    known = {field.name for field in fields(SimulationConfig)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ConfigError(f"unknown simulation setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    path = Path(out_path)
    if path.suffix != ".h5ad":
        raise ConfigError(f"{path}: the output must be an .h5ad file, e.g. {path.with_suffix('.h5ad')}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; choose another path or pass overwrite=True (CLI: --overwrite)")
    adata = simulate(SimulationConfig(**config_overrides))
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path
