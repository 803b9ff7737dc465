"""Lesson 2's numerics: hand-written backprop equals finite differences and torch autograd, and training helps."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

from kiln.lessons import numpy_network as net
from kiln.lessons.catalog import LessonContext
from kiln.lessons.narrate import Narrator

SMALL = net.Settings(context=3, embed=4, hidden=7)
VOCAB = 11


@pytest.fixture
def small_problem():
    """A small float64 network with every weight of order 1 (so no gradient is trivially zero) and one batch."""
    rng = np.random.default_rng(0)
    params = net.init_params(VOCAB, SMALL, rng, dtype=np.float64)
    params = {name: rng.normal(0.0, 0.7, value.shape) for name, value in params.items()}
    X = rng.integers(0, VOCAB, (16, SMALL.context))  # 48 lookups of 11 rows: characters repeat in the batch
    Y = rng.integers(0, VOCAB, 16)
    return params, X, Y


def test_make_examples_slides_a_window():
    X, Y = net.make_examples([0, 1, 2, 3, 4], context=2)
    assert X.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert Y.tolist() == [2, 3, 4]


def test_neuron_and_its_gradient():
    x, w, b = np.array([0.5, -1.0, 2.0]), np.array([0.8, 0.2, -0.5]), 0.1
    assert net.neuron(x, w, b) == pytest.approx(math.tanh(0.5 * 0.8 - 1.0 * 0.2 + 2.0 * -0.5 + 0.1))
    error, d_w, d_b = net.neuron_gradients(x, w, b, target=0.5)
    eps = 1e-6
    for i in range(3):
        step = np.eye(3)[i] * eps
        numeric = (net.neuron_gradients(x, w + step, b, 0.5)[0] - net.neuron_gradients(x, w - step, b, 0.5)[0]) / (
            2 * eps
        )
        assert d_w[i] == pytest.approx(numeric, rel=1e-7)
    numeric_b = (net.neuron_gradients(x, w, b + eps, 0.5)[0] - net.neuron_gradients(x, w, b - eps, 0.5)[0]) / (2 * eps)
    assert d_b == pytest.approx(numeric_b, rel=1e-7)
    assert net.neuron_gradients(x, w - 0.5 * d_w, b - 0.5 * d_b, 0.5)[0] < error


def test_cross_entropy_is_stable_and_starts_at_ln_v():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    assert net.cross_entropy(logits, np.array([0, 2])) == pytest.approx(math.log(3) / 2)
    rng = np.random.default_rng(1)
    params = net.init_params(65, net.Settings(), rng)
    X = rng.integers(0, 65, (500, 5))
    assert net.cross_entropy(net.forward(params, X)[0], rng.integers(0, 65, 500)) == pytest.approx(
        math.log(65), abs=0.02
    )


def test_every_gradient_equals_central_finite_differences(small_problem):
    params, X, Y = small_problem
    _, grads = net.loss_and_gradients(params, X, Y)
    for name in net.PARAM_NAMES:
        numeric = np.zeros_like(params[name])
        for index in np.ndindex(params[name].shape):
            numeric[index] = net.numerical_gradient(params, X, Y, name, index, eps=1e-6)
        assert np.abs(numeric).max() > 1e-4, name  # every parameter really is exercised
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-9, err_msg=name)


def test_every_gradient_equals_torch_autograd(small_problem):
    torch = pytest.importorskip("torch")
    params, X, Y = small_problem
    loss, grads = net.loss_and_gradients(params, X, Y)
    t = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in params.items()}
    flat = t["E"][torch.tensor(X)].reshape(len(X), -1)
    logits = torch.tanh(flat @ t["W1"] + t["b1"]) @ t["W2"] + t["b2"]
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(Y))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), abs=1e-12)
    for name in net.PARAM_NAMES:
        np.testing.assert_allclose(grads[name], t[name].grad.numpy(), rtol=0, atol=1e-10, err_msg=name)


def test_learning_rate_falls_from_start_to_final():
    settings = net.Settings(steps=100, lr=0.3, lr_final=0.01)
    rates = [net.learning_rate(step, settings) for step in range(settings.steps)]
    assert rates[0] == pytest.approx(0.3) and rates[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_sgd_on_one_batch_lowers_its_loss(small_problem):
    params, X, Y = small_problem
    before, grads = net.loss_and_gradients(params, X, Y)
    net.sgd_step(params, grads, lr=0.1)
    assert net.loss_and_gradients(params, X, Y)[0] < before


def test_one_blas_thread_restores_the_thread_count():
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    with net.one_blas_thread():
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before


def test_lesson_two_needs_no_torch():
    script = "import sys\nimport kiln.lessons.numpy_network\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    subprocess.run([sys.executable, "-c", script], check=True)


def test_quick_run_beats_the_bigram_and_writes_its_loss_curves(tmp_path, mirror):
    context = LessonContext(Narrator(tmp_path, Console(file=io.StringIO(), width=100)), tmp_path, mirror, quick=True)
    result = net.run(context)
    assert result["loss_plot"] == tmp_path / "loss_curves.png"
    assert result["loss_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["initial_heldout_loss"] == pytest.approx(result["uniform_nll"], abs=0.02)
    assert result["gradient_check_relative_error"] < 1e-5
    assert result["heldout_loss"] < result["bigram_heldout_nll"] < result["uniform_nll"]
    assert len(result["sample"]) == 240
