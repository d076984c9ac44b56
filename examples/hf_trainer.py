"""A Hugging Face `Trainer` fine-tuning script run under the harness: a tiny BERT-style classifier
built from a config (nothing downloaded) on generated token sequences.

Launch: python -m orchestrator.sweep sweeps/hf_trainer.yaml

The lines marked `# ctx` are the whole change from the stand-alone script (docs/own-code.md): the
adapter (orchestrator.integrations.hf) fills TrainingArguments' seed, data_seed, full_determinism,
bf16 and device from the run's preset, and returns the Trainer's own predictions.
"""

import zlib

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification

from orchestrator.integrations import hf  # ctx

VOCAB, LENGTH = 32, 16


class Sequences(Dataset):
    """Random token sequences (fixed `seed`); label 1 where the first half's ids sum above the
    second half's. Records the indices it serves, so a run can report the order it trained in."""

    def __init__(self, n: int, seed: int):
        g = np.random.default_rng(seed)
        self.ids = torch.from_numpy(g.integers(1, VOCAB, (n, LENGTH)))
        half = LENGTH // 2
        self.labels = (self.ids[:, :half].sum(1) > self.ids[:, half:].sum(1)).long()
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        self.seen.append(int(i))
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}

    def order_digest(self) -> dict:
        """crc32 of the indices served since the last call (equal digests, equal batch order), and
        how many."""
        digest = zlib.crc32(np.asarray(self.seen, dtype=np.int64).tobytes())
        served = len(self.seen)  # this rank's share at world size > 1
        self.seen.clear()
        return {"order_digest": float(digest), "served": served}


def make_model() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa")
    return BertForSequenceClassification(config)


def main(ctx, epochs: int = 2, batch_size: int = 32, lr: float = 3e-3, n_train: int = 256,  # ctx
         eval_batch_size: int = 128) -> dict:
    train, test = Sequences(n_train, seed=0), Sequences(128, seed=1)
    model = make_model()  # torch's global RNG is seeded from init by the harness
    args = hf.training_arguments(ctx, num_train_epochs=epochs, per_device_train_batch_size=batch_size,  # ctx
                                 per_device_eval_batch_size=eval_batch_size, learning_rate=lr, seed=42)
    trainer = hf.trainer(ctx, model=model, args=args, train_dataset=train,  # ctx
                         epoch_metrics=train.order_digest)  # ctx: the batch order, per epoch
    return hf.fit_predict(ctx, trainer, test)  # ctx: was trainer.train(); trainer.evaluate()
