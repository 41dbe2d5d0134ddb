"""Conjugate gradients and the Hessian-free procedure, against NumPy's linear algebra on
problems whose Gauss-Newton matrix is known in closed form; the experiment's smoke run."""
import itertools
import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import hessian_free as experiment
from nets import engines, gradcheck
from tests.helpers import F64, assert_close_tree, assert_refused_before_the_run, random_like
from training import procedures


def spd_system(size=12, seed=0):
    rng = np.random.default_rng(seed)
    root = rng.normal(size=(size, size))
    matrix = root @ root.T + 0.1 * np.eye(size)
    return matrix, rng.normal(size=size), rng.normal(size=size)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_conjugate_gradient_solves_an_spd_system(preconditioned):
    """A 12 x 12 system (condition number 389) to rounding's accuracy, from any start, with or
    without a diagonal preconditioner: n iterations in exact arithmetic; in float64 rounding
    spoils the directions' conjugacy (after 12 iterations x was still 1.5e-6 and 6.5e-7 off,
    relative), and 24 make up for it (1.2e-15 and 1.6e-15). The returned residual is
    |b - A x|."""
    matrix, b, start = spd_system()
    inverse_diagonal = jnp.asarray(1 / np.diag(matrix)) if preconditioned else None
    x, residual, _ = procedures.conjugate_gradient(lambda v: jnp.asarray(matrix) @ v,
                                                   jnp.asarray(b), jnp.asarray(start), 24,
                                                   inverse_diagonal)
    expected = np.linalg.solve(matrix, b)
    assert np.linalg.norm(x - expected) <= F64 * np.linalg.norm(expected)
    assert float(residual) == pytest.approx(np.linalg.norm(b - matrix @ np.asarray(x)),
                                            abs=1e-9 * np.linalg.norm(b))


def test_conjugate_gradient_stays_put_at_a_zero_residual():
    matrix, _, _ = spd_system(4)
    x, residual, taken = procedures.conjugate_gradient(lambda v: jnp.asarray(matrix) @ v,
                                                       jnp.zeros(4), jnp.zeros(4), 3)
    assert np.all(np.asarray(x) == 0) and float(residual) == 0 and int(taken) == 0


def test_conjugate_gradient_stays_finite_where_r_z_underflows():
    """r.z of b ~ 1e-160 flushes to zero while p.A p, A ~ 1e300, does not: no 0/0 (an early
    version made p NaN there, and 0 * NaN spoiled x; Hessian-free steps on the deep sigmoid
    net hit it in float32)."""
    matrix, b, _ = spd_system(4)
    x, residual, _ = procedures.conjugate_gradient(lambda v: 1e300 * (jnp.asarray(matrix) @ v),
                                                   1e-160 * jnp.asarray(b), jnp.zeros(4), 5)
    assert np.all(np.isfinite(np.asarray(x))) and np.isfinite(float(residual))


def numpy_truncated_cg(matrix, b, iterations):
    """Plain conjugate gradients from 0 in NumPy, returning the last iterate before the
    first direction with p.A p <= 0, and the iterations taken."""
    x, r = np.zeros_like(b), b.copy()
    p = r.copy()
    for taken in range(iterations):
        ap = matrix @ p
        if p @ ap <= 0:
            return x, taken
        alpha = (r @ r) / (p @ ap)
        x, r_next = x + alpha * p, r - alpha * ap
        p, r = r_next + (r_next @ r_next) / (r @ r) * p, r_next
    return x, iterations


