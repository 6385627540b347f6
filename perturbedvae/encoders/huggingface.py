"""The `huggingface` kind: any `AutoModel` checkpoint directory reading rank-value gene tokens.

For a transformer pretrained on ranked gene tokens that is not Geneformer: the user supplies a JSON
gene -> token id mapping (`vocab.gene_to_token`) and optionally JSON gene medians (`vocab.gene_medians`)
and the ids of `<cls>`/`<eos>` if the model was trained with them.
"""

from __future__ import annotations

from pathlib import Path

from perturbedvae.encoders.cards import AdapterCard
from perturbedvae.encoders.checkpoints import load_quietly
from perturbedvae.encoders.rank_value import RankValueTokenizer, RankValueTransformerEncoder
from perturbedvae.encoders.vocab import load_json_dictionary
from perturbedvae.errors import CheckpointError, ConfigError


def load_huggingface(card: AdapterCard, checkpoint: Path) -> RankValueTransformerEncoder:
    """Encoder from `AutoModel.from_pretrained(checkpoint)` and the card's JSON gene mapping."""
    from transformers import AutoModel

    try:
        model = load_quietly(AutoModel, checkpoint)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{checkpoint}: not a HuggingFace model directory (config.json + weights): {error}") from None
    model.eval()
    token_of = load_json_dictionary(card.vocab_file("gene_to_token"))
    if not all(isinstance(value, int) for value in token_of.values()):
        raise ConfigError(f"{card.vocab_file('gene_to_token')}: every gene must map to an integer token id")
    medians_path = card.vocab_file("gene_medians")
    limit = getattr(model.config, "max_position_embeddings", None) or card.max_length or 2048
    tokenizer = RankValueTokenizer(
        token_of=token_of,
        median_of=load_json_dictionary(medians_path) if medians_path else None,
        max_length=min(card.max_length or limit, limit),
        pad_id=getattr(model.config, "pad_token_id", None) or 0,
        cls_id=card.option("cls_token_id"),
        eos_id=card.option("eos_token_id"),
    )
    return RankValueTransformerEncoder(card.name, tokenizer, model, card.pooling, card.layer)
