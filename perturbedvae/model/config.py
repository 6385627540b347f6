"""Configuration of the PerturbedVAE head: every architectural choice in one JSON-serialisable dataclass.

Like a HuggingFace `PretrainedConfig`, the config alone is enough to rebuild the module's shapes, so a
checkpoint directory is `config.json` + weights. Values are validated on construction, so a bad value
fails where it is written (a YAML file, a CLI flag) and not deep inside a training step.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perturbedvae.checks import check_number
from perturbedvae.errors import ConfigError, did_you_mean
from perturbedvae.model.likelihoods import LIKELIHOOD_HEADS
from perturbedvae.model.masks import EVAL_MASK_MODES, MASK_FAMILIES

ALIGNMENTS = ("mmd", "mmd_per_condition", "none")
COMPOSITIONS = ("latent_sum", "mechanism")
INITIAL_ROTATIONS = ("none", "varimax")
INITIAL_EFFECTS = ("singles", "latent_shifts")
SATURATIONS = ("genes", "nodes", "both")


@dataclass
class PerturbedVAEConfig:
    """Shapes, priors and default loss weights of a PerturbedVAE head.

    Attributes:
        n_input: Width of the cell representation `h` (expression genes, or an encoder's hidden size).
        n_genes: Number of genes the decoder reconstructs and predicts.
        n_perturbations: Size of the perturbation vocabulary (columns of the multi-hot `perturbations`).
        n_latent: K, the latent width shared by z_inv, the effect vectors and the masks.
        n_hidden, n_layers, dropout: Size of every MLP (encoder, decoder, gene-feature network).
        likelihood: "gaussian" (log-normalized targets, learned per-gene variance) or "nb" (raw counts,
            library-size aware negative binomial with per-gene inverse dispersion).
        mask_prior_prob: Prior keep-probability of each mask entry; the sparsity penalty pulls the learned
            keep-probabilities towards it, so it sets how many latent dimensions a gene may touch.
        mask_temperature: Temperature of the relaxed masks (lower = closer to binary samples).
        causal_layer: Mix the perturbation shift through a learned sparse DAG (see `causal.py`).
        gene_feature_dim: Width of per-gene perturbation features; when set, effects and mask logits are
            a function of the features, so genes never perturbed in training get an effect.
        alignment: "mmd" aligns z_inv of perturbed cells (pooled) with controls; "mmd_per_condition" aligns
            each condition's cells with the controls (see `alignment.condition_alignment_penalty`);
            "none" switches it off.
        mask_kind: "hard_concrete" (Louizos et al. 2018) or "gumbel" (straight-through relaxed Bernoulli).
        eval_mask: Deterministic mask used outside training: "threshold" (1 where keep-probability > 0.5)
            or "expected" (the keep-probability itself, i.e. the expected effect).
        pairwise_interaction: Add a learned pairwise term for cells with two or more perturbed genes
            (zero for singles and controls, zero at initialisation).
        effect_init_std: Standard deviation of the initial effect table (no gene features). Training
            samples z_inv from a posterior close to N(0, I), so the decoder sees each perturbation shift
            blurred by unit noise per latent dimension. Small (0.01, default): effects grow from zero
            where the data ask, which keeps them sparse and aligned with the true mechanisms (simulated
            identifiability: MCC 0.56 vs 0.18 chance, where 5.0 stays at chance because the decoder
            adopts the dense random codes). Large (5.0): shifts separable from the first step; on
            Norman the 0.01 head predicted the same profile for every condition (Adam needs thousands
            of lr-sized steps to grow them), so `configs/norman_subset.yaml` uses 5.0.
        composition: How perturbations act. "latent_sum" (the first design): z_p = causal(Σ m ⊙ e + pairwise)
            added to z_inv and decoded by the shared nonlinear decoder. "mechanism": interventions change
            the mechanisms of a latent SCM, decoded by sparse gene programs with a per-gene saturation and
            anchored on measured singles (see `mechanism.py`); the change adds to the decoder's output.
        reference_controls: "mechanism": control cells sampled into every batch; their z_inv, decoded and
            shifted by each condition of the batch, must match that condition's mean (counterfactual
            alignment, gaussian likelihood) and they join the MMD's control group.
        counterfactual_weight: Weight of that counterfactual term.
        saturation_init: "mechanism": initial κ of the per-gene saturation c_g = κ · (largest single change
            of gene g); κ > 1 is learned. 1.5 means two equal singles of that size add to 1.3× one, not 2×;
            the training combinations of a Norman fold move κ little (1.5 -> 1.6–1.7, 3.0 -> 3.4), so this
            value is in effect a prior (LODO seed 1: mse_de 0.0041 at 1.5, 0.0045 at 3.0).
        saturation: "mechanism": where responses saturate. "genes": each gene's change, c_g · tanh(v / c_g)
            (any two perturbations moving a gene the same way add less than their sum). "nodes": each
            latent node's response, c_n · tanh(u_n / c_n) with c_n = κ · (largest initial single response
            on node n), before the linear programs: only perturbations acting on the same node saturate.
            "both": the node saturation, then the gene saturation of the programs' output.
        initial_rotation: "mechanism": start the effects at the SVD fit of the measured singles as it is
            ("none") or turned by a varimax rotation towards few nodes per gene ("varimax"). Varimax raised
            simulator MCC from 0.70 to 0.78 but cost Norman LODO 0.0003 mse_de (0.0041 vs 0.0038).
        initial_effects: "mechanism": what the start is fitted to. "singles": the measured singles'
            gene-level changes (a rank-K SVD). "latent_shifts": each single's shift of its cells in the
            latent of a VAE fitted to the training cells first, whitened by the controls' spread
            (`model/shift_vae.py`), with the programs started at the least-squares fit of the singles'
            changes on those effects. Needs h before training (PCA or cached frozen embeddings).
            Simulator (8 seeds): MCC 0.922 -> 0.940, mask F1 0.784 -> 0.823; Norman LODO (seeds 1-3)
            lost: mse_de 0.0038 -> 0.0047, so the Norman configs keep "singles".
        curved_programs: "mechanism": give each latent node a quadratic gene program Q beside its linear
            one W, so a node's change is u W + u² Q (Q starts at 0). Simulator (4 seeds): MCC 0.788 -> 0.845,
            mask F1 0.605 -> 0.684.
        standardize_inputs: Centre and scale each dimension of h by the training cells' mean and standard
            deviation before the z_inv encoder (set by `initialize_inputs_from_data`, kept in the checkpoint).
            Frozen encoder embeddings need it: the mean-pooled Geneformer-format embeddings of
            `configs/norman_geneformer_frozen.yaml` vary across cells by 0.03-0.17 per dimension around
            means of up to 2.4, so the encoder's first layer sees almost the same row for every cell.
            Norman LODO (3 seeds): frozen embeddings condition probe 1.9x -> 1.3x chance, alignment p at
            initialisation 0.084 -> 0.058, accuracy within noise (pearson_delta_de 0.940 -> 0.944, mse_de
            0.0039 -> 0.0040); on PCA inputs (centred already) the probe fell to chance but
            pearson_delta_de lost 0.006 (0.951 -> 0.945), so configs/norman_subset.yaml keeps it off.
        effect_members: "mechanism": how many independent mechanism models (effects, masks, graph, programs,
            saturation) share the z_inv encoder and decoder. Each member is fitted on its own loss terms
            (the loss averages them) and a prediction takes the members' mean change, so an unseen
            combination gets the mean of several fits' departures from additivity. With 3-4 training
            doubles per fold, one fit's departure depends on where training happened to place the singles
            in the latent nodes: the kept Norman head's KLF1+MAP2K6 mse_de ranged 0.0009-0.0066 over
            training seeds 1-9. Views (masks, effects, graph, programs) are member 0's.
        covariate_inputs: Condition the z_inv encoder and the decoder on each cell's covariate level
            (`data.covariate_keys`: cell line, stimulation), a one-hot appended to their inputs as scVI does
            with batch, so z_inv need not carry the level and the decoder can map one z_p to a different
            change per level. `composition: latent_sum` only.
        n_covariate_levels: Width of that one-hot (levels in sorted order); derived from the data.
        kl_weight, alignment_weight, sparsity_weight, dag_weight: Default loss weights; a trainer may
            pass warmed-up values per step instead.
    """

    n_input: int
    n_genes: int
    n_perturbations: int
    n_latent: int = 32
    n_hidden: int = 256
    n_layers: int = 2
    dropout: float = 0.1
    likelihood: str = "gaussian"
    mask_prior_prob: float = 0.1
    mask_temperature: float = 0.5
    causal_layer: bool = True
    gene_feature_dim: int | None = None
    alignment: str = "mmd"
    kl_weight: float = 1.0
    alignment_weight: float = 1.0
    sparsity_weight: float = 1.0
    dag_weight: float = 1e-3
    mask_kind: str = "hard_concrete"
    eval_mask: str = "threshold"
    pairwise_interaction: bool = True
    effect_init_std: float = 0.01
    composition: str = "latent_sum"
    reference_controls: int = 64
    counterfactual_weight: float = 1.0
    saturation_init: float = 1.5
    saturation: str = "genes"
    initial_rotation: str = "none"
    initial_effects: str = "singles"
    curved_programs: bool = False
    standardize_inputs: bool = False
    effect_members: int = 1
    covariate_inputs: bool = False
    n_covariate_levels: int = 0

    def __post_init__(self) -> None:
        for name in ("n_input", "n_genes", "n_perturbations", "n_latent", "n_hidden", "n_layers"):
            check_number(name, getattr(self, name), low=1, integer=True)
        if self.gene_feature_dim is not None:
            check_number("gene_feature_dim", self.gene_feature_dim, low=1, integer=True)
        for name in ("causal_layer", "pairwise_interaction", "covariate_inputs", "curved_programs", "standardize_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_choice("likelihood", self.likelihood, tuple(LIKELIHOOD_HEADS))
        _check_choice("alignment", self.alignment, ALIGNMENTS)
        _check_choice("composition", self.composition, COMPOSITIONS)
        _check_choice("initial_rotation", self.initial_rotation, INITIAL_ROTATIONS)
        _check_choice("initial_effects", self.initial_effects, INITIAL_EFFECTS)
        _check_choice("saturation", self.saturation, SATURATIONS)
        if self.composition == "mechanism" and self.gene_feature_dim is not None:
            raise ConfigError("composition mechanism has no gene-feature network yet; use latent_sum with gene_feature_dim")
        check_number("n_covariate_levels", self.n_covariate_levels, low=0, integer=True)
        check_number("effect_members", self.effect_members, low=1, integer=True)
        if self.effect_members > 1 and self.composition != "mechanism":
            raise ConfigError("effect_members > 1 needs composition mechanism (latent_sum's effects feed the decoder's input, "
                              "so its members could not share one decoder pass)")
        if self.covariate_inputs and self.composition == "mechanism":
            raise ConfigError("covariate_inputs needs composition latent_sum (the mechanism design decodes no covariate)")
        if self.curved_programs and self.composition != "mechanism":
            raise ConfigError("curved_programs needs composition mechanism (latent_sum decodes through its MLP, not through gene programs)")
        if self.initial_effects != "singles" and self.composition != "mechanism":
            raise ConfigError("initial_effects needs composition mechanism (latent_sum's effects start from effect_init_std)")
        if isinstance(self.reference_controls, bool) or not isinstance(self.reference_controls, int) or self.reference_controls < 0:
            raise ConfigError(f"reference_controls must be a non-negative integer, got {self.reference_controls!r}")
        _check_choice("mask_kind", self.mask_kind, tuple(MASK_FAMILIES))
        _check_choice("eval_mask", self.eval_mask, EVAL_MASK_MODES)
        check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_number("mask_prior_prob", self.mask_prior_prob, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("mask_temperature", self.mask_temperature, low=0.0, low_open=True)
        check_number("effect_init_std", self.effect_init_std, low=0.0, low_open=True)
        check_number("saturation_init", self.saturation_init, low=1.0, low_open=True)
        for name in ("kl_weight", "alignment_weight", "sparsity_weight", "dag_weight", "counterfactual_weight"):
            check_number(name, getattr(self, name), low=0.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PerturbedVAEConfig:
        """Build a config from a mapping; unknown or missing required keys are a ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"a PerturbedVAE config must be a mapping, got {type(values).__name__}")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            hints = [f"{key!r}{did_you_mean(key, sorted(fields), listing=None)}" for key in unknown]
            raise ConfigError("unknown PerturbedVAE config key(s): " + "; ".join(hints))
        missing = [
            name
            for name, field in fields.items()
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            and name not in values
        ]
        if missing:
            raise ConfigError(f"PerturbedVAE config is missing required key(s): {', '.join(missing)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the config as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PerturbedVAEConfig:
        """Read a config written by `save`; an unreadable or malformed file is a ConfigError."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} does not exist; pass the config.json of a saved head") from error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"config file {path} is not valid JSON ({error}); re-save the config") from error
        return cls.from_dict(values)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
