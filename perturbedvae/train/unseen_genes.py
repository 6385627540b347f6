"""Genes the split holds out of training: give them features, or refuse the run before it trains.

A head predicts a condition only when every gene of it has a column in its perturbation vocabulary.
Without gene features the vocabulary is the training genes; with `gene_features.sources` it also holds
every held-out gene a source covers, and the feature network gives those genes their effects. Any test
condition left outside is reported before the first step (`check_test_predictable`): the run would
otherwise train and then have nothing to score.
"""

from __future__ import annotations

import dataclasses

from perturbedvae.data.conditions import genes_of
from perturbedvae.data.gene_features import (
    FeatureBlock,
    GeneFeatures,
    assemble,
    coexpression_block,
    embedding_block,
    table_block,
)
from perturbedvae.data.splits import Split
from perturbedvae.errors import ConfigError
from perturbedvae.train.config import ExperimentConfig
from perturbedvae.train.datamodule import PerturbationDataModule, is_predictable


def split_genes(split: Split) -> list[str]:
    """Every gene perturbed in a condition of the split (any role), sorted."""
    return sorted({gene for name in split.assignments() for gene in genes_of(name)})


def build_gene_features(config: ExperimentConfig, datamodule: PerturbationDataModule) -> GeneFeatures:
    """Features of the training genes and of every held-out gene the configured sources cover."""
    settings = config.gene_features
    genes = split_genes(datamodule.split)
    blocks: list[FeatureBlock] = []
    for source in settings.sources:
        if source == "coexpression":
            data = datamodule.data
            blocks.append(coexpression_block(data.expression, data.genes, datamodule.train_cells, genes, settings.n_components))
        elif source == "encoder":
            embeddings = datamodule.representation.encoder.gene_embeddings(genes)
            if embeddings is None:
                raise ConfigError(f"the encoder {datamodule.representation.encoder.name} has no gene embeddings; "
                                  "use gene_features.sources coexpression or table instead of encoder")
            blocks.append(embedding_block(embeddings.numpy()))
        else:
            blocks.append(table_block(settings.table, genes))
    return assemble(blocks, genes, datamodule.perturbation_genes)


def with_gene_features(config: ExperimentConfig, datamodule: PerturbationDataModule) -> PerturbationDataModule:
    """The data module with the vocabulary and feature matrix of `gene_features` (unchanged without sources)."""
    if not config.gene_features.sources:
        return datamodule
    features = build_gene_features(config, datamodule)
    return dataclasses.replace(datamodule, perturbation_genes=features.genes, gene_features=features)


def check_test_predictable(config: ExperimentConfig, datamodule: PerturbationDataModule) -> None:
    """Refuse, before training, a split whose test conditions the head could not predict.

    Raises:
        ConfigError: listing the conditions and their genes with no effect, and the fixes.
    """
    vocabulary = datamodule.perturbation_genes
    unpredictable = [name for name in datamodule.split.test if not is_predictable(name, vocabulary)]
    if not unpredictable:
        return
    known = set(vocabulary)
    genes = sorted({gene for name in unpredictable for gene in genes_of(name) if gene not in known})
    sources = config.gene_features.sources
    if sources:
        why = (f"no gene_features source ({', '.join(sources)}) describes {_listed(genes)}"
               + (" (co-expression covers only genes measured in the data)" if "coexpression" in sources else ""))
        fix = "add a source that covers them (gene_features.table with a row per gene), or a split that keeps them out of test"
    else:
        why = f"{_listed(genes)} {'is' if len(genes) == 1 else 'are'} perturbed in no training condition"
        fix = ("set gene_features.sources (e.g. [coexpression], features of held-out genes from the training cells), "
               "or a split that trains on them")
    raise ConfigError(f"{len(unpredictable)} test condition(s) cannot be predicted ({_listed(unpredictable)}): {why}; {fix}")


def _listed(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