def test_conjugate_gradient_stops_at_negative_curvature():
    """On an indefinite 12 x 12 matrix (two negative eigenvalues of twelve) the iteration
    stops at the first direction with p.A p <= 0 and returns the iterate before it, as a
    NumPy loop does; on a positive definite one it takes every iteration."""
    rng = np.random.default_rng(4)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    matrix = basis @ np.diag([-3.0, -0.5, *np.linspace(0.5, 8, 10)]) @ basis.T
    b = rng.normal(size=12)
    x, _, taken = procedures.conjugate_gradient(lambda v: jnp.asarray(matrix) @ v,
                                                jnp.asarray(b), jnp.zeros(12), 12)
    expected, expected_taken = numpy_truncated_cg(matrix, b, 12)
    assert 0 < expected_taken < 12 and int(taken) == expected_taken
    np.testing.assert_allclose(x, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    spd, b, start = spd_system()
    *_, taken = procedures.conjugate_gradient(lambda v: jnp.asarray(spd) @ v, jnp.asarray(b),
                                              jnp.asarray(start), 24)
    assert int(taken) == 24


def tanh_net_problem():
    """A 3-3-2 tanh net under squared error plus L2 on 8 examples (float64): (model,
    objective, x, targets, params, flat params, H and g of E from `jax.hessian` and
    `jax.grad`)."""
    model = nets.build_mlp(3, 2, hidden_units=3, activation="tanh", output_activation="tanh")
    objective = nets.Objective(nets.mean_squared_error(), 0.1)
    x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float64)
    targets = jax.random.uniform(jax.random.key(1), (8, 2), jnp.float64, -0.9, 0.9)
    params = gradcheck.astype(model.init(jax.random.key(2), (-1, 3))[1], jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def energy(flat):
        return objective.value(unravel(flat), model.apply(unravel(flat), x), targets)

    hessian, gradient = np.asarray(jax.hessian(energy)(flat)), np.asarray(jax.grad(energy)(flat))
    return model, objective, x, targets, params, flat, hessian, gradient


@pytest.mark.runs_long
def test_a_hessian_step_is_the_damped_newton_step_with_the_exact_hessian():
    """curvature="hessian" on a tanh net, with lambda large enough that H + lambda I is
    positive definite: one step (no preconditioner, 40 iterations from zero) is -(H +
    lambda I)^-1 g with H from `jax.hessian` of E and the solve in NumPy."""
    model, objective, x, targets, params, flat, hessian, gradient = tanh_net_problem()
    damping = 1.0 + max(0.0, -np.linalg.eigvalsh(hessian).min())
    assert np.linalg.eigvalsh(hessian).min() < 0  # G would not be this: H is indefinite here
    procedure = procedures.hessian_free(model, objective, x, targets, cg_iterations=40,
                                        damping=damping, decay=0.0, preconditioner="none",
                                        curvature="hessian")
    state = procedure.init(params, jax.random.key(0))
    new_state, record = jax.jit(procedure.step)(state, 0)
    step = np.linalg.solve(hessian + damping * np.eye(flat.size), -gradient)
    moved = np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0]) - np.asarray(flat)
    assert bool(record["accepted"]) and int(record["cg_iterations"]) == 40
    np.testing.assert_allclose(moved, step, rtol=1e-10, atol=1e-12)


def indefinite_matrix(eigenvalues, seed=4):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return basis @ np.diag(eigenvalues) @ basis.T, rng.normal(size=len(eigenvalues))


def test_lanczos_with_as_many_iterations_as_dimensions_finds_every_eigenvalue():
    """Lanczos on a symmetric indefinite 12 x 12 matrix, 12 iterations: Q orthonormal,
    Q A Q^T the tridiagonal T, and T's eigenvalues A's (NumPy's eigvalsh), to rounding."""
    matrix, start = indefinite_matrix([-3.0, -0.5, *np.linspace(0.5, 8, 10)])
    found = jax.jit(lambda v: procedures.lanczos(lambda u: jnp.asarray(matrix) @ u, v, 12))(
        jnp.asarray(start))
    basis, tridiagonal = np.asarray(found.basis), np.asarray(found.tridiagonal)
    assert int(found.dimension) == 12
    np.testing.assert_allclose(basis @ basis.T, np.eye(12), atol=1e-12)
    np.testing.assert_allclose(basis @ matrix @ basis.T, tridiagonal, atol=1e-12)
    assert np.abs(np.triu(tridiagonal, 2)).max() == 0
    np.testing.assert_allclose(np.linalg.eigvalsh(tridiagonal), np.linalg.eigvalsh(matrix),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_lanczos_stops_where_the_subspace_closes(scale):
    """A with three distinct eigenvalues (each four times): the Krylov subspace of any start
    has dimension 3, so the iteration stops after 3 of 8 steps with those eigenvalues as its
    Ritz values, the later rows of Q and T zero, nothing NaN; from g = 0 the saddle-free step
    is 0 (an empty subspace). The same at every scale of A: the breakdown test is relative
    to |A q| (a threshold of 1e-10 / |A q| missed the closing at 1e8)."""
    matrix, start = indefinite_matrix(np.repeat([-2.0, 1.0, 5.0], 4))
    matrix = scale * matrix
    found = procedures.lanczos(lambda u: jnp.asarray(matrix) @ u, jnp.asarray(start), 8)
    assert int(found.dimension) == 3
    assert np.all(np.asarray(found.basis)[3:] == 0)
    np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(found.tridiagonal)[:3, :3]),
                               scale * np.array([-2.0, 1.0, 5.0]), rtol=1e-10)
    assert np.all(np.asarray(found.tridiagonal)[3:] == 0)
    step = procedures.saddle_free_step(lambda u: jnp.asarray(matrix) @ u, jnp.zeros(12), 0.1, 4)
    assert int(step.dimension) == 0 and np.all(np.asarray(step.direction) == 0)


