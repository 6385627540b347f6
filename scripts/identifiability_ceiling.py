"""The mask F1 a simulated screen allows: best-subset fits of each single's shift with the simulator's own decoder.

    python scripts/identifiability_ceiling.py --seeds 0 --out runs/identifiability_ceiling [sim overrides]

An upper reference for `scripts/identifiability.py`, which scores a head that must learn how expression
responds to a latent shift. Here that response is given: the true decoder (`simulated_truth`), the true
dispersion and the true latent axes. For each single perturbation and every non-empty set of latent
dimensions, the shift restricted to that set is fitted by L-BFGS, and per penalty λ the set minimising
fit + λ · size is its estimated mask, scored as the head's masks are (`mask_recovery_f1`; the axes are
the truth's, so no matching). Two oracles:

- `known_state`: each cell's true invariant state z_inv is known; the fit is the negative-binomial
  negative log-likelihood of the single's cells. What the counts allow at all.
- `mean_profile`: z_inv is not known; the single's mean log-normalized profile is fitted, the model's
  mean taken over draws of z_inv from N(0, I), each gene weighted by the cells' standard error. What a
  method that sees condition means (as the head's singles' misfit does) could reach with a perfect decoder.

Writes `ceiling.json` (F1, missed and false entries per oracle, seed and λ) and prints a Markdown table.
The simulated screen is `configs/synthetic_identifiability.yaml`'s; `key=value` arguments change fields
of its `SimulationConfig`. Each support is fitted for every single, so this costs minutes per seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from perturbedvae.data.synthetic import LEAKY_RELU_SLOPE, SimulatedTruth, SimulationConfig, simulate, simulated_truth
from perturbedvae.errors import ConfigError
from perturbedvae.evaluate.identifiability import mask_recovery_f1
from perturbedvae.model.likelihoods import NORMALIZATION_TARGET, negative_binomial_log_prob
from perturbedvae.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic_identifiability.yaml"
DEFAULT_PENALTIES = (1.0, 2.0, 5.0, 12.0, 30.0, 60.0, 100.0, 200.0, 400.0)
STATE_DRAWS = 200
"""Draws of z_inv from N(0, I) over which `mean_profile` averages the decoded profile."""
ORACLES = ("known_state", "mean_profile")


def supports(n_latent: int) -> torch.Tensor:
    """[2^K − 1, K] 0/1 rows: every non-empty set of latent dimensions."""
    rows = [subset for size in range(1, n_latent + 1) for subset in itertools.combinations(range(n_latent), size)]
    masks = torch.zeros(len(rows), n_latent, dtype=torch.float64)
    for row, subset in enumerate(rows):
        masks[row, list(subset)] = 1.0
    return masks


def log_fractions(truth: SimulatedTruth) -> Callable[[torch.Tensor], torch.Tensor]:
    """The simulator's decoder in torch (`SimulatedTruth.expression_fractions`, differentiable): latent [..., K] -> log fractions [..., genes]."""
    hidden_weights, hidden_bias, output_weights, baseline = (
        torch.from_numpy(array).double() for array in (truth.hidden_weights, truth.hidden_bias, truth.output_weights, truth.gene_baseline)
    )

    def decode(latent: torch.Tensor) -> torch.Tensor:
        pre_activation = latent @ hidden_weights + hidden_bias
        hidden = torch.where(pre_activation > 0, pre_activation, LEAKY_RELU_SLOPE * pre_activation)
        return torch.log_softmax(hidden @ output_weights + baseline, dim=-1)

    return decode


