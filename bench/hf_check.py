#!/usr/bin/env python3
"""Checks that our Hugging Face exports load in transformers and compute our embeddings.

Outside CI (it needs torch and transformers). For each case it trains a tiny run with the
`ssl` binary on an embedded sample, writes `ssl embed` embeddings of the first rows, loads
`RUN/hf` with transformers (`ViTModel` + `AutoImageProcessor`, `BertModel` + the exported
`tokenizer.json`), runs the same rows through it from the raw image bytes and captions, and
compares the embeddings with ours (largest absolute difference; pass below --tol).

Cases:
  vision-mae-cls      ssl pretrain vision (MAE, class-token pooling), fashion-MNIST sample
  vision-simclr-mean  ssl pretrain vision (SimCLR, mean pooling), fashion-MNIST sample
  clip-image          ssl pretrain multimodal, emoji sample: RUN/hf/vision + visual_projection
  clip-text           the same run: RUN/hf/text + text_projection
  text-mlm            ssl pretrain text (MLM), licence-text sample: ssl-text's RUN/hf
                      (a BertForMaskedLM directory) read as a BertModel, mean pooling
  vision-resize       (information, not a pass/fail case) the MAE run embedding images
                      resized 28 -> 20: our decoder's resize (the image crate's triangle
                      filter) against the processor's (PIL bilinear)

Usage (from the repository root; a python with torch, transformers, pyarrow, pillow):
  cargo build -p ssl-cli
  bench/.venv/bin/python bench/hf_check.py [--ssl target/debug/ssl] [--rows 32]
"""

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib

import numpy as np
import pyarrow.parquet as pq
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoImageProcessor, BertModel, ViTModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "crates", "ssl-cli", "data")


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def ours(path, n):
    """The first n (id, embedding) rows of an `ssl embed` file."""
    t = pq.read_table(path)
    ids = t.column("id").to_pylist()[:n]
    emb = np.array(t.column("embedding").to_pylist()[:n], dtype=np.float32)
    return ids, torch.from_numpy(emb)


def image_bytes(v):
    return v["bytes"] if isinstance(v, dict) else v


def images_of(data, n, column="image", mode=None):
    """The first n images of a Parquet file as PIL images. `mode`: converted to it first
    (our decoder drops an alpha channel; transformers' convert_to_rgb composites it on white,
    so RGBA images are given as RGB, alpha dropped, to match)."""
    col = pq.read_table(data, columns=[column]).column(column).to_pylist()[:n]
    out = []
    for v in col:
        img = Image.open(io.BytesIO(image_bytes(v)))
        img.load()
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
        out.append(img)
    return out