def test_a_saddle_free_step_in_the_whole_space_is_minus_abs_h_plus_lambda_inverse_g():
    """With as many Lanczos iterations as dimensions, the saddle-free step on an indefinite
    matrix is -(|H| + lambda I)^-1 g, |H| from NumPy's eigendecomposition, and its model
    decrease g.d + d.|H| d / 2; the step descends along the negative eigenvectors, where
    the damped Newton step climbs."""
    eigenvalues = np.array([-3.0, -0.5, *np.linspace(0.5, 8, 10)])
    matrix, g = indefinite_matrix(eigenvalues, seed=5)
    damping = 0.3
    step = procedures.saddle_free_step(lambda u: jnp.asarray(matrix) @ u, jnp.asarray(g),
                                       damping, 12)
    values, vectors = np.linalg.eigh(matrix)
    absolute = vectors @ np.diag(np.abs(values)) @ vectors.T
    want = -np.linalg.solve(absolute + damping * np.eye(12), g)
    np.testing.assert_allclose(step.direction, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(step.model_decrease, g @ want + 0.5 * want @ absolute @ want,
                               rtol=1e-10)
    np.testing.assert_allclose(step.ritz_values, values, rtol=1e-10, atol=1e-12)
    negative = vectors[:, :2]
    newton = -np.linalg.solve(matrix + damping * np.eye(12), g)
    assert np.all((negative.T @ np.asarray(step.direction)) * (negative.T @ g) < 0)
    assert np.all((negative.T @ newton) * (negative.T @ g) > 0)


def test_a_saddle_free_step_of_a_tanh_net_is_numpys_with_the_exact_hessian():
    """curvature="saddle_free" on a tanh net whose H is indefinite, Lanczos over every
    dimension of its 17 parameters: one step is -(|H| + lambda I)^-1 g, H from
    `jax.hessian` of E and |H| from NumPy's eigendecomposition."""
    model, objective, x, targets, params, flat, hessian, gradient = tanh_net_problem()
    values, vectors = np.linalg.eigh(hessian)
    assert values.min() < 0
    damping = 0.5
    procedure = procedures.hessian_free(model, objective, x, targets, cg_iterations=flat.size,
                                        damping=damping, preconditioner="none",
                                        curvature="saddle_free")
    state = procedure.init(params, jax.random.key(0))
    new_state, record = jax.jit(procedure.step)(state, 0)
    absolute = vectors @ np.diag(np.abs(values)) @ vectors.T
    step = -np.linalg.solve(absolute + damping * np.eye(flat.size), gradient)
    moved = np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0]) - np.asarray(flat)
    assert bool(record["accepted"]) and int(record["cg_iterations"]) == flat.size
    np.testing.assert_allclose(moved, step, rtol=1e-10, atol=1e-12)
    newton_residual = np.linalg.norm((hessian + damping * np.eye(flat.size)) @ step + gradient)
    np.testing.assert_allclose(record["cg_residual"],
                               newton_residual / np.linalg.norm(gradient), rtol=1e-8)


def linear_gauss_newton(x, l2):
    """G = J^T J / m + (l2/m) on w of a Dense layer (3 -> 2) under squared error plus L2, for
    inputs x (m, 3), with the params flattened as ravel_pytree orders them: b (2), then w
    (3 x 2) row-major. J, the outputs' (constant) Jacobian, written out in NumPy."""
    m = x.shape[0]
    # y[i, k] = sum_j x[i, j] w[j, k] + b[k]
    jacobian = np.zeros((m, 2, 8))
    for k in range(2):
        jacobian[:, k, k] = 1
        for j in range(3):
            jacobian[:, k, 2 + 2 * j + k] = x[:, j]
    jacobian = jacobian.reshape(m * 2, 8)
    return jacobian.T @ jacobian / m + np.diag([0, 0] + [l2 / m] * 6)


