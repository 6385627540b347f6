"""Pretrain a small Geneformer-format BERT by masked gene prediction on rank-value tokens.

The model speaks Geneformer's V1 vocabulary (its token dictionary, gene medians and symbol -> Ensembl
map, from the geneformer-v1 card), so the saved directory loads with `adapters/geneformer-v1.yaml` like
a released Geneformer checkpoint. Training masks 15% of each cell's gene tokens (BERT's 80% `<mask>` /
10% random gene / 10% unchanged) and predicts them; logits are computed at masked positions only, which
keeps the 25k-token softmax affordable on a CPU.

Held-out evaluation reports masked-token accuracy against two frequency baselines fitted on the
training cells: the most frequent gene overall, and the most frequent gene at each rank position (a gene
that is usually ranked 3rd is guessed at position 3). Beating the positional baseline means the model
reads the cell's other genes, not just typical rank positions.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from perturbedvae.checks import check_number
from perturbedvae.data.loading import PerturbationData
from perturbedvae.encoders.cards import load_card
from perturbedvae.encoders.geneformer import geneformer_tokenizer
from perturbedvae.encoders.rank_value import RankValueTokenizer, relative_expression_source

logger = logging.getLogger(__name__)

MASK_TOKEN = "<mask>"
IGNORE = -100
REPORT_FILE = "pretrain_report.json"


@dataclass
class PretrainConfig:
    """Model size and training schedule (defaults: the ~7-minute one-thread CPU run of scripts/pretrain_encoder.py)."""

    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 128
    max_length: int = 256
    mask_fraction: float = 0.15
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    epochs: float = 3.0
    max_steps: int | None = None
    held_out_fraction: float = 0.1
    seed: int = 0


@dataclass
class PretrainReport:
    """What one pretraining run achieved on held-out cells."""

    n_train_cells: int
    n_held_out_cells: int
    n_masked_held_out: int
    steps: int
    seconds: float
    final_train_loss: float
    held_out_accuracy: float
    baseline_most_frequent: float
    baseline_per_position: float
    config: dict = field(default_factory=dict)

    def shortfall(self) -> str | None:
        """Why the encoder is no better than gene frequency, or None when it beats both baselines.

        An encoder at or below a frequency baseline learned nothing about a cell's context, so its
        embeddings would feed the head noise; the user should hear that before training on them.
        """
        best, name = max((self.baseline_per_position, "the most frequent gene at each rank position"),
                         (self.baseline_most_frequent, "the most frequent gene"))
        if self.held_out_accuracy > best:
            return None
        return (f"held-out masked-gene accuracy {self.held_out_accuracy:.4f} is not above the frequency baseline {best:.4f} "
                f"({name}): the encoder learned nothing beyond gene frequencies; train longer (epochs, max_steps), "
                "or on more cells")


def new_geneformer_bert(vocab_size: int, config: PretrainConfig, pad_id: int = 0):
    """A randomly initialized BertForMaskedLM shaped like Geneformer (ReLU, absolute positions), only smaller."""
    from transformers import BertConfig, BertForMaskedLM

    bert_config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_length,
        hidden_act="relu",
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        pad_token_id=pad_id,
    )
    torch.manual_seed(config.seed)
    return BertForMaskedLM(bert_config)


def token_sequences(datasets: Sequence[PerturbationData], tokenizer: RankValueTokenizer) -> list[np.ndarray]:
    """Rank-value gene tokens of every cell of every dataset (no padding)."""
    sequences = []
    for data in datasets:
        batch = tokenizer.tokenize(relative_expression_source(data.adata), data.genes)
        lengths = batch["attention_mask"].sum(1).numpy()
        ids = batch["input_ids"].numpy()
        sequences += [ids[row, : lengths[row]] for row in range(len(ids))]
    return sequences


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, fraction: float, mask_id: int, gene_ids: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of `fraction` of the real tokens; returns (inputs, labels with IGNORE off the masked positions)."""
    chosen = (torch.rand(ids.shape, generator=generator) < fraction) & attention.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = gene_ids[torch.randint(len(gene_ids), (int(swap.sum()),), generator=generator)]
    return inputs, labels


