"""``python -m model make-checkpoint`` and ``python -m model generate`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from model.generate import greedy_generate
from model.loader import load_model

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "model", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_make_checkpoint_then_generate(tmp_path):
    out = tmp_path / "ckpt"
    made = run_cli(
        "make-checkpoint", "--preset", "tiny", "--layout", "hf", "--seed", "3", "--out", str(out),
        "--num-layers", "3", "--num-experts", "6", "--experts-per-token", "2", "--vocab-size", "2048",
        "--sliding-window", "8",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (3, 6, 2)
    assert (cfg["vocab_size"], cfg["sliding_window"]) == (2048, 8)

    prompt = [5, 17, 300, 9, 42, 1000, 7, 8, 9, 10, 11, 12]
    logits_file = tmp_path / "logits.npy"
    gen = run_cli(
        "generate", "--model", str(out), "--prompt-tokens", ",".join(map(str, prompt)),
        "--max-new-tokens", "6", "--dtype", "float32", "--logits-out", str(logits_file),
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    tokens = json.loads(gen.stdout.strip().splitlines()[-1])["tokens"]
    expected, prefill = greedy_generate(load_model(out, dtype=torch.float32), prompt, 6)
    assert tokens == expected
    saved = np.load(logits_file)
    assert saved.shape == (len(prompt), 2048) and saved.dtype == np.float32
    assert prefill is not None and np.array_equal(saved, prefill.numpy())


def test_generate_rejects_out_of_vocab_prompt(tiny_checkpoint_dir):
    bad = run_cli("generate", "--model", str(tiny_checkpoint_dir), "--prompt-tokens", "1,999999999")
    assert bad.returncode == 2 and "prompt" in bad.stderr
