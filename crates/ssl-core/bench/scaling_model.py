"""Paper model of data-parallel scaling for base-size BERT and MAE ViT-B: gradient bytes per
step, ring all-reduce time at 100 and 400 Gbit/s, compute time per step, and the per-GPU batch
at which the all-reduce would hide behind the backward pass. Standard library only.

    python3 crates/ssl-core/bench/scaling_model.py

Assumptions (edit below): f32 gradients (4 bytes; bf16 halves the all-reduce), one all-reduce
of all gradients per step (no overlap), ring all-reduce moving 2 (N-1)/N of the bytes through
each link plus 2 (N-1) hops of latency ALPHA, training FLOPs = 6 x parameters x tokens
processed (plus attention), GPUs sustaining EFFICIENCY of their dense bf16 peak.
"""

ALPHA = 5e-6  # per-hop latency of the ring, seconds
EFFICIENCY = 0.4
GPUS = {"A100 (312 TFLOP/s bf16)": 312e12, "H100 (989 TFLOP/s bf16)": 989e12}
LINKS = {"100 Gbit/s": 100e9 / 8, "400 Gbit/s": 400e9 / 8}
RANKS = [8, 64, 512]


def bert_base(batch, seq=128):
    params, layers, d = 110e6, 12, 768
    tokens = batch * seq
    # Dense: 6 N per token; attention scores and mixing: 12 L s d per token (fwd + bwd).
    return params, 6 * params * tokens + 12 * layers * seq * d * tokens


def mae_vit_b(batch, image=224, patch=16, mask=0.75):
    enc, dec = 86e6, 26e6  # ViT-B/16 encoder; 8 x 512 decoder
    n = (image // patch) ** 2
    visible = int(n * (1 - mask)) + 1
    flops = 6 * enc * visible + 6 * dec * (n + 1)
    flops += 12 * 12 * visible * 768 * visible + 12 * 8 * (n + 1) * 512 * (n + 1)
    return enc + dec, flops * batch


def ring_seconds(nbytes, ranks, bandwidth):
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * ALPHA


def main():
    for name, model, batch in [("BERT-base MLM, seq 128", bert_base, 32),
                               ("MAE ViT-B/16, 224 px, mask 0.75", mae_vit_b, 64)]:
        params, flops = model(batch)
        grad_bytes = 4 * params
        print(f"\n{name}: {params / 1e6:.0f}M parameters, gradients {grad_bytes / 1e6:.0f} MB/step (f32), "
              f"{flops / 1e12:.2f} TFLOP per GPU-step at batch {batch} per GPU")
        for gpu, peak in GPUS.items():
            compute = flops / (peak * EFFICIENCY)
            print(f"  {gpu}: compute {1e3 * compute:.1f} ms/step")
            for link, bw in LINKS.items():
                cells = []
                for n in RANKS:
                    comm = ring_seconds(grad_bytes, n, bw)
                    # Batch per GPU at which compute equals the all-reduce (full overlap possible).
                    need = batch * comm / compute
                    eff = compute / (compute + comm)
                    cells.append(f"N={n}: all-reduce {1e3 * comm:.1f} ms, "
                                 f"scaling eff. {100 * eff:.0f}% (no overlap), hide at batch >= {need:.0f}")
                print(f"    {link}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
