"""The default sizes of each suite per device, and `--quick`.

A shape is a dict: `dtype`, `N` (tokens), `V` (vocabulary), and per suite `H`, `H_teacher` (fused_linear,
training_step), `B` (pairs), `T` (tokens per row), `layers` (training_step).

CUDA (the issue's sweep): V in {32000, 128256, 151936, 256000} × N in {1024, 4096, 8192}, bfloat16; plus
float32 at N = 4096 for the logits ops; fused-linear at H = H_t = 4096 (Liger's published configuration is
N = 8192, H = 4096, V = 128256); the training step of a 4-layer model, H = 1024 / H_t = 2048, V = 128256,
B = 4 pairs × T = 1024 (8192 tokens).

CPU (2 cores, 24 GiB, about 10 minutes in all): the four vocabularies at N = 128 and N in {128, 512, 2048} at
V = 32000, bfloat16, plus float32 at N = 2048, V = 32000 (the CPU target shape of docs/design.md §7); fused-linear at
N = 256, H = H_t = 128, V in {32000, 128256} (N / H = 2 as in Liger's GPU configuration, so that the O(N·V)
logits, not the O(V·H) weight gradients, dominate the baselines' memory as they do on the GPU); the objective at N = 256 (one pair, T = 128 per half), V in
{32000, 151936}; the training step of a 2-layer model, H = 256 / H_t = 512, V = 32000, B = 2 pairs × T = 128.

`--quick` (a smoke run, seconds per case on any device): two small vocabularies at N = 64, a one-layer model.
"""

from __future__ import annotations

VOCABS = (32000, 128256, 151936, 256000)

DEFAULTS = {
    "cuda": {
        "skew_divergence": [{"dtype": "bfloat16", "N": n, "V": v} for n in (1024, 4096, 8192) for v in VOCABS]
        + [{"dtype": "float32", "N": 4096, "V": v} for v in VOCABS],
        "fused_linear": [{"dtype": "bfloat16", "N": n, "V": v, "H": 4096, "H_teacher": 4096}
                         for n in (1024, 4096, 8192) for v in VOCABS],
        "objective": [{"dtype": "bfloat16", "N": n, "V": v} for n in (1024, 4096, 8192) for v in VOCABS],
        "training_step": [{"dtype": "bfloat16", "V": 128256, "H": 1024, "H_teacher": 2048, "layers": 4, "B": 4,
                           "T": 1024}],
    },
    "cpu": {
        "skew_divergence": [{"dtype": "bfloat16", "N": 128, "V": v} for v in VOCABS]
        + [{"dtype": "bfloat16", "N": n, "V": 32000} for n in (512, 2048)]
        + [{"dtype": "float32", "N": 2048, "V": 32000}],
        "fused_linear": [{"dtype": "bfloat16", "N": 256, "V": v, "H": 128, "H_teacher": 128} for v in (32000, 128256)],
        "objective": [{"dtype": "bfloat16", "N": 256, "V": v} for v in (32000, 151936)],
        "training_step": [{"dtype": "bfloat16", "V": 32000, "H": 256, "H_teacher": 512, "layers": 2, "B": 2,
                           "T": 128}],
    },
    "quick": {
        "skew_divergence": [{"dtype": "bfloat16", "N": 64, "V": v} for v in (1000, 4096)],
        "fused_linear": [{"dtype": "bfloat16", "N": 64, "V": v, "H": 32, "H_teacher": 48} for v in (1000, 4096)],
        "objective": [{"dtype": "bfloat16", "N": 64, "V": v} for v in (1000, 4096)],
        "training_step": [{"dtype": "bfloat16", "V": 1000, "H": 64, "H_teacher": 128, "layers": 1, "B": 2, "T": 32}],
    },
}


def shapes(suite: str, device_type: str, quick: bool = False, dtypes=None, tokens=None, vocabs=None) -> list:
    """The shapes to run: the defaults, with `tokens` (N) and `vocabs` (V) replacing the defaults' values
    (the product of both over the defaults' other dimensions) and filtered to `dtypes`."""
    base = DEFAULTS["quick" if quick else device_type][suite]
    result = []
    for shape in base:
        for n in tokens or [shape.get("N")]:
            for v in vocabs or [shape["V"]]:
                candidate = dict(shape, V=v)
                if "N" in shape:
                    candidate["N"] = n
                if candidate not in result and (not dtypes or candidate["dtype"] in dtypes):
                    result.append(candidate)
    return result
