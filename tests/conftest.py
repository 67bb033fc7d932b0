"""Shared fixtures: tiny random models for mechanics, paths to the real data and models for results."""

import copy
import csv
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# --dtype auto is float32 in tests whatever the CPU (bf16 where it is faster would change results by machine);
# tests of the automatic choice pass their own probe. No test reads or writes the per-machine probe cache.
os.environ.setdefault("PEFTKIT_AUTO_DTYPE", "float32")
os.environ.setdefault("PEFTKIT_PRECISION_CACHE", "0")

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA_TINY = DATA / "instruct" / "alpaca_tiny_100.json"


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test leaves torch's thread count as it found it: a test (or a module fixture) that pins one thread would
    otherwise run every later test single-threaded, slower and unlike a user's process."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def tiny_llama(vocab_size: int = 128, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama-architecture model: same module names as SmolLM2, seconds to build."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    """GPT-2 (Conv1D layers with W stored as in x out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def save_tiny_lm(folder: Path, vocab_size: int = 384) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the tiny Alpaca file, saved as a Hugging Face
    folder (what --model takes). A small vocabulary keeps the output head, and so every step, cheap."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    records = json.loads(ALPACA_TINY.read_text())
    bpe.train_from_iterator([r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in records], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>")
    model = tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer saved as a model folder, built once per module."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (converted once into the peftkit cache)."""
    import peftkit

    return peftkit.load_model("smollm2-135m")


# ---------------------------------------------------------------------------------------------------------------
# Learning: the real MiniLM on real SST-2 sentences (shared by the method tests)


@pytest.fixture(scope="module")
def minilm():
    """The real MiniLM-L6 with a seeded classification head, loaded once per module; tests deep-copy it."""
    import peftkit

    torch.manual_seed(0)  # the classifier head is freshly initialised
    return peftkit.load_model("minilm-l6", task="seq-cls")


def adamw_steps(pm, steps: int, lr: float, batch_at) -> list[float]:
    """``steps`` AdamW steps on ``pm``'s trainable parameters, step i on the inputs ``batch_at(i)`` (a dict of model
    arguments, labels included); the per-step losses (the model is left in eval mode)."""
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for step in range(steps):
        loss = pm(**batch_at(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


def sst2(n: int, balanced: bool) -> tuple[list[str], torch.Tensor]:
    """``n`` SST-2 training sentences and labels (GLUE's TSV: no quoting).

    ``balanced``: the first ``n / 2`` positive and ``n / 2`` negative sentences, alternating, so every batch is
    balanced and the loss cannot fall by learning the class prior alone; else simply the first ``n``.
    """
    with open(DATA / "glue" / "SST-2" / "train.tsv", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        if not balanced:
            rows = [next(reader) for _ in range(n)]
            return [s for s, _ in rows], torch.tensor([int(label) for _, label in rows])
        by_label: dict[str, list[str]] = {"0": [], "1": []}
        for sentence, label in reader:
            by_label[label].append(sentence)
            if min(len(v) for v in by_label.values()) >= n // 2:
                break
    texts = [s for pair in zip(by_label["1"][: n // 2], by_label["0"][: n // 2]) for s in pair]
    return texts, torch.tensor([1, 0] * (n // 2))


def train_sst2(pm, tokenizer, lr: float, balanced: bool, steps: int = 30, batch: int = 16, sentences: int = 160):
    """A few epochs of AdamW over ``sentences`` SST-2 sentences (max 32 tokens); returns the per-step losses."""
    texts, labels = sst2(sentences, balanced)
    torch.manual_seed(0)  # dropout

    def batch_at(step: int) -> dict:
        i = step % (sentences // batch) * batch
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=32, return_tensors="pt")
        return {**enc, "labels": labels[i : i + batch]}

    return adamw_steps(pm, steps, lr, batch_at)


def assert_learns_and_reloads(
    tmp_path, minilm, config, lr: float, balanced: bool, steps: int = 30, sentences: int = 160
) -> list[float]:
    """Only the method's parameters train (the seeded classifier head stays frozen: no SEQ_CLS task type), so a
    falling loss (mean of the last 5 steps < 0.9 x the first 5) is the method's doing; then the saved adapter, loaded
    into a fresh copy of the base, gives the trained model's logits (<= 1e-6)."""
    import peftkit

    base, tokenizer = minilm
    pm = peftkit.get_peft_model(copy.deepcopy(base), config)
    assert all("classifier" not in n for n, p in pm.named_parameters() if p.requires_grad)
    losses = train_sst2(pm, tokenizer, lr, balanced, steps=steps, sentences=sentences)
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.9 * first, losses
    texts, _ = sst2(24, balanced)
    enc = tokenizer(texts[-8:], padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = pm(**enc).logits
    pm.save_pretrained(tmp_path)
    fresh = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert (fresh(**enc).logits - trained).abs().max().item() <= 1e-6
        assert (base(**enc).logits - trained).abs().max().item() > 1e-3
    return losses


def start_server_process(args: list[str]) -> tuple["subprocess.Popen", str]:
    """``python -m peftkit.serve ARGS --port P`` as a child on a free port, once its /health answers: (process, url).
    The caller terminates the process."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:  # a free port for the child (released just before it binds)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "peftkit.serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                time.sleep(0.3)
    except BaseException:
        proc.kill()
        raise