def linear_problem(l2=0.3, n=6, seed=1):
    """A Dense layer under squared error plus L2: E is quadratic, its G (`linear_gauss_newton`)
    its Hessian."""
    rng = np.random.default_rng(seed)
    x, targets = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=2))}
    objective = nets.Objective(nets.mean_squared_error(), l2)
    return nets.Dense(2), objective, params, jnp.asarray(x), jnp.asarray(targets), (
        linear_gauss_newton(x, l2))


@pytest.mark.parametrize("preconditioner", procedures.PRECONDITIONERS)
def test_a_step_on_a_quadratic_is_the_damped_newton_step_and_trusts_the_model(preconditioner):
    """E quadratic with G = its Hessian: 8 conjugate-gradient iterations give d = -(G +
    lambda I)^-1 g (NumPy), the step is taken, rho = 1 exactly, and lambda becomes 2/3 of
    itself."""
    model, objective, params, x, targets, gauss_newton = linear_problem()
    procedure = procedures.hessian_free(model, objective, x, targets, cg_iterations=8,
                                        damping=0.5, preconditioner=preconditioner)
    state = procedure.init(params, jax.random.key(0))
    new_state, record = jax.jit(procedure.step)(state, 0)
    flat, _ = jax.flatten_util.ravel_pytree(params)
    g = np.asarray(jax.flatten_util.ravel_pytree(state.grad)[0])
    expected = np.asarray(flat) - np.linalg.solve(gauss_newton + 0.5 * np.eye(8), g)
    got = np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0])
    assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected)
    assert bool(record["accepted"]) and float(record["rho"]) == pytest.approx(1, abs=1e-12)
    assert float(record["damping"]) == 0.5
    assert float(new_state.opt_state.damping) == pytest.approx(0.5 * 2 / 3)
    energy = objective.value(new_state.params, model.apply(new_state.params, x), targets)
    assert float(new_state.energy) == pytest.approx(float(energy), rel=1e-14)


def test_a_step_that_raises_e_is_refused_and_the_damping_grows():
    """G from one example of six (a rank-3 matrix) and a tiny lambda: d is huge along what
    that example does not see, E rises, and the step is undone (params, energy and gradient
    kept) with lambda * 3/2."""
    model, objective, params, x, targets, _ = linear_problem(l2=0.0)
    procedure = procedures.hessian_free(model, objective, x, targets, cg_iterations=8,
                                        damping=1e-6, curvature_examples=1,
                                        preconditioner="none")
    state = procedure.init(params, jax.random.key(0))
    new_state, record = jax.jit(procedure.step)(state, 0)
    assert not bool(record["accepted"]) and float(record["rho"]) < 0
    assert float(new_state.energy) == float(state.energy)
    for kept, before in zip(jax.tree.leaves((new_state.params, new_state.grad)),
                            jax.tree.leaves((state.params, state.grad))):
        assert np.array_equal(kept, before)
    assert float(new_state.opt_state.damping) == pytest.approx(1.5e-6)


def test_a_run_never_raises_e_and_trains_a_tanh_net():
    """On a non-convex net: every recorded energy at most the one before (steps that would
    raise E are refused), and 30 steps lower E to under a tenth of its start."""
    model = nets.build_mlp(4, 3, hidden_layers=2, hidden_units=6, activation="tanh")
    x = jax.random.normal(jax.random.key(0), (40, 4), jnp.float32)
    labels = jnp.argmax(x[:, :3] + 0.3 * x[:, 3:], axis=1)
    targets = jax.nn.one_hot(labels, 3, dtype=jnp.float32)
    objective = nets.lecture_objective(0.0)
    params = model.init(jax.random.key(1), (-1, 4))[1]
    procedure = procedures.hessian_free(model, objective, x, targets, cg_iterations=10,
                                        curvature_examples=20)
    start = objective.value(params, model.apply(params, x), targets)
    result = jax.jit(lambda p: procedures.run(procedure, p, jax.random.key(0), 30))(params)
    energies = np.asarray(result.history["energy"])
    assert np.all(np.diff(np.concatenate([[float(start)], energies])) <= 0)
    assert energies[-1] < 0.1 * float(start)
    assert set(result.history) >= {"damping", "rho", "accepted", "cg_residual", "cg_iterations"}


