"""The randomized SVD with capturable=True recorded in a CUDA graph: each replay on new matrices
gives what the eager call gives on them (the model's value-basis update inside the training
step's graph relies on it)."""
import pytest
import torch

from mla_kernels import svd


@pytest.mark.parametrize("batch, m, n, rank", [(12, 192, 64, 32), (3, 33, 70, 9), (2, 256, 768, 56)],
                         ids=lambda v: str(v))
def test_capturable_svd_replays_like_eager(batch, m, n, rank):
    l = svd.sketch_width(rank, 8, m, n)
    omega = torch.randn(n, l, device="cuda")
    static = torch.randn(batch, m, n, device="cuda")
    svd.top_left_singular_vectors(static, rank, omega=omega, capturable=True)  # compile before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        U_graph = svd.top_left_singular_vectors(static, rank, omega=omega, capturable=True)
    for _ in range(3):
        static.copy_(torch.randn(batch, m, n, device="cuda"))
        U_graph.fill_(float("nan"))
        graph.replay()
        U = svd.top_left_singular_vectors(static, rank, omega=omega, capturable=True)
        torch.testing.assert_close(U_graph, U, rtol=0, atol=0)
        eye = torch.eye(rank, device="cuda")
        assert (U.mT @ U - eye).abs().max() <= 1e-4
