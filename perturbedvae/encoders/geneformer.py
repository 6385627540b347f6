"""The `geneformer` kind: Geneformer V1/V2 dictionaries + a BERT checkpoint directory.

The dictionaries are Geneformer's own pickles (token, gene median, gene name -> Ensembl id, and for V1
the Ensembl id collapsing map), read from the card's vocabulary directory. The model is any BERT saved
with `save_pretrained` (Geneformer's released weights or `scripts/pretrain_encoder.py`).
"""

from __future__ import annotations

from pathlib import Path

from perturbedvae.encoders.cards import AdapterCard
from perturbedvae.encoders.checkpoints import load_quietly
from perturbedvae.encoders.rank_value import RankValueTokenizer, RankValueTransformerEncoder
from perturbedvae.encoders.vocab import load_pickle_dictionary
from perturbedvae.errors import CheckpointError

CLS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<cls>", "<eos>", "<pad>"


def geneformer_tokenizer(card: AdapterCard, max_length: int | None = None) -> RankValueTokenizer:
    """Rank-value tokenizer from the card's Geneformer dictionaries."""
    token_of = load_pickle_dictionary(card.vocab_file("token_dictionary"))
    medians = load_pickle_dictionary(card.vocab_file("gene_median_dictionary"))
    name_to_id = load_pickle_dictionary(card.vocab_file("gene_name_id_dictionary"))
    mapping_path = card.vocab_file("ensembl_mapping_dictionary")
    if mapping_path is not None:
        collapse = load_pickle_dictionary(mapping_path)
        name_to_id = {name: collapse.get(gene_id, gene_id) for name, gene_id in name_to_id.items()}
    special = card.option("special_tokens", CLS_TOKEN in token_of)
    return RankValueTokenizer(
        token_of={key: int(value) for key, value in token_of.items()},
        median_of=medians,
        max_length=max_length or card.max_length or 2048,
        pad_id=int(token_of.get(PAD_TOKEN, 0)),
        cls_id=int(token_of[CLS_TOKEN]) if special else None,
        eos_id=int(token_of[EOS_TOKEN]) if special else None,
        gene_alias=name_to_id,
    )


def load_geneformer(card: AdapterCard, checkpoint: Path) -> RankValueTransformerEncoder:
    """Geneformer encoder: card dictionaries + `BertModel.from_pretrained(checkpoint)` in eval mode."""
    from transformers import BertModel

    try:
        model = load_quietly(BertModel, checkpoint, add_pooling_layer=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{checkpoint}: not a BERT checkpoint directory (config.json + weights): {error}") from None
    model.eval()
    max_length = min(card.max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
    tokenizer = geneformer_tokenizer(card, max_length)
    largest_token = max(tokenizer.token_of.values())
    if largest_token >= model.config.vocab_size:
        raise CheckpointError(
            f"{checkpoint}: the model has {model.config.vocab_size} tokens but the card's token dictionary uses ids up "
            f"to {largest_token}; pair V1 weights with the V1 card and V2 weights with the V2 card"
        )
    return RankValueTransformerEncoder(card.name, tokenizer, model, card.pooling, card.layer)