def test_a_mini_batch_step_is_the_damped_newton_step_of_one_batch():
    """batch_size=3 of 6 examples: the step is -(G_S + lambda I)^-1 g_S for one of the 20
    three-example subsets S (G_S, g_S in NumPy from S alone), the recorded energy is E on S
    after the step, and the next step draws again."""
    model, objective, params, x, targets, _ = linear_problem(l2=0.3)
    procedure = procedures.hessian_free(model, objective, x, targets, cg_iterations=16,
                                        damping=0.5, batch_size=3)
    state = procedure.init(params, jax.random.key(0))
    new_state, record = jax.jit(procedure.step)(state, 0)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    got = np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0])
    x_np, targets_np = np.asarray(x), np.asarray(targets)

    def energy(flat_params, subset):
        p = unravel(jnp.asarray(flat_params))
        chosen = jnp.asarray(subset)
        return float(objective.value(p, model.apply(p, x[chosen]), targets[chosen]))

    matches = []
    for subset in itertools.combinations(range(6), 3):
        subset = list(subset)
        residual = x_np[subset] @ np.asarray(params["w"]) + np.asarray(params["b"]) - (
            targets_np[subset])
        g = np.concatenate([residual.sum(0), (x_np[subset].T @ residual).ravel()]) / 3 + (
            np.concatenate([[0, 0], 0.3 * np.asarray(params["w"]).ravel()]) / 3)
        gauss_newton = linear_gauss_newton(x_np[subset], 0.3)
        expected = np.asarray(flat) - np.linalg.solve(gauss_newton + 0.5 * np.eye(8), g)
        if np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected):
            matches.append(subset)
    assert len(matches) == 1 and bool(record["accepted"])
    assert float(record["energy"]) == pytest.approx(energy(got, matches[0]), rel=1e-13)
    assert float(record["rho"]) == pytest.approx(1, abs=1e-12)
    assert not np.array_equal(new_state.key, state.key)


def test_a_batch_of_all_the_examples_is_the_full_batch_run():
    """batch_size = n with G on the whole batch: the same steps as the full-batch procedure
    (the examples in another order: E and G are means, equal up to rounding)."""
    model = nets.build_mlp(4, 3, hidden_layers=1, hidden_units=5, activation="tanh")
    x = jax.random.normal(jax.random.key(2), (30, 4), jnp.float64)
    targets = jax.nn.one_hot(jnp.argmax(x[:, :3], axis=1), 3, dtype=jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.key(3), (-1, 4))[1])
    runs = [jax.jit(lambda p, batch_size=batch_size: procedures.run(
        procedures.hessian_free(model, nets.lecture_objective(0.1), x, targets, cg_iterations=6,
                                batch_size=batch_size), p, jax.random.key(0), 4))(params)
        for batch_size in (None, 30)]
    for full, batched in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
        assert gradcheck.relative_error(batched, full) <= F64
    assert np.allclose(runs[0].history["energy"], runs[1].history["energy"], rtol=1e-12)


@pytest.mark.parametrize("cells, layers", [(("elman",), 1), (("lstm", "gru"), 2),
                                            (("gru_reset_after",), 2)],
                         ids=["elman_states", "two_layers_states", "through_the_last_step"])
def test_hidden_state_product_is_jax_jvp_then_vjp(cells, layers, dtype):
    """S v = J_h^T J_h v / m by the tangent and backward passes of the first layers, against
    jax.jvp and jax.vjp of their apply; zero for the later layers' params."""
    model = nets.sequence_model([nets.recurrent.make_cell(kind, 4) for kind in cells], 2,
                                last_step=True)
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 5, 3))[1], dtype)
    x = jax.random.normal(jax.random.key(1), (6, 5, 3), dtype)
    v = random_like(jax.random.key(2), params, dtype)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(engines.hidden_state_product(model, layers))(params, x, v)
        want = jax.jit(gradcheck.hidden_state_product_reference(model, layers))(params, x, v)
    assert_close_tree(got, want, dtype, f"{cells}[:{layers}]")
    assert all(float(jnp.max(jnp.abs(leaf))) == 0 for leaf in jax.tree.leaves(got[layers:]))
    assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(got[:layers]))


