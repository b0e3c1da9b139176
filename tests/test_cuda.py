"""The torch reference engine on CUDA tensors gives the CPU's results.

These run only where a GPU is present (not in CI, which has none); the project's GPU
sessions run them on the lent machine and record the outcome in benchmarks/RESULTS.md.
"""
import copy

import pytest
import torch

import fastmeta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _meta_gradient(wrapper, model, batch):
    model.zero_grad()
    for p in wrapper.parameters():
        p.grad = None
    loss = wrapper(*batch)
    loss.backward()
    return loss.detach().cpu(), [p.grad.detach().cpu() for p in wrapper.parameters()]


def _classification_batch(device, tasks=3, ways=3, shots=2, size=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, ways * shots, 1, size, size, generator=generator, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    return [t.to(device) for t in (x, y, x.flip(1), y.flip(1))]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil"])
def test_conv4_meta_gradient_matches_cpu(algorithm):
    torch.manual_seed(0)
    model = fastmeta.models.conv4(in_channels=1, n_way=3, hidden=8, image_size=16).double()
    results = []
    for device in ("cpu", "cuda"):
        net = copy.deepcopy(model).to(device)
        kwargs = dict(inner_steps=2, loss="cross_entropy", backend="torch")
        wrapper = {
            "maml": lambda: fastmeta.MAML(net, 0.1, **kwargs),
            "fomaml": lambda: fastmeta.MAML(net, 0.1, first_order=True, **kwargs),
            "metasgd": lambda: fastmeta.MetaSGD(net, 0.1, **kwargs),
            "anil": lambda: fastmeta.ANIL(net, None, 0.1, **kwargs),
        }[algorithm]().to(device)
        results.append(_meta_gradient(wrapper, net, _classification_batch(device)))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-10, atol=0)
    for g_cpu, g_gpu in zip(cpu_grads, gpu_grads):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-8, atol=1e-12)


def test_sinusoid_maml_and_reptile_on_cuda():
    torch.manual_seed(0)
    model = fastmeta.models.mlp([1, 40, 40, 1]).double()
    batch = fastmeta.data.Sinusoid(k_shot=10, q_query=10, seed=1, dtype=torch.float64).sample(25)
    results = []
    for device in ("cpu", "cuda"):
        net = copy.deepcopy(model).to(device)
        data = [t.to(device) for t in batch[:4]]
        maml = fastmeta.MAML(net, 0.01, inner_steps=3, backend="torch")
        maml_result = _meta_gradient(maml, net, data)
        reptile = fastmeta.Reptile(net, 0.01, inner_steps=5, backend="auto")
        reptile_result = _meta_gradient(reptile, net, data[:2])
        results.append((maml_result, reptile_result))
    for (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) in zip(*results):
        torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-10, atol=0)
        for g_cpu, g_gpu in zip(grads_cpu, grads_gpu):
            torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-8, atol=1e-12)


def test_nan_on_cuda_is_reported_with_task_index():
    model = fastmeta.models.mlp([1, 8, 1]).cuda()
    batch = [t.cuda() for t in fastmeta.data.Sinusoid(seed=2).sample(4)[:4]]
    batch[0][2, 3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="support_x.*task 2"):
        fastmeta.MAML(model, 0.01, backend="torch")(*batch)
