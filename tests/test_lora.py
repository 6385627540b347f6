"""LoRA: frozen base weights, the parameter count LoRA implies, adapters that save, reload and merge."""

from __future__ import annotations

import pytest
import torch

from perturbedvae.encoders import load_encoder
from perturbedvae.encoders.lora import apply_lora, count_trainable, load_adapters, merge_adapters, save_adapters
from perturbedvae.errors import CheckpointError, ConfigError
from tests.conftest import REPO, VOCAB_DIR
from tests.test_encoders_geneformer import write_tiny_geneformer
from tests.test_encoders_scgpt import write_scgpt_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:unpickling", "ignore:no counts found", "ignore:loading")
CARD = REPO / "adapters/geneformer-v1.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_geneformer(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def batch(checkpoint, norman_data):
    return load_encoder(CARD, checkpoint, vocab_dir=VOCAB_DIR).prepare(norman_data.adata[:16])


def fresh(checkpoint):
    return load_encoder(CARD, checkpoint, vocab_dir=VOCAB_DIR)


def expected_lora_parameters(module: torch.nn.Module, targets, r: int) -> int:
    return sum(r * (layer.in_features + layer.out_features) for name, layer in module.named_modules()
               if isinstance(layer, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def train_steps(encoder, batch, steps: int = 3) -> None:
    encoder.model.train()
    optimizer = torch.optim.Adam([p for p in encoder.model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = encoder.embed(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.model.eval()


def test_trainable_count_is_what_lora_implies(checkpoint):
    encoder = fresh(checkpoint)
    encoder.layer = -1  # the last hidden state: every layer reaches it
    expected = expected_lora_parameters(encoder.model, ("query", "value"), r=4)
    apply_lora(encoder, r=4, alpha=8)  # targets from the card
    assert expected == 2 * 2 * 4 * (16 + 16)  # 2 layers x (query, value) x r x (in + out)
    assert count_trainable(encoder.trainable_module()) == expected
    assert all("lora_" in name for name, p in encoder.model.named_parameters() if p.requires_grad)


def test_only_layers_that_reach_the_read_embedding_are_adapted_and_all_of_them_train(checkpoint, batch):
    encoder = fresh(checkpoint)  # the card reads hidden state -2: the output of layer 0 of this 2-layer model
    apply_lora(encoder, r=4, dropout=0.0)
    trainable = {name: p.detach().clone() for name, p in encoder.model.named_parameters() if p.requires_grad}
    assert count_trainable(encoder.trainable_module()) == 2 * 4 * (16 + 16)
    assert all(".layer.0." in name for name in trainable)
    train_steps(encoder, batch)
    after = dict(encoder.model.named_parameters())
    assert all(not torch.equal(after[name], before) for name, before in trainable.items())
    embeddings_only = fresh(checkpoint)
    embeddings_only.layer = 0
    with pytest.raises(ConfigError, match="LoRA would change nothing"):
        apply_lora(embeddings_only)


def test_base_weights_do_not_change_but_outputs_do(checkpoint, batch):
    encoder = fresh(checkpoint)
    with torch.no_grad():
        before = encoder.embed(batch)
    base = {name: value.clone() for name, value in encoder.model.state_dict().items()}
    apply_lora(encoder, r=4, dropout=0.0)
    train_steps(encoder, batch)
    after_state = encoder.model.state_dict()
    for name, value in base.items():
        wrapped = name.replace(".query.", ".query.base_layer.").replace(".value.", ".value.base_layer.")
        torch.testing.assert_close(after_state.get(wrapped, after_state.get(name)), value, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(encoder.embed(batch), before, atol=1e-4)


def test_saved_adapters_reload_and_merge_to_the_same_outputs(checkpoint, batch, tmp_path):
    encoder = apply_lora(fresh(checkpoint), r=4, dropout=0.0)
    train_steps(encoder, batch)
    with torch.no_grad():
        adapted = encoder.embed(batch)
    save_adapters(encoder, tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    weights = tmp_path / "adapters" / "adapter_model.safetensors"
    assert weights.stat().st_size < sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 10
    reloaded = load_adapters(fresh(checkpoint), tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.embed(batch), adapted)
    assert count_trainable(reloaded.model) == 0  # loaded for inference unless trainable=True
    merge_adapters(encoder)
    assert encoder.peft_model is None
    assert not any("lora" in name for name, _ in encoder.model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(batch), adapted, atol=1e-5, rtol=1e-5)


def test_lora_on_the_scgpt_port_acts_in_eval_mode(tmp_path, norman_data):
    write_scgpt_checkpoint(tmp_path, norman_data.genes)
    encoder = load_encoder(REPO / "adapters/scgpt.yaml", tmp_path, vocab_dir=VOCAB_DIR)
    batch = encoder.prepare(norman_data.adata[:8])
    with torch.no_grad():
        before = encoder.embed(batch)
    expected = expected_lora_parameters(encoder.model, ("linear1", "linear2"), r=2)
    apply_lora(encoder, r=2, dropout=0.0)
    # both transformer layers' feed-forward (16 -> 24 -> 16) and the value encoder's MLP (1 -> 16 -> 16)
    assert count_trainable(encoder.model) == expected == 2 * 2 * 2 * (16 + 24) + 2 * (1 + 16) + 2 * (16 + 16)
    train_steps(encoder, batch)
    with torch.inference_mode():
        assert not torch.allclose(encoder.embed(batch), before, atol=1e-4)


def test_scgpt_reading_an_inner_layer_keeps_its_value_encoder_adapters(tmp_path, norman_data):
    write_scgpt_checkpoint(tmp_path, norman_data.genes)
    encoder = load_encoder(REPO / "adapters/scgpt.yaml", tmp_path, vocab_dir=VOCAB_DIR)
    encoder.layer = -2  # the output of layer 0 of 2: layer 1 is not used, the value encoder feeds layer 0
    apply_lora(encoder, r=2, dropout=0.0)
    adapted = {name.split(".lora_")[0] for name, p in encoder.model.named_parameters() if p.requires_grad}
    assert adapted == {"transformer_encoder.layers.0.linear1", "transformer_encoder.layers.0.linear2",
                       "value_encoder.linear1", "value_encoder.linear2"}
    assert count_trainable(encoder.model) == 2 * 2 * (16 + 24) + 2 * (1 + 16) + 2 * (16 + 16)


def test_bad_lora_requests(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="not Linear layers"):
        apply_lora(fresh(checkpoint), target_modules=["attention_weights"])
    with pytest.raises(ConfigError, match="no LoRA target modules"):
        apply_lora(load_encoder({**_card(), "lora_target_modules": []}, checkpoint, vocab_dir=VOCAB_DIR))
    with pytest.raises(ConfigError, match="no network weights"):
        apply_lora(load_encoder({"kind": "expression"}))
    with pytest.raises(ConfigError, match="r > 0"):
        apply_lora(fresh(checkpoint), r=0)
    encoder = apply_lora(fresh(checkpoint))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(encoder)
    with pytest.raises(ConfigError, match="call apply_lora"):
        save_adapters(fresh(checkpoint), tmp_path)
    with pytest.raises(CheckpointError, match="holds no LoRA adapters"):
        load_adapters(fresh(checkpoint), tmp_path)


def _card() -> dict:
    import yaml

    return yaml.safe_load(CARD.read_text())