@pytest.mark.parametrize("layers", [1, 3], ids=["states", "everything"])
def test_structurally_damped_product_is_g_v_plus_weight_times_s_v(layers, dtype):
    """One pass for both against jax's G v plus weight times jax's S v (the references of
    the two products), with L2, the hidden states every step's (1 layer) or the outputs
    themselves (all 3: S is then J^T J / m of the outputs)."""
    model = nets.sequence_model([nets.lstm(4)], 3, last_step=True)
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.2)
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 5, 3))[1], dtype)
    x = jax.random.normal(jax.random.key(1), (6, 5, 3), dtype)
    targets = jax.nn.one_hot(jnp.arange(6) % 3, 3, dtype=dtype)
    v = random_like(jax.random.key(2), params, dtype)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(engines.structurally_damped_product(model, objective, layers))(
            params, x, targets, v, 0.7)
        g_v = gradcheck.gauss_newton_product_reference(model, objective)(params, x, targets, v)
        s_v = gradcheck.hidden_state_product_reference(model, layers)(params, x, v)
    assert_close_tree(got, jax.tree.map(lambda a, b: a + 0.7 * b, g_v, s_v), dtype, "G + 0.7 S")


def test_structural_damping_adds_lambda_mu_times_the_hidden_states_matrix():
    """A Dense layer as the one "hidden" layer of a serial model: h is the output, so S =
    J^T J / m (NumPy), and one step on the quadratic E is -(G + lambda I + lambda mu S)^-1 g."""
    _, objective, params, x, targets, gauss_newton = linear_problem(l2=0.3)
    model = nets.serial(nets.Dense(2))
    procedure = procedures.hessian_free(model, objective, x, targets, cg_iterations=16,
                                        damping=0.5, structural_damping=2.0)
    state = procedure.init((params,), jax.random.key(0))
    new_state, record = jax.jit(procedure.step)(state, 0)
    flat = np.asarray(jax.flatten_util.ravel_pytree(params)[0])
    g = np.asarray(jax.flatten_util.ravel_pytree(state.grad)[0])
    structural = linear_gauss_newton(np.asarray(x), 0.0)
    expected = flat - np.linalg.solve(gauss_newton + 0.5 * np.eye(8) + 0.5 * 2.0 * structural, g)
    got = np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0])
    assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected)
    assert bool(record["accepted"])


def test_hidden_state_product_refusals():
    model = nets.sequence_model([nets.elman(3)], 2, last_step=True)
    with pytest.raises(ValueError, match=r"sequence_model: layers must be a whole number in "
                                         r"\[1, 3\] \(its sublayers\), got 4"):
        engines.hidden_state_product(model, 4)
    dropped = nets.sequence_model([nets.elman(3)], 2, last_step=True, dropout=0.5)
    with pytest.raises(ValueError, match="its first 1 layers draw random numbers"):
        engines.hidden_state_product(dropped, 1)
    with pytest.raises(ValueError, match=r"params must hold one entry per sublayer \(3\), got "
                                         "tuple of 2"):
        engines.hidden_state_product(model, 1)((1, 2), jnp.zeros((1, 4, 3)), (1, 2))


@pytest.mark.parametrize("options, message", [
    (dict(cg_iterations=0), "cg_iterations must be an int >= 1, got 0"),
    (dict(damping=0.0), "damping must be > 0, got 0.0"),
    (dict(decay=1.5), r"decay must be in \[0, 1\], got 1.5"),
    (dict(preconditioner="fisher"), "preconditioner must be one of"),
    (dict(curvature_examples=7), r"curvature_examples must be in \[1, 6\] \(the examples\), "
                                 "got 7"),
    (dict(batch_size=7), r"batch_size must be an int in \[1, 6\] \(the examples\) or None, "
                         "got 7"),
    (dict(batch_size=3, curvature_examples=4), r"curvature_examples must be in \[1, 3\] "
                                               r"\(batch_size\), got 4"),
    (dict(structural_damping=-1.0), "structural_damping must be >= 0, got -1.0"),
    (dict(curvature="fisher"), "curvature must be one of"),
    (dict(curvature="hessian", structural_damping=0.1),
     "structural_damping adds S to the Gauss-Newton matrix"),
    (dict(curvature="saddle_free", structural_damping=0.1),
     "structural_damping adds S to the Gauss-Newton matrix; it is not defined with "
     "curvature='saddle_free'"),
    (dict(curvature="saddle_free"), "preconditioner='diagonal' does not apply to "
                                    "curvature='saddle_free'"),
])
def test_bad_options_are_refused_by_name(options, message):
    model, objective, _, x, targets, _ = linear_problem()
    with pytest.raises(ValueError, match="hessian_free: " + message):
        procedures.hessian_free(model, objective, x, targets, **options)