def fitted_losses(loss: Callable[[torch.Tensor], torch.Tensor], masks: torch.Tensor) -> np.ndarray:
    """[S] the smallest `loss` of shifts confined to each support row of `masks` (one L-BFGS over all supports at once)."""
    shifts = torch.zeros_like(masks, requires_grad=True)
    optimizer = torch.optim.LBFGS([shifts], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = loss(shifts * masks).sum()
        total.backward()
        return total

    optimizer.step(closure)
    with torch.no_grad():
        return loss(shifts * masks).numpy()


def known_state_loss(decode, counts: torch.Tensor, states: torch.Tensor, dispersion: float):
    """NB negative log-likelihood of one single's cells [C, genes] for shifts [S, K], states known."""
    library = counts.sum(dim=1, keepdim=True)
    inverse_dispersion = torch.tensor(dispersion, dtype=counts.dtype)

    def loss(shifts: torch.Tensor) -> torch.Tensor:
        mean = decode(states[None] + shifts[:, None]).exp() * library  # [S, C, genes]
        return -negative_binomial_log_prob(counts, mean, inverse_dispersion).sum(dim=(1, 2))

    return loss


def mean_profile_loss(decode, counts: torch.Tensor, state_draws: torch.Tensor):
    """Squared error of one single's mean log-normalized profile, per gene over its standard error, for shifts [S, K]."""
    profile = torch.log1p(counts / counts.sum(dim=1, keepdim=True) * NORMALIZATION_TARGET)
    observed = profile.mean(dim=0)
    precision = len(counts) / profile.var(dim=0).clamp_min(1e-3)

    def loss(shifts: torch.Tensor) -> torch.Tensor:
        modelled = torch.log1p(NORMALIZATION_TARGET * decode(state_draws[None] + shifts[:, None]).exp()).mean(dim=1)
        return 0.5 * ((modelled - observed) ** 2 * precision).sum(dim=-1)

    return loss


def ceiling_report(config: SimulationConfig, penalties: tuple[float, ...] = DEFAULT_PENALTIES) -> dict[str, dict[str, dict[str, float]]]:
    """{oracle: {λ: {mask_f1, missed, false}}} of one simulated screen (see the module docstring)."""
    adata, truth = simulate(config), simulated_truth(config)
    counts = torch.from_numpy(adata.X.toarray()).double()
    states = torch.from_numpy(adata.obsm["z_inv"]).double()
    conditions = adata.obs["condition"].astype(str).to_numpy()
    decode, masks = log_fractions(truth), supports(config.n_latent)
    state_draws = torch.randn(STATE_DRAWS, config.n_latent, generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64)
    losses = {oracle: np.zeros((len(truth.perturbations), len(masks))) for oracle in ORACLES}
    for index, gene in enumerate(tqdm(truth.perturbations, desc=f"seed {config.seed}: singles", leave=False, disable=None)):
        cells = conditions == gene
        losses["known_state"][index] = fitted_losses(known_state_loss(decode, counts[cells], states[cells], config.dispersion), masks)
        losses["mean_profile"][index] = fitted_losses(mean_profile_loss(decode, counts[cells], state_draws), masks)
    true_masks, identity = truth.masks > 0, np.arange(config.n_latent)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for oracle, table in losses.items():
        report[oracle] = {}
        for penalty in penalties:
            chosen = masks.numpy()[np.argmin(table + penalty * masks.sum(dim=1).numpy(), axis=1)] > 0
            report[oracle][str(penalty)] = {
                "mask_f1": mask_recovery_f1(true_masks, chosen.astype(float), identity),
                "missed": int((true_masks & ~chosen).sum()),
                "false": int((~true_masks & chosen).sum()),
            }
    return report


def markdown_table(reports: dict[int, dict[str, dict[str, dict[str, float]]]]) -> str:
    """One row per seed, oracle and λ: mask F1, missed and false entries."""
    lines = ["| seed | oracle | λ | mask F1 | missed | false |", "|---|---|---|---|---|---|"]
    for seed, report in reports.items():
        for oracle, by_penalty in report.items():
            for penalty, scores in by_penalty.items():
                lines.append(f"| {seed} | {oracle} | {penalty} | {scores['mask_f1']:.3f} | {scores['missed']} | {scores['false']} |")
    return "\n".join(lines)


def simulation_config(config_path: Path, overrides: list[str]) -> SimulationConfig:
    """The `SimulationConfig` of an experiment config's `data.synthetic`, with `key=value` field overrides."""
    try:
        synthetic = load_config(config_path).data.synthetic
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    if synthetic is None:
        raise SystemExit(f"error: {config_path} has no data.synthetic; the ceiling needs a simulated screen")
    values = dict(synthetic)
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in values or not value:
            raise SystemExit(f"error: {override!r} is not key=value with a SimulationConfig field ({', '.join(sorted(values))})")
        try:
            values[key] = type(values[key])(value)
        except ValueError:
            raise SystemExit(f"error: {override!r}: {value!r} is not a value of {key} ({type(values[key]).__name__})") from None
    try:
        return SimulationConfig(**values)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--penalties", type=float, nargs="+", default=list(DEFAULT_PENALTIES))
    parser.add_argument("--out", type=Path, default=Path("runs/identifiability_ceiling"))
    parser.add_argument("overrides", nargs="*", help="SimulationConfig fields, e.g. cells_per_condition=160")
    args = parser.parse_args(argv)
    base = simulation_config(args.config, args.overrides)
    reports = {seed: ceiling_report(replace(base, seed=seed), tuple(args.penalties)) for seed in args.seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceiling.json").write_text(json.dumps(reports, indent=2) + "\n")
    print(markdown_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
