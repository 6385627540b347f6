"""Perturbation effects through a latent causal model whose interventions change mechanisms.

`composition: mechanism` of `PerturbedVAEConfig`. K latent nodes follow a linear structural causal model
with a learned DAG A = triu(G, 1) (A[i, j]: edge i -> j). Perturbing gene g intervenes on a sparse set
of target nodes, its mask m_g ∈ [0, 1]^K (hard-concrete, sparse prior), and at each target it shifts the
node's noise by e_g and *replaces its mechanism*: the target stops listening to its parents (its causal
weights are cut). A condition S (any number of genes) is the SCM solved under all its interventions:

    M_S = 1 − Π_{g∈S} (1 − m_g)                 the targets of the combination
    s_S = Σ_{g∈S} m_g ⊙ e_g                     the shifted noise
    u_j = s_j + (1 − M_j) · Σ_{i<j} A_ij u_i     i.e. u = s (I − A ⊙ (1 − M)ᵀ-columns)⁻¹

so when B targets a node downstream of A's target, B's intervention cuts what A does through it: a
double is not the sum of its singles (dominance, masking), with no parameter beyond the graph.

The latent response is decoded to genes by a linear gene-program matrix W [K, genes] followed by a
per-gene saturation σ_g(v) = c_g · tanh(v / c_g), with c_g = κ · scale_g (scale_g: the largest observed
single-gene change of gene g; κ > 1 one learned scalar), so two perturbations moving a gene the same
way add less than their sum (saturation) through one parameter:

    f(S) = σ(u_S W)                              the modelled change of condition S on the decoder's scale

With `saturation: nodes` the saturation acts on the latent nodes instead, f(S) = τ(u_S) W with
τ_n(u) = c_n · tanh(u / c_n), c_n = κ · (largest |u| of a measured single on node n at initialisation):
two perturbations saturate only where they act on the same node (paralogs feeding one pathway), and
perturbations on different nodes add. `saturation: both` (the kept Norman design) applies τ and then σ,
f(S) = σ(τ(u_S) W).

Prediction keeps what is measured: for a condition whose every gene has a measured training single
(`set_single_priors`: the observed single-gene changes Δ_g), the change is anchored on them and the
model supplies the departure from additivity,

    shift(S) = Σ_{g∈S} Δ_g + f(S) − Σ_{g∈S} f({g}),

which is exactly Δ_g for a measured single and the model's interaction for a combination. Conditions
with an unmeasured gene use f(S) alone. Training fits f to every condition (singles teach effects,
masks and W; combinations teach the graph and κ) and the anchored shift to combinations.

Identifiability (what the argument covers): with sparse masks recovered and interventions acting on
known targets, the latent effects e_g are identifiable up to permutation and scaling of the nodes;
the graph is identified only through combinations whose targets are ordered in it, so with few
training combinations A is weakly determined (its L1 penalty keeps it empty unless data ask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.model.effects import INITIAL_KEEP_PROBABILITY, PerturbationOutput
from perturbedvae.model.masks import make_mask
from perturbedvae.model.rows import unique_rows

_MIN_SCALE = 1e-3
MASK_LOGIT_SCALE = 10.0
"""Mask logits are stored divided by this, so Adam (whose steps are ~lr whatever the gradient) moves them
10× faster than other weights: at lr 1e-3 a 60-epoch Norman run (1,440 steps) moved unscaled logits from
keep-probability 0.9 only to 0.62–0.79, leaving every mask open whatever the sparsity weight."""


class MechanismEffects(nn.Module):
    """Multi-hot perturbation rows [B, P] -> per-cell change on the decoder's output scale [B, n_genes]."""

    def __init__(self, config: PerturbedVAEConfig) -> None:
        super().__init__()
        self.config = config
        k, p, g = config.n_latent, config.n_perturbations, config.n_genes
        self.mask = make_mask(config.mask_kind, config.mask_temperature)
        self.effect_table = nn.Parameter(torch.randn(p, k) * config.effect_init_std)
        self.logit_table = nn.Parameter(torch.full((p, k), self.mask.logits_for(INITIAL_KEEP_PROBABILITY) / MASK_LOGIT_SCALE))
        self.graph = nn.Parameter(torch.zeros(k, k))
        self.register_buffer("strictly_upper", torch.ones(k, k).triu(diagonal=1), persistent=False)
        self.programs = nn.Parameter(torch.randn(k, g) * 0.01)
        # The quadratic programs exist only when asked for, so heads saved without them still load.
        self.curvature = nn.Parameter(torch.zeros(k, g)) if config.curved_programs else None
        self.raw_kappa = nn.Parameter(torch.tensor(_softplus_inverse(config.saturation_init - 1.0)))
        self.register_buffer("single_prior", torch.zeros(p, g))
        self.register_buffer("has_prior", torch.zeros(p, dtype=torch.bool))
        self.register_buffer("gene_scale", torch.ones(g))
        # Saved only where it is used, so heads saved before the option existed still load.
        self.register_buffer("node_scale", torch.ones(k), persistent=config.saturation != "genes")

    uses_features = False
    """No gene-feature network: every perturbation gene has its own effect and mask (see `PerturbationEffects`)."""

    # --- data-derived state ------------------------------------------------------------------------------

    @torch.no_grad()
    def set_single_priors(self, changes: torch.Tensor, measured: torch.Tensor, initialize: bool = True,
                          initial_effects: torch.Tensor | None = None) -> None:
        """Observed single-gene changes Δ_g [P, n_genes] (decoder scale) and which genes have one [P].

        With `initialize` (before training), also sets the saturation scale per gene and starts effects
        and programs near the singles, so training refines f: at a rank-K fit of the measured changes
        (SVD), or, given `initial_effects` [P, ≤K] (`model.initial_effects: latent_shifts`), at those
        effects with the programs fitted to the changes by least squares; either optionally
        varimax-rotated (`config.initial_rotation`). Without `initialize`, only the anchors change
        (re-measured on more cells after training).
        """
        changes = changes.float().to(self.single_prior.device)
        measured = measured.bool().to(self.single_prior.device)
        self.single_prior.copy_(changes * measured[:, None])
        self.has_prior.copy_(measured)
        if not initialize or not measured.any():
            return
        rows = changes[measured]
        self.gene_scale.copy_(rows.abs().max(dim=0).values.clamp_min(_MIN_SCALE))
        targets = rows / self.config.saturation_init
        u, s, vh = torch.linalg.svd(targets, full_matrices=False)
        k = min(self.config.n_latent, len(s))
        root = s[:k].sqrt()
        loadings, programs = u[:, :k] * root, root[:, None] * vh[:k]  # loadings @ programs: the rank-k fit
        if initial_effects is not None:  # the latent shifts at the SVD start's overall size, programs fitted to them
            given = initial_effects.float().to(loadings.device)[measured]
            loadings = given * (loadings.norm() / given.norm().clamp_min(_MIN_SCALE))
            programs = torch.linalg.pinv(loadings) @ targets
        if self.config.initial_rotation == "varimax":
            rotation = varimax_rotation(loadings)
            loadings, programs = loadings @ rotation, rotation.T @ programs
        effects = torch.zeros_like(self.effect_table)
        effects[measured, : loadings.shape[1]] = loadings
        self.effect_table.copy_(effects + torch.randn_like(effects) * self.config.effect_init_std)
        self.programs.zero_()[: loadings.shape[1]] = programs
        self.node_scale.copy_(effects[measured].abs().max(dim=0).values.clamp_min(_MIN_SCALE))

    # --- the model ---------------------------------------------------------------------------------------

    @property
    def kappa(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.raw_kappa)

    def adjacency(self) -> torch.Tensor:
        return self.graph * self.strictly_upper

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """The gene-level change of responses u [R, K]: σ(p(u)); p(τ(u)) with saturation nodes; σ(p(τ(u))) with both.

        p(u) = u W, plus (u ⊙ u) Q with `curved_programs`: each node then moves genes along a bent curve
        of its own, which a linear program can only fit by borrowing a second node (on the simulator,
        whose decoder is a random MLP, that borrowing was most of the false mask entries).
        """
        return self._decode(u.unsqueeze(0), MemberTables.of([self]))[0]

    def _decode(self, u: torch.Tensor, tables: MemberTables) -> torch.Tensor:
        """`decode` of every member at once: u [M, R, K] -> [M, R, genes] through each member's own tables."""
        if self.config.saturation in ("nodes", "both"):
            node_scale = tables.kappa[:, None, None] * tables.node_scale[:, None, :]
            u = node_scale * torch.tanh(u / node_scale)
        programs = u @ tables.programs if tables.curvature is None else u @ tables.programs + (u * u) @ tables.curvature
        if self.config.saturation == "nodes":
            return programs
        scale = tables.kappa[:, None, None] * self.gene_scale
        return scale * torch.tanh(programs / scale)

    def forward(self, perturbations: torch.Tensor, deterministic: bool) -> MechanismOutput:
        return self.member_outputs(perturbations, deterministic).member(0)

    def member_outputs(self, perturbations: torch.Tensor, deterministic: bool) -> MemberOutputs:
        """The outputs the loss fits, stacked over members (`MechanismEnsemble`); here the one model's."""
        return self.respond(perturbations, deterministic, MemberTables.of([self]))

    def respond(self, perturbations: torch.Tensor, deterministic: bool, tables: MemberTables) -> MemberOutputs:
        """The outputs of every member of `tables` for multi-hot rows [B, P], in one pass of batched operations.

        The batch's grouping into conditions, the anchors (`single_prior`) and the gene scale are the
        members' common data and are this module's; effects, masks, graph, programs and saturation come
        from `tables`. Each member draws its own relaxed mask samples.
        """
        gene_index = perturbations.ne(0).any(dim=0).nonzero().squeeze(1)
        if gene_index.numel() == 0:
            return self._no_perturbation(perturbations, tables.n_members)
        weights = perturbations[:, gene_index]
        effects, logits = tables.effects[:, gene_index], tables.logits[:, gene_index]  # [M, A, K]
        masks = self.mask.deterministic(logits, self.config.eval_mask) if deterministic else self.mask.sample(logits)
        rows, inverse = unique_rows(weights)  # few conditions per batch
        present = rows.ne(0).to(masks.dtype)
        n_genes = present.sum(dim=1)
        # A condition of one gene at weight 1 is that gene alone, and a control is no change: only the
        # other conditions (combinations) need their own solve and decode; the rest are read off f({g}).
        read_off = ((n_genes == 1) & (rows.sum(dim=1) == 1)) | (n_genes == 0)
        own = (~read_off).nonzero().squeeze(1)
        gene_shifts = masks * effects
        shift = rows @ gene_shifts
        own_targets = 1.0 - torch.exp(present[own] @ torch.log1p(-masks.clamp(max=1.0 - 1e-6)))
        # The combinations and each present gene alone (f({g}), [A, genes]) in one solve and one decode.
        solved = solve_scm(tables.adjacency, torch.cat([shift[:, own], gene_shifts], dim=1), torch.cat([own_targets, masks], dim=1))
        decoded = self._decode(solved, tables)
        n_own, lookup = len(own), present * read_off[:, None]  # lookup: the one-hot rows of single-gene conditions
        singles = decoded[:, n_own:]
        modelled = (lookup @ singles).index_copy(1, own, decoded[:, :n_own])
        responses = (lookup @ solved[:, n_own:]).index_copy(1, own, solved[:, :n_own])
        sparsity = self.mask.kl_to_prior(logits.float(), self.config.mask_prior_prob).sum(dim=(1, 2))
        effect_prior = 0.5 * effects.float().pow(2).sum(dim=(1, 2))
        return MemberOutputs(
            responses=responses,
            shifts=shift,
            gene_index=gene_index,
            masks=masks,
            sparsity=(sparsity + effect_prior) / perturbations.shape[0],
            condition=inverse,
            condition_modelled=modelled,
            condition_anchored=rows @ self.single_prior[gene_index] + modelled - rows @ singles,
            condition_anchorable=(present @ (~self.has_prior[gene_index]).to(masks.dtype) == 0) & (n_genes > 0),
            condition_n_genes=n_genes,
        )

    def _no_perturbation(self, perturbations: torch.Tensor, n_members: int) -> MemberOutputs:
        """Every cell a control: one condition, no change, no penalty."""
        k, device = self.config.n_latent, perturbations.device
        latent = self.effect_table.new_zeros(n_members, 1, k)
        change = self.programs.new_zeros(n_members, 1, self.config.n_genes)
        return MemberOutputs(
            responses=latent, shifts=latent, gene_index=perturbations.new_zeros(0, dtype=torch.long), masks=latent[:, :0],
            sparsity=latent.new_zeros(n_members), condition=torch.zeros(perturbations.shape[0], dtype=torch.long, device=device),
            condition_modelled=change, condition_anchored=change,
            condition_anchorable=torch.zeros(1, dtype=torch.bool, device=device), condition_n_genes=change.new_zeros(1),
        )

    def predicted_change(self, perturbations: torch.Tensor) -> torch.Tensor:
        """[B, genes] the change predictions use (deterministic masks) for multi-hot rows [B, P]: the members' mean.

        Anchored where every gene of a row's condition has a measured single, else modelled (`condition_prediction`).
        """
        outputs = self.member_outputs(perturbations, deterministic=True)
        return self.condition_prediction(outputs).mean(dim=0)[outputs.condition]

    @staticmethod
    def condition_prediction(output: MechanismOutput | MemberOutputs) -> torch.Tensor:
        """`prediction` once per distinct condition of the batch ([conditions, genes] or [members, conditions, genes])."""
        return torch.where(output.condition_anchorable[:, None], output.condition_anchored, output.condition_modelled)

    # --- views -------------------------------------------------------------------------------------------

    def mask_logits(self) -> torch.Tensor:
        return self.logit_table * MASK_LOGIT_SCALE

    def keep_probabilities(self) -> torch.Tensor:
        return self.mask.keep_probability(self.mask_logits())

    def effect_vectors(self) -> torch.Tensor:
        return self.mask.deterministic(self.mask_logits(), self.config.eval_mask) * self.effect_table

    def dag_penalty(self) -> torch.Tensor:
        return self.adjacency().abs().sum()