def test_chunks_cover_the_steps_larger_first():
    assert experiment.chunk_lengths(10, 3) == [4, 3, 3]
    assert experiment.chunk_lengths(2, 5) == [1, 1]


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.slow
def test_experiment_writes_every_method_and_record(tmp_path):
    metrics = experiment.main([
        "--workdir", str(tmp_path), "--hidden-layers", "2", "--width", "8", "--examples", "300",
        "--curvature-examples", "100", "--hf-steps", "4", "--cg-iterations", "5",
        "--passes", "2", "--kfac-passes", "2", "--kfac-batch-size", "64", "--records", "2",
        "--seeds", "2"])
    assert set(metrics) == set(experiment.METHODS)
    document = json.loads((tmp_path / "results.json").read_text())
    history = document["history"]
    for method, steps in (("hessian_free", [0, 2, 4]), ("hessian_free_exact", [0, 2, 4]),
                          ("saddle_free", [0, 2, 4]), ("sgd", [0, 1, 2]), ("adam", [0, 1, 2]),
                          ("kfac", [0, 1, 2])):
        for seed in (0, 1):
            records = [h for h in history if h["method"] == method and h["seed"] == seed]
            assert [h["step"] for h in records] == steps
            assert records[-1]["loss"] < records[0]["loss"]
            if method in experiment.CURVATURE_OF:  # the chunks' own records, averaged
                assert all(0 <= h["mean_cg_iterations"] <= 5 and 0 <= h["mean_accepted"] <= 1
                           and h["mean_damping"] > 0 for h in records[1:])
            assert all(0 <= h["test_error"] <= 1 for h in records)
    assert (tmp_path / "hessian_free.png").stat().st_size > 10_000
    assert "hessian_free" in (tmp_path / "results.md").read_text()


def test_curvature_examples_beyond_the_training_digits_are_refused(tmp_path):
    assert_refused_before_the_run(experiment.main, tmp_path,
                                  ["--examples", "100", "--curvature-examples", "200"],
                                  "--curvature-examples: got 200; allowed: at most --examples "
                                  "(100)")


@pytest.mark.parametrize("batch_size", [None, 12])
def test_a_run_in_chunks_is_the_run_in_one_scan_bit_for_bit(batch_size):
    """The harness runs procedures in chunks with checkpoints between them: 3 + 3 steps from
    the state after 3 give the same state and records as 6 steps in one scan (with
    mini-batches too: the batches come from the state's key)."""
    model = nets.build_mlp(4, 3, hidden_layers=1, hidden_units=5, activation="tanh")
    x = jax.random.normal(jax.random.key(2), (30, 4), jnp.float32)
    targets = jax.nn.one_hot(jnp.argmax(x[:, :3], axis=1), 3, dtype=jnp.float32)
    procedure = procedures.hessian_free(model, nets.lecture_objective(0.1), x, targets,
                                        cg_iterations=6, curvature_examples=10,
                                        batch_size=batch_size)
    state = procedure.init(model.init(jax.random.key(3), (-1, 4))[1], jax.random.key(0))
    run = jax.jit(procedures.run_steps, static_argnums=(0, 3))
    whole, whole_records = run(procedure, state, 0, 6)
    half, first = run(procedure, state, 0, 3)
    rest, second = run(procedure, half, 3, 3)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(rest)):
        assert np.array_equal(a, b)
    for name in whole_records:
        assert np.array_equal(whole_records[name], np.concatenate([first[name], second[name]]))
