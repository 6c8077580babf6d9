"""cmr.threads: the numeric libraries' thread pools are capped in the calling process."""

import numpy as np
import pytest


def test_limit_native_threads_caps_blas_openmp_and_torch():
    import faiss  # noqa: F401  (its OpenBLAS and libgomp must be capped too)
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from cmr.threads import limit_native_threads

    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restore the pools afterwards: other tests share the process
        try:
            out = limit_native_threads(1)
            assert {i["num_threads"] for i in threadpool_info()} == {1}
            assert torch.get_num_threads() == 1 and out["torch"] == 1 and out["faiss"] == 1
            a = np.random.default_rng(0).normal(size=(64, 64))
            np.testing.assert_allclose(a @ np.eye(64), a)  # still computes
        finally:
            torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        limit_native_threads(0)