class MechanismEnsemble(nn.Module):
    """`config.effect_members` independent `MechanismEffects`; predictions take the members' mean change.

    Each member is a whole mechanism model (effects, masks, graph, programs, saturation) started at the
    same SVD fit with its own noise and trained on its own loss terms (the module averages them), so the
    members are separate fits of the data, not one wider model, and the mean of their departures from
    additivity on an unseen combination is an ensemble's: what the fits agree on stays, the part that
    depends on where one fit placed the singles in its nodes shrinks. The views (masks, effects, graph,
    programs) are member 0's, a complete model whose nodes the identifiability checks can match.
    """

    uses_features = False

    def __init__(self, config: PerturbedVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(MechanismEffects(config) for _ in range(config.effect_members))

    def set_single_priors(self, changes: torch.Tensor, measured: torch.Tensor, initialize: bool = True,
                          initial_effects: torch.Tensor | None = None) -> None:
        for member in self.members:
            member.set_single_priors(changes, measured, initialize, initial_effects)

    def forward(self, perturbations: torch.Tensor, deterministic: bool) -> MechanismOutput:
        """Member 0's output (latent views: z_p)."""
        return self.members[0](perturbations, deterministic)

    def member_outputs(self, perturbations: torch.Tensor, deterministic: bool) -> MemberOutputs:
        """Every member's output from one batched pass over the members' stacked parameters.

        The members' math is the same small operations on [conditions, K] and [K, genes] tensors, so a
        loop over members paid their per-operation overhead once per member; stacked, each runs once.
        """
        return self.members[0].respond(perturbations, deterministic, MemberTables.of(self.members))

    predicted_change = MechanismEffects.predicted_change
    condition_prediction = staticmethod(MechanismEffects.condition_prediction)

    def dag_penalty(self) -> torch.Tensor:
        return torch.stack([member.dag_penalty() for member in self.members]).mean()

    # --- member 0's views ------------------------------------------------------------------------------

    def keep_probabilities(self) -> torch.Tensor:
        return self.members[0].keep_probabilities()

    def effect_vectors(self) -> torch.Tensor:
        return self.members[0].effect_vectors()

    def adjacency(self) -> torch.Tensor:
        return self.members[0].adjacency()

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        return self.members[0].decode(u)


@dataclass(frozen=True)
class MemberTables:
    """The learned tables of M mechanism members stacked on a leading member dimension (M = 1 for one model).

    Stacking is an autograd operation, so gradients reach each member's own parameters.
    """

    effects: torch.Tensor  # [M, P, K]
    logits: torch.Tensor  # [M, P, K] mask logits (unscaled)
    adjacency: torch.Tensor  # [M, K, K]
    programs: torch.Tensor  # [M, K, genes]
    curvature: torch.Tensor | None  # [M, K, genes] with `curved_programs`
    kappa: torch.Tensor  # [M]
    node_scale: torch.Tensor  # [M, K]

    @classmethod
    def of(cls, members: Sequence[MechanismEffects]) -> MemberTables:
        def stacked(tensors) -> torch.Tensor:
            tensors = list(tensors)
            return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

        return cls(
            effects=stacked(member.effect_table for member in members),
            logits=stacked(member.mask_logits() for member in members),
            adjacency=stacked(member.adjacency() for member in members),
            programs=stacked(member.programs for member in members),
            curvature=None if members[0].curvature is None else stacked(member.curvature for member in members),
            kappa=stacked(member.kappa for member in members),
            node_scale=stacked(member.node_scale for member in members),
        )

    @property
    def n_members(self) -> int:
        return self.effects.shape[0]


def solve_scm(adjacency: torch.Tensor, shift: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """u [..., R, K] with u_j = s_j + (1 − M_j) Σ_i A_ij u_i, for A [..., K, K] and s, M [..., R, K]."""
    kept = adjacency.float().unsqueeze(-3) * (1.0 - targets.float()).unsqueeze(-2)  # column j scaled by (1 − M_j)
    identity = torch.eye(shift.shape[-1], device=shift.device)
    u = torch.linalg.solve_triangular(identity - kept, shift.float().unsqueeze(-2), upper=True, left=False, unitriangular=True)
    return u.squeeze(-2).to(shift.dtype)


class MechanismOutput(PerturbationOutput):
    """`PerturbationOutput` plus the gene-level changes (z_p is the latent response u).

    The changes are held once per distinct condition of the batch (~30 rows for ~130 cells) and read per
    cell through `condition`: the loss works per condition where it can (the counterfactual term, the
    singles' misfit), and gathers one [cells, genes] copy where it needs one, not one per tensor.

    Attributes:
        condition: [B] each cell's row in the per-condition tensors.
        condition_modelled: [C, genes] f(S), the model's change of each condition.
        condition_anchored: [C, genes] Σ Δ_g + f(S) − Σ f({g}) (meaningful where `condition_anchorable`).
        condition_anchorable: [C] whether every gene of the condition has a measured single.
        condition_n_genes: [C] how many genes each condition perturbs.
    """

    def __init__(self, z_p, shift, gene_index, masks, sparsity, condition, condition_modelled, condition_anchored,
                 condition_anchorable, condition_n_genes) -> None:
        super().__init__(z_p=z_p, shift=shift, gene_index=gene_index, masks=masks, sparsity=sparsity)
        self.condition = condition
        self.condition_modelled, self.condition_anchored = condition_modelled, condition_anchored
        self.condition_anchorable, self.condition_n_genes = condition_anchorable, condition_n_genes

    @property
    def modelled(self) -> torch.Tensor:
        """[B, genes] f(S) of each cell's condition."""
        return self.condition_modelled[self.condition]

    @property
    def anchored(self) -> torch.Tensor:
        """[B, genes] the anchored change of each cell's condition."""
        return self.condition_anchored[self.condition]

    @property
    def anchorable(self) -> torch.Tensor:
        """[B] whether every gene of the cell's condition has a measured single."""
        return self.condition_anchorable[self.condition]


@dataclass
class MemberOutputs:
    """The mechanism outputs of M members stacked on a leading member dimension, held once per condition.

    What the loss reads in one go (`condition_modelled` [M, C, genes], ...); `member(i)` is member i's
    `MechanismOutput`. The grouping into conditions (`condition`, `condition_anchorable`,
    `condition_n_genes`) is the batch's, common to all members; the rest has the member dimension.
    """

    responses: torch.Tensor  # [M, C, K] latent response u of each condition
    shifts: torch.Tensor  # [M, C, K]
    gene_index: torch.Tensor  # [A]
    masks: torch.Tensor  # [M, A, K]
    sparsity: torch.Tensor  # [M]
    condition: torch.Tensor  # [B]
    condition_modelled: torch.Tensor  # [M, C, genes]
    condition_anchored: torch.Tensor  # [M, C, genes]
    condition_anchorable: torch.Tensor  # [C]
    condition_n_genes: torch.Tensor  # [C]

    def member(self, index: int) -> MechanismOutput:
        return MechanismOutput(
            z_p=self.responses[index][self.condition], shift=self.shifts[index][self.condition], gene_index=self.gene_index,
            masks=self.masks[index], sparsity=self.sparsity[index], condition=self.condition,
            condition_modelled=self.condition_modelled[index], condition_anchored=self.condition_anchored[index],
            condition_anchorable=self.condition_anchorable, condition_n_genes=self.condition_n_genes,
        )


def varimax_rotation(loadings: torch.Tensor, iterations: int = 200, tolerance: float = 1e-6) -> torch.Tensor:
    """Orthogonal R [k, k] maximising the variance of squared entries of `loadings` [n, k] @ R (Kaiser's varimax).

    An SVD fixes the effects only up to a rotation, and a rotation away from the sparse truth leaves
    every gene moving every node, which no mask can close. Varimax turns the rank-K fit towards the
    rotation in which each perturbation loads on few nodes, the structure the mask prior rewards; it
    changes nothing the product effects @ programs predicts. On the 60-perturbation simulator it
    raised the MCC of the initial effects from 0.64 to 0.77 (seeds 0 and 1).
    """
    n, k = loadings.shape
    rotation = torch.eye(k, dtype=loadings.dtype, device=loadings.device)
    if k < 2 or n == 0:
        return rotation
    criterion = 0.0
    for _ in range(iterations):
        rotated = loadings @ rotation
        target = rotated**3 - rotated * (rotated**2).mean(dim=0)
        left, singular, right = torch.linalg.svd(loadings.T @ target)
        rotation = left @ right
        if singular.sum() < criterion * (1.0 + tolerance):
            break
        criterion = float(singular.sum())
    return rotation


def _softplus_inverse(value: float) -> float:
    """x with softplus(x) = value (softplus(x) ≈ x for large x, where expm1 would overflow)."""
    return value if value > 30.0 else math.log(math.expm1(value))
