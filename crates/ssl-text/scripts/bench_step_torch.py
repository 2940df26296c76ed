"""One BertForMaskedLM training step (mask, forward, backward, AdamW) in PyTorch/transformers.

Same configuration as `cargo run --release -p ssl-text --example bench_step`:
    python bench_step_torch.py [preset] [batch] [seq_len] [vocab] [steps]
Not run in CI.
"""
import json, sys, time
import torch
from transformers import BertConfig, BertForMaskedLM

PRESETS = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "base": (12, 768)}
a = sys.argv[1:]
preset = a[0] if len(a) > 0 else "mini"
batch = int(a[1]) if len(a) > 1 else 16
seq = int(a[2]) if len(a) > 2 else 128
vocab = int(a[3]) if len(a) > 3 else 8000
steps = int(a[4]) if len(a) > 4 else 10
layers, hidden = PRESETS[preset]
cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                 num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
torch.manual_seed(0)
model = BertForMaskedLM(cfg)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(5, vocab, (batch, seq))
ids[:, 0] = 2
ids[:, -1] = 2
att = torch.ones_like(ids)
times = []
for step in range(steps + 2):
    t0 = time.perf_counter()
    # Masking as DataCollatorForLanguageModeling (15%, 80/10/10), on the fly like ours.
    labels = ids.clone()
    prob = torch.full(ids.shape, 0.15)
    prob[:, 0] = 0
    prob[:, -1] = 0
    sel = torch.bernoulli(prob).bool()
    labels[~sel] = -100
    inp = ids.clone()
    rep = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & sel
    inp[rep] = 4
    rnd = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & sel & ~rep
    inp[rnd] = torch.randint(vocab, ids.shape)[rnd]
    out = model(input_ids=inp, attention_mask=att, labels=labels)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    dt = time.perf_counter() - t0
    if step >= 2:
        times.append(dt)
times.sort()
print(json.dumps({"impl": "transformers %s / torch %s (threads %d)" % (__import__("transformers").__version__, torch.__version__, torch.get_num_threads()),
                  "preset": preset, "batch": batch, "seq_len": seq, "vocab": vocab,
                  "params": sum(p.numel() for p in model.parameters()),
                  "median_step_ms": round(times[len(times) // 2] * 1e3, 1)}))
