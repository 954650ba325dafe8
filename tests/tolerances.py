"""Named tolerances for float comparisons in the tests, each with the arithmetic it rests on.

Bitwise equality is asserted only where the same kernels run on the same shapes (same inputs,
dtype, tensor shapes and device). Anything else (padded vs unpadded, batched vs alone,
chunked vs whole, ONNX vs PyTorch, a float64 NumPy reference vs float32 torch) rounds
differently and is compared within one of these bounds, or a local one derived next to it.

Imported as a plain module, like ``compare_tables`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import math

import numpy as np

EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16
EPS32 = float(np.finfo(np.float32).eps)  # 1.2e-7
EPS16 = float(np.finfo(np.float16).eps)  # 9.8e-4: one ulp of float16 in [1, 2)

#: Attention weights (float32, in [0, 1]) of one window under another batch shape (padding,
#: batch size, batch_tokens, one-at-a-time): padded keys get exactly 0 (exp underflow), but
#: every matmul of the forward pass sums its d ≤ 384 terms in a shape-dependent order, so each
#: layer's outputs move by a few eps32 relative, and the softmax turns a logit error δ into a
#: weight error ≤ w·2δ. Layers compound it: seen ≤ 2.2e-6 (MiniLM, 6 layers, 101-token long
#: window beside short ones; GPT-2 test model, 3 layers), so 1e-5 is a 4-5x margin, and
#: still far below the differences between heads or documents.
ATTENTION_ATOL = 1e-5

#: Head statistics (float32) from such weights: sums of n weights that add to 1. torch sums
#: pairwise, |err| ≤ log2(n)·eps32·Σ|w| ≈ 9·1.2e-7 ≈ 1.1e-6 for n ≤ 512, on top of the weights'
#: own (≤ ATTENTION_ATOL, and mostly averaging out over a row): seen ≤ 1.5e-6 for every
#: statistic in the padding tests; entropy (≤ log 512 ≈ 6.2) alike, as each term w·log w
#: carries the error of w times |1 + log w|. Statistics in tokens (mean_distance) carry up to
#: n times that (seen 2.4e-6 at n = 101) and are compared divided by n in ``compare_tables``.
STAT_ATOL = 1e-5

#: Float16 storage of weights in [0, 1] (``full`` attention mode): one float16 ulp there is
#: ≤ 2^-11 ≈ 4.9e-4, and two values within ATTENTION_ATOL may round to neighbouring float16
#: values: |Δ| ≤ 1 ulp + ATTENTION_ATOL < 1e-3.
FLOAT16_ATOL = 1e-3

#: The same shards and batch shapes run by another engine or process (Ray actors vs the local
#: engine, a resume on the other engine): the same kernels on the same shapes, except the
#: intra-op thread count (Ray workers set their own), which may split a reduction differently:
#: a few eps32 of values ≲ 10 (mean_distance in tokens, MDS coordinates), so 1e-6, not bitwise.
ENGINE_ATOL = 1e-6

#: The streaming reduction (``pipelines.compute.streaming``) against the stacked path on the
#: same probabilities on the CPU: row terms from the same kernels, but each block's float32
#: row sum is added in float64 against the stacked path's pairwise float32 sum over the
#: window, whose own error is at most about (log2(S) + 1) eps32 of the sum of its terms, and
#: einsum terms may round a few ulps differently under another leading shape:
#: (log2(512) + 2) eps32 ≈ 1.3e-6 of max(1, |value|).
STREAM_RTOL = (math.log2(512) + 2) * EPS32