def pad_batch(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.from_numpy(sequence)
        attention[row, : len(sequence)] = 1
    return ids, attention


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of cells with similar lengths (little padding), in random order, as Geneformer trains."""
    order = np.argsort(lengths + rng.random(len(lengths)), kind="stable")
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [batches[index] for index in rng.permutation(len(batches))]


def masked_logits(model, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MLM logits at the masked positions only (row order of `labels[labels != IGNORE]`)."""
    hidden = model.bert(input_ids=ids, attention_mask=attention).last_hidden_state
    return model.cls(hidden[labels != IGNORE])


def frequency_baselines(train: Sequence[np.ndarray], max_length: int) -> tuple[int, np.ndarray]:
    """Most frequent token overall and at every rank position of the training cells."""
    overall = int(np.bincount(np.concatenate(train)).argmax())
    per_position = np.full(max_length, overall, dtype=np.int64)
    for position in range(max_length):
        column = [sequence[position] for sequence in train if len(sequence) > position]
        if column:
            per_position[position] = np.bincount(column).argmax()
    return overall, per_position


def evaluate(model, held_out: Sequence[np.ndarray], config: PretrainConfig, mask_id: int, gene_ids: torch.Tensor,
             pad_id: int, overall: int, per_position: np.ndarray) -> dict[str, float]:
    """Masked-token accuracy of the model and of both baselines on the same masked positions."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    model.eval()
    hits = {"model": 0, "overall": 0, "position": 0}
    total = 0
    with torch.inference_mode():
        for start in range(0, len(held_out), config.batch_size):
            ids, attention = pad_batch(held_out[start : start + config.batch_size], pad_id)
            inputs, labels = mask_tokens(ids, attention, config.mask_fraction, mask_id, gene_ids, generator)
            targets = labels[labels != IGNORE]
            positions = torch.nonzero(labels != IGNORE)[:, 1].numpy()
            hits["model"] += int((masked_logits(model, inputs, attention, labels).argmax(-1) == targets).sum())
            hits["overall"] += int((targets == overall).sum())
            hits["position"] += int((targets.numpy() == per_position[positions]).sum())
            total += len(targets)
    return {"n_masked": total, **{key: value / max(total, 1) for key, value in hits.items()}}


def pretrain(datasets: Sequence[PerturbationData], out_dir: str | Path, card: str | Path = "adapters/geneformer-v1.yaml",
             config: PretrainConfig | None = None, vocab_dir: str | Path | None = None, log_every: int = 50) -> PretrainReport:
    """Pretrain on the cells of `datasets`, save to `out_dir` (save_pretrained + report) and return the report."""
    config = config or PretrainConfig()
    for name in ("held_out_fraction", "mask_fraction"):
        check_number(name, getattr(config, name), low=0, high=1, low_open=True, high_open=True)
    adapter = load_card(card, vocab_dir)
    tokenizer = geneformer_tokenizer(adapter, config.max_length)
    mask_id = tokenizer.token_of[MASK_TOKEN]
    sequences = token_sequences(datasets, tokenizer)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(sequences))
    n_held_out = max(1, round(config.held_out_fraction * len(sequences)))
    held_out = [sequences[index] for index in order[:n_held_out]]
    train = [sequences[index] for index in order[n_held_out:]]
    gene_ids = torch.from_numpy(np.unique(np.concatenate(train)))
    model = new_geneformer_bert(max(tokenizer.token_of.values()) + 1, config, tokenizer.pad_id)
    steps, train_loss, train_seconds = _train(model, train, config, mask_id, gene_ids, tokenizer.pad_id, rng, log_every)
    overall, per_position = frequency_baselines(train, config.max_length)
    started = time.perf_counter()
    scores = evaluate(model, held_out, config, mask_id, gene_ids, tokenizer.pad_id, overall, per_position)
    report = PretrainReport(
        n_train_cells=len(train), n_held_out_cells=len(held_out), n_masked_held_out=scores["n_masked"], steps=steps,
        seconds=round(train_seconds + time.perf_counter() - started, 1), final_train_loss=round(train_loss, 4),
        held_out_accuracy=round(scores["model"], 4), baseline_most_frequent=round(scores["overall"], 4),
        baseline_per_position=round(scores["position"], 4), config=asdict(config),
    )
    if report.shortfall():
        warnings.warn(report.shortfall(), UserWarning, stacklevel=2)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    (out_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _train(model, train: Sequence[np.ndarray], config: PretrainConfig, mask_id: int, gene_ids: torch.Tensor, pad_id: int,
           rng: np.random.Generator, log_every: int) -> tuple[int, float, float]:
    """AdamW with linear warm-up and decay; returns (steps, last smoothed loss, seconds)."""
    lengths = np.array([len(sequence) for sequence in train])
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    warmup = max(1, int(config.warmup_fraction * total))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    started, step, smoothed = time.perf_counter(), 0, float("nan")
    while step < total:
        for batch in length_grouped_batches(lengths, config.batch_size, rng):
            ids, attention = pad_batch([train[index] for index in batch], pad_id)
            inputs, labels = mask_tokens(ids, attention, config.mask_fraction, mask_id, gene_ids, generator)
            if not (labels != IGNORE).any():
                continue
            logits = masked_logits(model, inputs, attention, labels)
            loss = torch.nn.functional.cross_entropy(logits, labels[labels != IGNORE])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            smoothed = loss.item() if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss.item()
            step += 1
            if log_every and step % log_every == 0:
                logger.info("step %d/%d  loss %.3f  %.0fs", step, total, smoothed, time.perf_counter() - started)
            if step >= total:
                break
    return step, smoothed, time.perf_counter() - started
