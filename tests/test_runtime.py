"""attention() inside torch.compile (fullgraph, dynamic shapes) and CUDA graphs."""

import pytest
import torch
import torch._dynamo.testing

from fgattn_gen import KeySet, attention, reference_attention

HEADS, HEAD_DIM = 2, 64


def _layer(x, wq, wk, wv, keys):
    """A self-attention layer body: projections, fgattn, merge heads. x: [B, S, H*D]."""
    split = lambda t: t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)  # noqa: E731
    return attention(split(x @ wq), split(x @ wk), split(x @ wv), keys).transpose(1, 2).flatten(-2)


def _inputs(seq: int, device, gen, block_m: int = 32):
    x = torch.randn(1, seq, HEADS * HEAD_DIM, generator=gen).to(device, torch.float16)
    w = [(torch.randn(HEADS * HEAD_DIM, HEADS * HEAD_DIM, generator=gen) * 0.05).to(device, torch.float16)
         for _ in range(3)]
    mask = torch.rand(1, HEADS, -(-seq // block_m), seq, generator=gen) < 0.5
    return x, w, KeySet.from_mask(mask.to(device), block_m=block_m)


def test_compile_fullgraph_dynamic_no_recompile(gen, device):
    """One graph for three sequence lengths: a new length recompiles nothing around the op."""
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(_layer, backend=counter, fullgraph=True, dynamic=True)
    for seq in (100, 150, 230):
        x, w, keys = _inputs(seq, device, gen)
        torch.testing.assert_close(compiled(x, *w, keys), _layer(x, *w, keys), atol=0, rtol=0)
    assert counter.frame_count == 1


@pytest.mark.gpu
def test_compile_inductor_fullgraph(gen):
    x, w, keys = _inputs(1500, "cuda", gen, block_m=128)
    compiled = torch.compile(_layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, *w, keys), _layer(x, *w, keys), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_layer(gen):
    x, w, keys = _inputs(2001, "cuda", gen, block_m=128)
    _layer(x, *w, keys)  # warm up: compile kernels, load the registry outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _layer(x, *w, keys)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _layer(x, *w, keys)
    x.copy_(torch.randn(x.shape, generator=gen).to(x.dtype))  # new input, same buffers
    graph.replay()
    split = lambda t: t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)  # noqa: E731
    ref = reference_attention(split(x @ w[0]), split(x @ w[1]), split(x @ w[2]), keys).transpose(1, 2).flatten(-2)
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=5e-3)
