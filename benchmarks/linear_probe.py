"""Linear probe of a pretrained base's frozen features on MultiEmo: how much sentiment the features carry.

Splits `multiemo_en_sentences.jsonl` as the recipes do (20% held out, seed 0), embeds 8,000 training and 2,000
held-out sentences with the frozen base (all layers' hidden states concatenated, pooled two ways: last real token,
mean over real tokens) and fits scikit-learn's logistic regression on each. README, "Parameter-efficient fine-tuning".

    python benchmarks/linear_probe.py /tmp/base_emo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import AutoModel, AutoTokenizer

import hf_extras  # noqa: F401  (registers the families)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "multiemo_en_sentences.jsonl"


def features(model, tokenizer, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(last-token, mean) pooled features of every layer's hidden states, concatenated."""
    last, mean = [], []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], truncation=True, max_length=128, padding=True, return_tensors="pt")
        with torch.no_grad():
            states = torch.cat(model(**enc, output_hidden_states=True).hidden_states[1:], dim=-1)
        mask = enc["attention_mask"]
        weights = mask.unsqueeze(-1).to(states.dtype)
        mean.append(((states * weights).sum(1) / weights.sum(1)).numpy())
        positions = torch.arange(mask.shape[1])
        idx = (positions * mask).argmax(-1)  # last real token, for left or right padding
        last.append(states[torch.arange(states.shape[0]), idx].numpy())
    return np.concatenate(last), np.concatenate(mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="a saved hf_extras model folder")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModel.from_pretrained(args.base).eval()
    data = load_dataset("json", data_files=args.data)["train"]
    parts = data.train_test_split(test_size=round(len(data) * 0.2), seed=0, shuffle=True)
    train = parts["train"].shuffle(seed=0).select(range(8000))
    held_out = parts["test"].shuffle(seed=0).select(range(2000))
    labels = sorted(set(data["label"]))
    y_train = np.array([labels.index(label) for label in train["label"]])
    y_eval = np.array([labels.index(label) for label in held_out["label"]])
    train_last, train_mean = features(model, tokenizer, train["text"])
    eval_last, eval_mean = features(model, tokenizer, held_out["text"])
    print(f"majority class: {np.bincount(y_eval).max() / len(y_eval):.3f}")
    for name, x_train, x_eval in (("last token", train_last, eval_last), ("mean", train_mean, eval_mean)):
        scaler = StandardScaler().fit(x_train)
        probe = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
        print(f"{name}: probe accuracy {(probe.predict(scaler.transform(x_eval)) == y_eval).mean():.3f}")


if __name__ == "__main__":
    main()
