"""The PerturbedVAE head as pure math: inference, perturbation effect, generative model and loss.

`composition: latent_sum` (the first design):

    z_inv ~ q(z_inv | h) = N(μ(h), σ²(h))              invariant cell state, KL to N(0, I)
    z_p   = causal(Σ_g p_g m_g ⊙ e_g + pairwise)       perturbation latent (see effects.py, causal.py)
    x     ~ p(x | z_inv + z_p)                         Gaussian or negative binomial decoder

With `covariate_inputs`, the encoder reads [h, c] and the decoder [z_inv + z_p, c], c the one-hot of the
cell's covariate level (cell line, stimulation), so one perturbation latent can decode to level-specific
changes and z_inv need not encode the level.

`composition: mechanism`: x ~ p(x | decoder(z_inv) + shift(S)), the change of condition S from a latent
SCM whose interventions change mechanisms, anchored on measured singles (see mechanism.py); its loss
adds a counterfactual term on the reference control cells of the batch (`control_h`, `control_x`).

The loss is the per-cell negative log-likelihood summed over genes plus weighted penalties: the KL of
z_inv, the MMD alignment of perturbed and control z_inv (alignment.py), the masks' KL to their sparse
prior and the L1 norm of the causal DAG. Prediction is counterfactual: control cells keep their z_inv
(posterior mean) and receive a condition's z_p, computed with deterministic masks.

Training mode samples z_inv and relaxed masks; evaluation mode (`module.eval()`) uses the posterior
mean and deterministic masks, so a validation loss and every prediction are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from perturbedvae.errors import ConfigError, DataError
from perturbedvae.model.alignment import alignment_penalty, condition_alignment_penalty
from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.model.effects import PerturbationEffects, PerturbationOutput
from perturbedvae.model.layers import POSTERIOR_LOG_VARIANCE_RANGE, mlp, standard_normal_kl
from perturbedvae.model.likelihoods import LIKELIHOOD_HEADS, GenerativeOutput
from perturbedvae.model.mechanism import MechanismEffects, MechanismEnsemble, MemberOutputs
from perturbedvae.model.rows import group_sums, unique_rows

_MIN_INPUT_SCALE = 1e-6
"""Floor of `standardize_inputs`' per-dimension scale (a constant dimension then passes as 0, not NaN)."""


@dataclass
class LossWeights:
    """Multipliers of the penalty terms; the trainer passes warmed-up values per step."""

    kl: float = 1.0
    alignment: float = 1.0
    sparsity: float = 1.0
    dag: float = 1e-3

    @classmethod
    def from_config(cls, config: PerturbedVAEConfig) -> LossWeights:
        return cls(
            kl=config.kl_weight,
            alignment=config.alignment_weight,
            sparsity=config.sparsity_weight,
            dag=config.dag_weight,
        )


