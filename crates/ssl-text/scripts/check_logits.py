"""Compare our MLM logits with transformers' on the same input (not run in CI).

1. Export a model (e.g. `ssl pretrain text ...` writes RUN/hf), then
   cargo run --release -p ssl-text --example hf_logits -- RUN/hf ours.json "some text" "more text"
2. python check_logits.py RUN/hf ours.json
Loads RUN/hf with transformers.BertForMaskedLM.from_pretrained (eval mode), runs the same
input_ids / attention_mask and prints the max absolute difference of the logits at real tokens.
"""
import json, sys
import numpy as np
import torch
from transformers import BertForMaskedLM

model_dir, ours_path = sys.argv[1], sys.argv[2]
ours = json.load(open(ours_path))
model = BertForMaskedLM.from_pretrained(model_dir)
model.eval()
ids = torch.tensor(ours["input_ids"])
att = torch.tensor(ours["attention_mask"])
with torch.no_grad():
    ref = model(input_ids=ids, attention_mask=att).logits.numpy()
mine = np.array(ours["logits"], dtype=np.float32).reshape(ref.shape)
real = att.numpy().astype(bool)
diff = np.abs(ref - mine)[real]
print(json.dumps({"model": model_dir, "shape": list(ref.shape), "max_abs_diff": float(diff.max()),
                  "mean_abs_diff": float(diff.mean()), "max_abs_logit": float(np.abs(ref[real]).max()),
                  "argmax_agreement": float((ref.argmax(-1) == mine.argmax(-1))[real].mean())}))
