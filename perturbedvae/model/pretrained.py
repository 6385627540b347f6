"""A trained head as one directory a user can copy, load and share (HuggingFace style).

    <directory>/config.json                 PerturbedVAEConfig
    <directory>/model.safetensors           module weights
    <directory>/vocab.json                  {"perturbation_genes": [...], "gene_names": [...]}
    <directory>/gene_features.safetensors   per-perturbation-gene features (only when gene_feature_dim is set)

The wrapper also owns the perturbation vocabulary, so users speak gene names and never column indices:
`perturbation_matrix([["KLF1"], ["CEBPA", "KLF1"], []])` is the multi-hot input of three conditions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from perturbedvae import __version__
from perturbedvae.errors import CheckpointError, ConditionError, ConfigError
from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.model.module import PerturbedVAEModule
from perturbedvae.vocabulary import check_known_genes

_UNSEEN_GENE_ADVICE = (
    "A head without gene features cannot predict unseen genes; train with gene features "
    "or add the genes with add_perturbation_genes"
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
GENE_FEATURES_FILE = "gene_features.safetensors"
_GENE_FEATURES_KEY = "gene_features"


class PerturbedVAEHead:
    """A PerturbedVAE module with its gene vocabularies, saved and loaded as one directory."""

    def __init__(
        self,
        config: PerturbedVAEConfig,
        module: PerturbedVAEModule,
        perturbation_genes: Sequence[str],
        gene_names: Sequence[str],
    ) -> None:
        if module.config.to_dict() != config.to_dict():
            raise ConfigError("module.config differs from config; build the module from this config")
        self.module = module
        self.perturbation_genes = _checked_names("perturbation_genes", perturbation_genes, config.n_perturbations)
        self.gene_names = _checked_names("gene_names", gene_names, config.n_genes)

    @property
    def config(self) -> PerturbedVAEConfig:
        """The module's config (one object, so vocabulary extensions keep both in step)."""
        return self.module.config

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config, weights, vocabularies (and gene features) into `directory`, creating it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.module.state_dict().items()}
        metadata = {"format": "pt", "perturbedvae_version": __version__}
        save_file(state, str(directory / WEIGHTS_FILE), metadata=metadata)
        vocab = {"perturbation_genes": self.perturbation_genes, "gene_names": self.gene_names}
        (directory / VOCAB_FILE).write_text(json.dumps(vocab, indent=1) + "\n")
        if self.module.effects.uses_features:
            features = {_GENE_FEATURES_KEY: self.module.effects.gene_features.detach().cpu().contiguous()}
            save_file(features, str(directory / GENE_FEATURES_FILE), metadata=metadata)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PerturbedVAEHead:
        """Load a directory written by `save_pretrained` (on CPU, in eval mode).

        Raises:
            CheckpointError: when the directory or a file is missing, unreadable, corrupt, or does not
                match the config (shapes, vocabulary sizes, unknown or missing weights).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory; pass the folder written by save_pretrained")
        config = _load_config(directory / CONFIG_FILE)
        vocab = _load_vocab(directory / VOCAB_FILE)
        gene_features = None
        if config.gene_feature_dim is not None:
            gene_features = _load_tensors(directory / GENE_FEATURES_FILE).get(_GENE_FEATURES_KEY)
            if gene_features is None:
                raise CheckpointError(f"{directory / GENE_FEATURES_FILE} has no {_GENE_FEATURES_KEY!r} tensor")
        try:
            module = PerturbedVAEModule(config, gene_features)
            module.load_state_dict(_load_tensors(directory / WEIGHTS_FILE), strict=True)
            model = cls(config, module, vocab["perturbation_genes"], vocab["gene_names"])
        except (RuntimeError, ConfigError) as error:
            raise CheckpointError(
                f"checkpoint in {directory} does not match its config.json ({error}); re-save the model"
            ) from error
        module.eval()
        return model

    def perturbation_matrix(self, gene_sets: Sequence[Sequence[str]]) -> torch.Tensor:
        """Multi-hot [len(gene_sets), P] rows (on the module's device); an empty set is a control cell.

        Raises:
            ConditionError: for a gene outside the perturbation vocabulary (close matches named), or a
                condition given as one string instead of a list of genes.
        """
        index = {gene: column for column, gene in enumerate(self.perturbation_genes)}
        device = next(self.module.parameters()).device
        matrix = torch.zeros(len(gene_sets), len(self.perturbation_genes), device=device)
        for row, genes in enumerate(gene_sets):
            if isinstance(genes, str):
                raise ConditionError(
                    f"condition {genes!r} is a string; pass its genes as a list, e.g. {genes.split('+')!r} "
                    "(perturbedvae.data.conditions.genes_of turns canonical names into gene tuples)"
                )
            check_known_genes(genes, index, what="trained perturbation vocabulary", advice=_UNSEEN_GENE_ADVICE)
            matrix[row, [index[gene] for gene in genes]] = 1.0
        return matrix

    def predict(
        self,
        h_control: torch.Tensor,
        genes: Sequence[str],
        library_size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-normalized expression [B, n_genes] of control cells `h_control` given the perturbed `genes`."""
        return self.module.predict(h_control, self.perturbation_matrix([genes]), library_size)

    def add_perturbation_genes(self, genes: Sequence[str], gene_features: torch.Tensor) -> None:
        """Extend the vocabulary with genes never seen in training, described by their features.

        Only heads trained with gene features can do this: the feature network gives the new genes
        their effects and masks.
        """
        if not self.module.effects.uses_features:
            raise ConfigError(
                "this head was trained without gene features, so it cannot give unseen genes an effect; "
                "train with gene_feature_dim set (gene features from an encoder) to predict unseen genes"
            )
        duplicated = sorted(set(genes) & set(self.perturbation_genes))
        if duplicated:
            raise ConditionError(f"gene(s) already in the perturbation vocabulary: {', '.join(duplicated)}")
        if gene_features.shape[0] != len(genes):
            raise ConfigError(f"got {len(genes)} genes but {gene_features.shape[0]} feature rows; pass one row per gene")
        names = [*self.perturbation_genes, *genes]
        extended = _checked_names("perturbation_genes", names, len(names))  # before changing any state
        old = self.module.effects.gene_features
        self.module.effects.set_gene_features(torch.cat([old, gene_features.to(old)], dim=0))
        self.perturbation_genes = extended


def _checked_names(what: str, names: Sequence[str], expected: int) -> list[str]:
    names = list(names)
    if len(names) != expected or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{what} must be {expected} strings (the config's size), got {len(names)} entries")
    if len(set(names)) != len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise ConfigError(f"{what} names a gene more than once: {', '.join(duplicated[:5])}")
    return names


def _load_config(path: Path) -> PerturbedVAEConfig:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a saved PerturbedVAE directory needs {CONFIG_FILE}")
    try:
        return PerturbedVAEConfig.load(path)
    except ConfigError as error:
        raise CheckpointError(f"{path} is not a valid PerturbedVAE config: {error}") from error


def _load_vocab(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a saved PerturbedVAE directory needs {VOCAB_FILE}")
    try:
        vocab = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-save the model") from error
    if not isinstance(vocab, dict) or not all(isinstance(vocab.get(key), list) for key in ("perturbation_genes", "gene_names")):
        raise CheckpointError(f"{path} must hold the lists 'perturbation_genes' and 'gene_names'; re-save the model")
    return vocab


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; re-save the model with save_pretrained")
    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({error}); re-save the model") from error
