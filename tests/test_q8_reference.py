"""tests/q8_reference.py's q_dp4a (the GPU test's reference for ORCD_ATTN_Q8_DP4A) against an
independent computation of what that kernel sums: gguf's Q8_0 levels of the turned q and of the
turned keys, an integer dot product a 32-block, times the two scales (q's kept in float32)."""
import numpy as np
import pytest

from q8_reference import dequant, ggml_q8, q_dp4a, wht32


@pytest.mark.parametrize("D", [64, 96, 128])
def test_q_dp4a_turned_back_gives_the_kernel_s_integer_scores(D):
    pytest.importorskip("gguf")
    rng = np.random.default_rng()
    scale = 1 / np.sqrt(D)
    q = rng.standard_normal((5, 3, D)).astype(np.float32)
    k = rng.standard_normal((5, 3, D)).astype(np.float32)
    k *= rng.choice([1, 1, 1, 8], D).astype(np.float32)  # outlier channels, as the attention test's
    lk, sk = ggml_q8(k)
    lq, _ = ggml_q8(q * np.float32(scale))
    dq = np.abs(wht32(q * np.float32(scale)).reshape(-1, 32)).max(1) / np.float32(127)
    dk = sk.view(np.float16).astype(np.float64).reshape(-1)
    blocks = (lq.reshape(-1, 32).astype(np.int64) * lk.reshape(-1, 32)).sum(1)
    kernel = (blocks * dq * dk).reshape(5, 3, -1).sum(-1)
    # the reference: the NumPy attention's q . k over the turned-back queries and dequantized keys
    ref = (q_dp4a(q, scale, ["attn_dec_g1_n2_q8"]) * dequant(lk, sk)).sum(-1) * scale
    assert np.abs(ref - kernel).max() <= 1e-9 * np.abs(kernel).max()  # float64 rounding: about 4e-16
    # the rounding itself moves scores by 0.4-0.7 % of the largest, past the GPU test's 3e-4 bound:
    # a kernel that rounds q otherwise (or not at all) fails it
    exact = (q.astype(np.float64) * dequant(lk, sk)).sum(-1) * scale
    assert np.abs(exact - kernel).max() > 3e-4 * np.abs(kernel).max()
    assert q_dp4a(q, scale, ["attn_decm_d64"]) is q  # other kernels: the queries as given