def check_metadata(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta and meta.get("format") == "pt", f"{path}: metadata {meta}"
    mode = os.stat(path).st_mode & 0o777
    return oct(mode)


def vit_features(hf, images):
    """Pooled ViTModel features (as ssl_pooling says) of PIL images, and the load report."""
    model, info = ViTModel.from_pretrained(hf, add_pooling_layer=False, output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{hf}: loading reported {bad}"
    proc = AutoImageProcessor.from_pretrained(hf)
    conf = json.load(open(os.path.join(hf, "config.json")))
    if conf["num_channels"] == 1:
        arrays = [np.asarray(img)[:, :, None] for img in images]
        pixels = proc(images=arrays, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    else:
        pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        h = model(pixel_values=pixels).last_hidden_state
    pooled = h[:, 0] if conf["ssl_pooling"] == "cls" else h[:, 1:].mean(1)
    return pooled, type(proc).__name__, tuple(pixels.shape)


def bert_features(hf, captions, max_seq_len=None):
    """Mean-pooled BertModel features of texts wrapped as ours: [CLS] + at most
    max_seq_len - 2 tokens + [SEP] (max_seq_len: config.json's ssl_max_seq_len by default)."""
    model, info = BertModel.from_pretrained(hf, add_pooling_layer=False, output_loading_info=True)
    model.eval()
    # A masked-LM directory's head (cls.*) is not part of a BertModel.
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys", []) if not k.startswith("cls.")]
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{hf}: loading reported {bad}"
    conf = json.load(open(os.path.join(hf, "config.json")))
    tok = Tokenizer.from_file(os.path.join(hf, "tokenizer.json"))
    cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    room = (max_seq_len or conf["ssl_max_seq_len"]) - 2
    seqs = [[cls] + tok.encode(c, add_special_tokens=False).ids[:room] + [sep] for c in captions]
    t = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def compare(name, a, b, tol, extra, info=False):
    d = (a - b).abs().max().item()
    scale = b.abs().max().item()
    ok = d <= tol
    verdict = "INFO" if info else ("PASS" if ok else "FAIL")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    print(f"{name:<20} rows {a.shape[0]:>3}  dim {a.shape[1]:>3}  max|ours - transformers| {d:.2e}"
          f"  (max|ours| {scale:.2f}, 1 - min cosine {1 - cos:.1e})  {verdict}  {extra}", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ssl", default=os.path.join(ROOT, "target", "debug", "ssl"))
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "hf-check"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()
    if os.path.isdir(a.work):
        shutil.rmtree(a.work)
    os.makedirs(a.work)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {platform.processor() or platform.machine()}")
    results = []
    n = a.rows

    fashion = os.path.join(SAMPLES, "fashion_mnist_sample.parquet")
    small_vit = ["--set", "model.dim=64", "--set", "model.depth=3", "--set", "model.heads=4"]
    for name, sets in [
        ("vision-mae-cls", ["--set", "task.kind=mae", "--set", "model.pooling=cls"]),
        ("vision-simclr-mean", ["--set", "task.kind=simclr", "--set", "model.pooling=mean"]),
    ]:
        out = os.path.join(a.work, name)
        run([a.ssl, "pretrain", "vision", "--data", fashion, "--out", out,
             "--set", f"train.max_steps={a.steps}", "--set", "train.batch_size=32"] + small_vit + sets)
        emb = os.path.join(a.work, name + ".parquet")
        run([a.ssl, "embed", "vision", "--checkpoint", out, "--data", fashion, "--out", emb])
        ids, e = ours(emb, n)
        hf = os.path.join(out, "hf")
        mode = check_metadata(os.path.join(hf, "model.safetensors"))
        f, proc, shape = vit_features(hf, images_of(fashion, n))
        results.append(compare(name, e, f, a.tol, f"[{proc}, pixels {shape}, model.safetensors {mode}]"))

    # Information: the same encoder on images both sides resize (a model trained at 20x20).
    name = "vision-resize"
    out = os.path.join(a.work, name)
    run([a.ssl, "pretrain", "vision", "--data", fashion, "--out", out, "--set", "data.resize=[20,20]",
         "--set", "model.patch_size=4", "--set", f"train.max_steps={a.steps}", "--set", "train.batch_size=32"]
        + small_vit)
    emb = os.path.join(a.work, name + ".parquet")
    run([a.ssl, "embed", "vision", "--checkpoint", out, "--data", fashion, "--out", emb])
    _, e = ours(emb, n)
    f, proc, shape = vit_features(os.path.join(out, "hf"), images_of(fashion, n))
    compare(name, e, f, a.tol, f"[{proc}, pixels {shape}]", info=True)

    emoji = os.path.join(SAMPLES, "emoji_sample.parquet")
    out = os.path.join(a.work, "clip")
    run([a.ssl, "pretrain", "multimodal", "--data", emoji, "--out", out,
         "--set", f"train.max_steps={a.steps}", "--set", "train.batch_size=32",
         "--set", "data.resize=[]", "--set", "model.image.patch_size=8"])
    hf = os.path.join(out, "hf")
    proj = load_file(os.path.join(hf, "projections.safetensors"))
    modes = [check_metadata(os.path.join(hf, p)) for p in
             ("vision/model.safetensors", "text/model.safetensors", "projections.safetensors")]
    emb = os.path.join(a.work, "clip-image.parquet")
    run([a.ssl, "embed", "multimodal", "--checkpoint", out, "--data", emoji, "--out", emb])
    _, e = ours(emb, n)
    f, proc, shape = vit_features(os.path.join(hf, "vision"), images_of(emoji, n, mode="RGB"))
    f = torch.nn.functional.normalize(f @ proj["visual_projection.weight"].T, dim=-1)
    results.append(compare("clip-image", e, f, a.tol, f"[{proc}, pixels {shape}, modes {set(modes)}]"))
    emb = os.path.join(a.work, "clip-text.parquet")
    run([a.ssl, "embed", "multimodal", "--checkpoint", out, "--data", emoji, "--out", emb,
         "--set", "embed.tower=text"])
    _, e = ours(emb, n)
    captions = pq.read_table(emoji, columns=["caption"]).column("caption").to_pylist()[:n]
    f = bert_features(os.path.join(hf, "text"), captions)
    f = torch.nn.functional.normalize(f @ proj["text_projection.weight"].T, dim=-1)
    results.append(compare("clip-text", e, f, a.tol, "[BertModel + tokenizer.json]"))

    licences = os.path.join(SAMPLES, "spdx_licenses_sample.parquet")
    out = os.path.join(a.work, "text-mlm")
    run([a.ssl, "pretrain", "text", "--data", licences, "--out", out,
         "--set", f"train.max_steps={a.steps}", "--set", "train.batch_size=16",
         "--set", "tokenizer.train.vocab_size=1000"])
    emb = os.path.join(a.work, "text-mlm.parquet")
    run([a.ssl, "embed", "text", "--checkpoint", out, "--data", licences, "--out", emb])
    _, e = ours(emb, n)
    with open(os.path.join(out, "config.toml"), "rb") as f:
        conf = tomllib.load(f)
    assert conf["embed"]["pooling"] == "mean" and conf["embed"]["layer"] == -1, conf["embed"]
    hf = os.path.join(out, "hf")
    mode = check_metadata(os.path.join(hf, "model.safetensors"))
    texts = pq.read_table(licences, columns=["text"]).column("text").to_pylist()[:n]
    f = bert_features(hf, texts, conf["input"]["max_seq_len"])
    results.append(compare("text-mlm", e, f, a.tol, f"[BertModel, model.safetensors {mode}]"))

    print(f"{sum(results)} of {len(results)} cases within {a.tol:g}")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