@dataclass
class LossOutput:
    """The scalar to backpropagate and its unweighted, detached parts (for logging)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class InferenceOutput:
    """q(z_inv | h): a sample (the mean outside training) and the posterior parameters, each [B, K]."""

    z: torch.Tensor
    qz_mean: torch.Tensor
    qz_logvar: torch.Tensor


class PerturbedVAEModule(nn.Module):
    """Encoder of h, perturbation effects, and decoder of z_inv + z_p to expression."""

    def __init__(self, config: PerturbedVAEConfig, gene_features: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        if config.covariate_inputs and config.n_covariate_levels < 1:
            raise ConfigError("model.covariate_inputs needs the covariate levels of the data: set data.covariate_keys "
                              "(the transfer task, perturbedvae transfer)")
        self.n_covariates = config.n_covariate_levels if config.covariate_inputs else 0
        if config.standardize_inputs:  # identity until `initialize_inputs_from_data`
            self.register_buffer("input_mean", torch.zeros(config.n_input))
            self.register_buffer("input_scale", torch.ones(config.n_input))
        self.encoder = mlp(config.n_input + self.n_covariates, config.n_hidden, config.n_layers, config.dropout)
        self.qz_mean = nn.Linear(config.n_hidden, config.n_latent)
        self.qz_logvar = nn.Linear(config.n_hidden, config.n_latent)
        if config.composition == "mechanism":
            if gene_features is not None:
                raise ConfigError("composition mechanism takes no gene_features")
            # One member keeps the state-dict keys of heads saved before ensembles existed.
            self.effects = MechanismEffects(config) if config.effect_members == 1 else MechanismEnsemble(config)
        else:
            self.effects = PerturbationEffects(config, gene_features)
        self.decoder = mlp(config.n_latent + self.n_covariates, config.n_hidden, config.n_layers, config.dropout)
        self.likelihood_head = LIKELIHOOD_HEADS[config.likelihood](config.n_hidden, config.n_genes)
        if config.composition == "mechanism":
            self.register_buffer("control_offset", torch.zeros(config.n_genes))

    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Set the decoder's output biases (and Gaussian variances) from training targets x [cells, n_genes].

        Optional, before training: the head then starts at the data's per-gene scale and its first
        steps go into the perturbation effects (log-normalized x for gaussian, counts for nb).
        """
        _check_width("x", x, self.config.n_genes, "n_genes")
        self.likelihood_head.initialize_from_data(x.float())

    @torch.no_grad()
    def initialize_inputs_from_data(self, h: torch.Tensor) -> None:
        """`standardize_inputs`: take the per-dimension mean and standard deviation of training cells' h [cells, n_input]."""
        if not self.config.standardize_inputs:
            raise ConfigError("initialize_inputs_from_data needs model.standardize_inputs: true")
        _check_width("h", h, self.config.n_input, "n_input")
        h = h.float()
        self.input_mean.copy_(h.mean(dim=0))
        self.input_scale.copy_(h.std(dim=0).clamp_min(_MIN_INPUT_SCALE))

    def with_covariates(self, inputs: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
        """`inputs` [B, D] with the cells' one-hot covariate levels [B, n_covariate_levels] appended (scVI's
        batch conditioning); unchanged for a head without covariate inputs."""
        if not self.n_covariates:
            return inputs
        if covariates is None:
            raise DataError("this head conditions on covariates (model.covariate_inputs): pass 'covariates', the one-hot "
                            f"[cells, {self.n_covariates}] of each cell's covariate level")
        _check_width("covariates", covariates, self.n_covariates, "n_covariate_levels")
        return torch.cat([inputs, covariates.to(inputs.dtype)], dim=-1)

    def inference(self, h: torch.Tensor, covariates: torch.Tensor | None = None) -> InferenceOutput:
        """q(z_inv | h[, covariates]); samples z in training and returns the mean otherwise (deterministic evaluation)."""
        if self.config.standardize_inputs:
            h = (h - self.input_mean) / self.input_scale
        hidden = self.encoder(self.with_covariates(h, covariates))
        mean = self.qz_mean(hidden)
        logvar = self.qz_logvar(hidden).clamp(*POSTERIOR_LOG_VARIANCE_RANGE)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if self.training else mean
        return InferenceOutput(z=z, qz_mean=mean, qz_logvar=logvar)

    def perturbation_effect(self, perturbations: torch.Tensor, deterministic: bool | None = None) -> PerturbationOutput:
        """z_p of multi-hot rows [B, P]; masks are sampled in training unless `deterministic` says otherwise."""
        _check_width("perturbations", perturbations, self.config.n_perturbations, "n_perturbations")
        return self.effects(perturbations, deterministic=not self.training if deterministic is None else deterministic)

    @property
    def uses_mechanisms(self) -> bool:
        return self.config.composition == "mechanism"

    def generative(self, z: torch.Tensor, library_size: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   covariates: torch.Tensor | None = None) -> GenerativeOutput:
        """Likelihood parameters of expression given the latent z (z_inv + z_p, or z_inv with an output `offset`)."""
        return self.likelihood_head(self.decoder(self.with_covariates(z, covariates)), library_size, offset)

    @torch.no_grad()
    def calibrate_controls(self, h_control: torch.Tensor, x_control: torch.Tensor) -> None:
        """Mechanism design, Gaussian: set the output offset that makes decoded controls average their observed mean.

        A prediction is the control cells decoded plus a condition's change, so any error of the decoded
        control mean lands in every prediction (on Norman 0.0003–0.0006 mse_de, a tenth of the additive
        baseline's whole error). The measured control mean is known, as additive baselines use it.
        Applied to predictions only; training never sees it.
        """
        if not self.uses_mechanisms or self.config.likelihood != "gaussian":
            return
        was_training = self.training
        self.eval()
        try:
            decoded = self.likelihood_head(self.decoder(self.inference(h_control).qz_mean)).mean.mean(dim=0)
        finally:
            self.train(was_training)
        self.control_offset.copy_(x_control.float().mean(dim=0) - decoded.float())

    def set_single_priors(self, changes: torch.Tensor, measured: torch.Tensor, initialize: bool = True,
                          initial_effects: torch.Tensor | None = None) -> None:
        """Measured single-gene changes the "mechanism" composition anchors on (see `MechanismEffects`)."""
        if not self.uses_mechanisms:
            raise ConfigError("single priors are used by composition mechanism only")
        self.effects.set_single_priors(changes, measured, initialize, initial_effects)

    def loss(self, batch: dict[str, torch.Tensor], weights: LossWeights | None = None) -> LossOutput:
        """Weighted negative ELBO-style objective of a batch (keys: h, x, perturbations, library_size, covariates, x_nonzero).

        `x_nonzero` (optional): flat positions of x's non-zero entries, which the data module reads off sparse
        rows so that the negative-binomial likelihood need not search the dense x for them.
        """
        weights = weights or LossWeights.from_config(self.config)
        h, x, perturbations = _required(batch, "h"), _required(batch, "x"), _required(batch, "perturbations")
        _check_width("h", h, self.config.n_input, "n_input")
        _check_width("x", x, self.config.n_genes, "n_genes")
        _check_width("perturbations", perturbations, self.config.n_perturbations, "n_perturbations")
        if not h.shape[0] == x.shape[0] == perturbations.shape[0]:
            raise DataError(
                f"batch tensors disagree on the number of cells: h {h.shape[0]}, x {x.shape[0]}, "
                f"perturbations {perturbations.shape[0]}"
            )
        library_size = batch.get("library_size")
        if self.config.likelihood == "nb" and library_size is None:
            library_size = x.sum(dim=1)

        covariates = batch.get("covariates")
        inference, reference_mean = self._encode_with_reference(h, batch.get("control_h"), covariates)
        if self.uses_mechanisms:
            members = self.effects.member_outputs(perturbations, deterministic=not self.training)
        else:
            effect = self.effects(perturbations, deterministic=not self.training)  # width checked above
        is_control = perturbations.ne(0).sum(dim=1) == 0
        # Each cell's condition as an index, for the per-condition alignment and the counterfactual term: the
        # mechanism effects group the batch by condition already.
        condition = None
        if self.uses_mechanisms:
            condition = members.condition
        elif self.config.alignment == "mmd_per_condition":
            condition = unique_rows(perturbations)[1]
        qz_mean = inference.qz_mean
        if self.uses_mechanisms:
            reconstruction, counterfactual, qz_mean, is_control = self._mechanism_terms(
                batch, inference, reference_mean, members, library_size, is_control, condition
            )
        else:
            generative = self.generative(inference.z + effect.z_p, library_size, covariates=covariates)
            reconstruction = -generative.cell_log_prob(x, batch.get("x_nonzero")).mean()
            counterfactual = reconstruction.new_zeros(())

        # Penalties in float32 even under mixed-precision autocast: they are sums of many small terms.
        qz_mean, qz_logvar = qz_mean.float(), inference.qz_logvar.float()
        kl = standard_normal_kl(inference.qz_mean.float(), qz_logvar).sum(dim=-1).mean()
        if self.config.alignment == "mmd":
            alignment = alignment_penalty(qz_mean, is_control=is_control, adaptive=self.uses_mechanisms)
        elif self.config.alignment == "mmd_per_condition":
            condition = torch.cat([condition, condition.new_zeros(len(qz_mean) - len(condition))])  # + reference controls
            alignment = condition_alignment_penalty(qz_mean, is_control, condition)
        else:
            alignment = kl.new_zeros(())
        sparsity = members.sparsity.mean() if self.uses_mechanisms else effect.sparsity
        dag = self.effects.dag_penalty()
        total = (
            reconstruction
            + self.config.counterfactual_weight * counterfactual
            + weights.kl * kl
            + weights.alignment * alignment
            + weights.sparsity * sparsity
            + weights.dag * dag
        )
        parts = {
            "reconstruction": reconstruction,
            "counterfactual": counterfactual,
            "kl": kl,
            "alignment": alignment,
            "sparsity": sparsity,
            "dag": dag,
        }
        return LossOutput(loss=total, parts={name: value.detach() for name, value in parts.items()})

    def _encode_with_reference(self, h: torch.Tensor, control_h: torch.Tensor | None, covariates: torch.Tensor | None):
        """q(z_inv | h) of the batch, and the posterior means of its reference controls (mechanism design) or None.

        For a head without covariate inputs both go through the encoder in one pass (half the operations;
        end to end on Norman the step's speed did not change beyond noise). The reference controls carry no
        covariates, so a head with covariate inputs encodes them apart (and refuses them there).
        """
        if not self.uses_mechanisms or control_h is None or control_h.shape[0] == 0:
            return self.inference(h, covariates), None
        if self.n_covariates:
            return self.inference(h, covariates), self.inference(control_h).qz_mean
        joined, n_cells = self.inference(torch.cat([h, control_h])), h.shape[0]
        cells = InferenceOutput(z=joined.z[:n_cells], qz_mean=joined.qz_mean[:n_cells], qz_logvar=joined.qz_logvar[:n_cells])
        return cells, joined.qz_mean[n_cells:]

    def _fits_counterfactual_means(self, reference_mean: torch.Tensor | None) -> bool:
        """Whether the loss has a counterfactual term: reference controls and the Gaussian likelihood."""
        return reference_mean is not None and self.config.likelihood == "gaussian"

    def _mechanism_terms(self, batch, inference: InferenceOutput, reference_mean: torch.Tensor | None, members: MemberOutputs,
                         library_size, is_control: torch.Tensor, condition: torch.Tensor):
        """Reconstruction, counterfactual term and the MMD's (z means, control flags) of the mechanism design.

        Every cell is reconstructed with its condition's predicted change (anchored on measured singles
        where they exist, so z_inv has nothing to gain from carrying the perturbation), and the latent model
        f must reproduce each measured single's change (weighted like the cells of that single in the batch,
        each squared error by the likelihood's curvature in the offset, `offset_precision`: 1/σ² Gaussian,
        μθ/(μ + θ) NB, so it costs what predicting the single's cells with f instead would; a unit weight on
        NB counts under-weighted the data and the simulator lost small true effects, mask F1 0.686 vs 0.722):
        singles teach effects, masks and programs, combinations the departure. With reference control cells
        (`control_h`, `control_x`), their decoded mean plus each condition's predicted change must match the
        mean of that condition's cells (Gaussian), and they join the MMD's controls.

        `members` stacks the outputs of the mechanism members (`model.effect_members`): both terms are the
        mean of the members' own terms over one decoder pass (each member's per-condition offsets on one
        output layer result; `condition_offset_fit`, which for the Gaussian never forms [members, B, genes]
        tensors), so each member fits the data on its own.
        """
        x = batch["x"]
        n_cells = x.shape[0]
        # The reference controls' decoder pass joins the batch's (see `_encode_with_reference`).
        counterfactual_controls = self._fits_counterfactual_means(reference_mean)
        hidden = self.decoder(torch.cat([inference.z, reference_mean]) if counterfactual_controls else inference.z)
        decoded_controls = self.likelihood_head.average_mean(hidden[n_cells:]) if counterfactual_controls else None
        single = (members.condition_anchorable & (members.condition_n_genes == 1))[condition]
        condition_change = self.effects.condition_prediction(members)  # [members, conditions, genes]
        n_members = condition_change.shape[0]
        log_likelihood, single_precision = self.likelihood_head.condition_offset_fit(
            self.likelihood_head.base(hidden[:n_cells]), library_size, condition_change, condition, x, batch.get("x_nonzero"), single
        )
        gap = members.condition_modelled - members.condition_anchored
        misfit = gap**2 * single_precision  # zero weight on conditions with no measured single's cells
        reconstruction = -log_likelihood + misfit.sum() / (2 * n_cells * n_members)
        if counterfactual_controls:
            counterfactual = self._counterfactual_means(decoded_controls, batch["control_x"], x, condition, condition_change, n_cells)
        else:
            counterfactual = reconstruction.new_zeros(())
        qz_mean = inference.qz_mean
        if reference_mean is not None:
            qz_mean = torch.cat([qz_mean, reference_mean])
            is_control = torch.cat([is_control, is_control.new_ones(reference_mean.shape[0])])
        return reconstruction, counterfactual, qz_mean, is_control

    def _counterfactual_means(self, decoded, x_control, x, group, condition_change, n_cells: int) -> torch.Tensor:
        """Σ over the batch's conditions (and the reference controls) of n · Σ_g (observed − predicted mean)² / 2σ_g².

        Predicted means start from the reference controls' decoded mean (`decoded` [genes]: the average of
        their posterior means' decoder output), as predictions do; `group` [B] is each cell's row of
        `condition_change` [members, conditions, genes], whose members' condition terms are averaged (the
        controls' term is common to them).
        """
        n_members, n_groups = condition_change.shape[:2]
        sums, sizes = group_sums(x, group, n_groups)
        observed = sums / sizes[:, None]
        predicted = decoded + condition_change
        precision = torch.exp(-self.likelihood_head.clamped_log_variance())
        conditions = (sizes[:, None] * (observed - predicted) ** 2 * precision).sum() / n_members
        controls = len(x_control) * ((x_control.mean(dim=0) - decoded) ** 2 * precision).sum()
        return (conditions + controls) / (2 * n_cells)

    def forward(self, batch: dict[str, torch.Tensor], weights: LossWeights | None = None) -> LossOutput:
        """Same as `loss`, so DistributedDataParallel (which wraps `forward`) sees the whole step."""
        return self.loss(batch, weights)

    @torch.no_grad()
    def predict(
        self,
        h_control: torch.Tensor,
        perturbations: torch.Tensor,
        library_size: torch.Tensor | None = None,
        sample: bool = False,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Counterfactual expression [B, n_genes] on the log-normalized scale, for either likelihood.

        With `sample`, each cell is a draw from the model instead of its expectation: z_inv from
        q(z_inv | h) and expression from the likelihood (torch's global RNG; seed it for reproducibility).

        Each control cell keeps its posterior-mean z_inv and receives the z_p of its row of
        `perturbations` ([B, P], or one row [1, P] / [P] applied to every cell), with deterministic
        masks and no dropout. `library_size` only sets the count scale of the NB mean; the
        log-normalized output log1p(1e4 · rate) does not depend on it. `covariates` ([B, n_covariate_levels]
        one-hot, heads with covariate inputs only) are the control cells' levels: the level predicted in.
        """
        _check_width("h_control", h_control, self.config.n_input, "n_input")
        perturbations = perturbations.reshape(-1, perturbations.shape[-1])
        _check_width("perturbations", perturbations, self.config.n_perturbations, "n_perturbations")
        if perturbations.shape[0] == 1:
            perturbations = perturbations.expand(h_control.shape[0], -1)
        if perturbations.shape[0] != h_control.shape[0]:
            raise DataError(
                f"predict got {h_control.shape[0]} control cells but {perturbations.shape[0]} perturbation rows; "
                "pass one row per cell or a single row for all cells"
            )
        was_training = self.training
        self.eval()
        try:
            posterior = self.inference(h_control, covariates)
            z_inv = posterior.qz_mean
            if sample:
                z_inv = z_inv + torch.exp(0.5 * posterior.qz_logvar) * torch.randn_like(z_inv)
            if self.uses_mechanisms:
                output = self.generative(z_inv, library_size, self.effects.predicted_change(perturbations) + self.control_offset)
            else:
                effect = self.effects(perturbations, deterministic=True)  # width checked above
                output = self.generative(z_inv + effect.z_p, library_size, covariates=covariates)
            return output.sample_log_normalized() if sample else output.log_normalized()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def mask_probabilities(self) -> torch.Tensor:
        """[P, K] learned keep-probabilities of the masks (heatmaps, identifiability checks)."""
        return self.effects.keep_probabilities()

    @torch.no_grad()
    def effect_vectors(self) -> torch.Tensor:
        """[P, K] each gene's masked effect with the evaluation mask (before interaction and causal mixing)."""
        return self.effects.effect_vectors()

    def dag_matrix(self) -> torch.Tensor | None:
        """[K, K] strictly upper-triangular causal adjacency (A[i, j]: edge i -> j), or None without the layer."""
        if self.uses_mechanisms:
            return self.effects.adjacency()
        return None if self.effects.causal is None else self.effects.causal.adjacency()


def _required(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in batch:
        raise DataError(f"batch is missing {key!r}; a PerturbedVAE batch needs 'h', 'x' and 'perturbations'")
    return batch[key]


def _check_width(name: str, tensor: torch.Tensor, expected: int, config_field: str) -> None:
    if tensor.dim() != 2 or tensor.shape[1] != expected:
        raise DataError(
            f"{name} has shape {tuple(tensor.shape)}, expected [cells, {expected}] ({config_field} of the config)"
        )
