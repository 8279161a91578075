"""The fast block extremes against the dense operator and the full per-frequency spectra.

The Lanczos / Woodbury paths only run on wide blocks in production
(``LANCZOS_MIN_SIDE``); here the threshold is lowered so that small blocks,
whose dense operator an SVD can check, take them too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from auditor.analysis import block_extremes as fast
from auditor.analysis.conditioning import block_singular_values, condition_block
from auditor.analysis.lanczos import largest_eigenvalues
from auditor.analysis.spectra import ConvOperator, IdentityShortcut, OptionAShortcut
from _reference import branch as _branch
from _reference import dense as _dense
from _reference import shortcut_map
from test_block_conditioning import _op

D = torch.float64


@pytest.fixture(params=[1, 10_000], ids=["lanczos", "dense"])
def min_side(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Both paths: Lanczos wherever structure allows it, and dense everywhere."""
    monkeypatch.setattr(fast, "LANCZOS_MIN_SIDE", request.param)
    monkeypatch.setattr(fast, "DENSE_LANCZOS_MIN_SIDE", request.param)
    return request.param


def _reference(convs, shortcut) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """Extremes of the dense plain and residual operators (SVD of the whole matrix)."""
    shape = convs[0].input_shape

    def extremes(function) -> tuple[float, float]:
        matrix = _dense(function, shape)
        values = np.linalg.svd(matrix, compute_uv=False)[: min(matrix.shape)]
        return float(values[0]), float(values[-1])

    plain = extremes(_branch(convs))
    if shortcut is None:
        return plain, None
    short = shortcut_map(shortcut)
    return plain, extremes(lambda x: _branch(convs)(x) + short(x))


def _check(convs, shortcut, *, atol_scale: float = 1e-9) -> fast.BlockExtremes:
    found = fast.block_extremes(convs, shortcut)
    plain, residual = _reference(convs, shortcut)
    pairs = [(found.plain, plain)] + ([(found.residual, residual)] if residual else [])
    for got, want in pairs:
        assert got.sigma_max == pytest.approx(want[0], rel=1e-7)
        assert got.sigma_min == pytest.approx(want[1], rel=1e-6, abs=atol_scale * want[0])
        assert got.converged
    return found


def _bottleneck(c: int, width: int, hw: int, *, stride: int = 1, stride_first: bool = False, bn: bool = True,
                seed: int = 0, c_out: int | None = None) -> list[ConvOperator]:
    c_out = c if c_out is None else c_out
    s1, s2 = (stride, 1) if stride_first else (1, stride)
    first = _op(width, c, 1, hw, stride=s1, padding=0, scale=bn, seed=seed)
    mid_hw = hw // s1
    middle = _op(width, width, 3, mid_hw, stride=s2, scale=bn, seed=seed + 1)
    last = _op(c_out, width, 1, mid_hw // s2, padding=0, scale=bn, seed=seed + 2)
    return [first, middle, last]


@pytest.mark.parametrize("reduce_up_to", [1024, 0], ids=["reduced", "wide"])
@pytest.mark.parametrize("bn", [False, True])
def test_identity_bottleneck(min_side: int, bn: bool, reduce_up_to: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # "wide": as ResNet-50's 2048-channel blocks, the residual unreduced and the plain branch compressed alone
    monkeypatch.setattr(fast, "_REDUCE_MAX_CHANNELS", reduce_up_to)
    convs = _bottleneck(12, 4, 6, bn=bn)
    found = _check(convs, IdentityShortcut((12, 6, 6)))
    assert found.plain.sigma_min == 0.0  # rank <= 4 < 12 at every frequency
    if min_side == 1:  # the Woodbury path itself, not its dense fallback
        assert "structural-zero" in found.plain.method
        assert "min woodbury-lanczos;" in found.residual.method
    else:
        assert found.plain.method == found.residual.method == "dense"


def test_projection_bottleneck_stride1_square_shortcut(min_side: int) -> None:
    # torchvision layer1.0: 1x1 projection C -> C' without stride; S square and invertible
    convs = _bottleneck(6, 3, 4, c_out=6, seed=3)
    projection = _op(6, 6, 1, 4, padding=0, scale=True, seed=9)
    found = _check(convs, projection)
    if min_side == 1:
        assert "min woodbury-lanczos;" in found.residual.method


@pytest.mark.parametrize("stride_first", [False, True], ids=["v1.5-stride-conv2", "v1-stride-conv1"])
def test_downsampling_bottleneck_is_singular_by_structure(min_side: int, stride_first: bool) -> None:
    convs = _bottleneck(4, 2, 8, stride=2, stride_first=stride_first, c_out=8, seed=4)
    projection = _op(8, 4, 1, 8, stride=2, padding=0, scale=True, seed=10)
    found = _check(convs, projection)
    assert found.residual.sigma_min == 0.0  # rank <= 2 + 4 < 8 at every frequency
    if min_side == 1:
        assert "structural-zero (rank <= 6 < 8)" in found.residual.method


def test_basic_blocks_identity_and_option_a(min_side: int) -> None:
    convs = [_op(4, 4, 3, 6, scale=True, seed=5), _op(4, 4, 3, 6, scale=True, seed=6)]
    _check(convs, IdentityShortcut((4, 6, 6)))
    convs = [_op(6, 3, 3, 8, stride=2, scale=True, seed=7), _op(6, 6, 3, 4, seed=8)]
    _check(convs, OptionAShortcut((3, 8, 8), 6, 2, 1))


def _near_singular(epsilon: float, c: int = 8, width: int = 3, hw: int = 4):
    """A = I - (1 - epsilon) Q Q^T at every frequency: sigma_min = epsilon, sigma_max = 1."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(c, width, dtype=D, generator=g))
    centre = torch.zeros(width, width, 3, 3, dtype=D)
    centre[:, :, 1, 1] = torch.eye(width, dtype=D)
    convs = [ConvOperator(q.T.reshape(width, c, 1, 1).contiguous(), (c, hw, hw), name="conv1"),
             ConvOperator(centre, (width, hw, hw), padding=(1, 1), name="conv2"),
             ConvOperator((-(1 - epsilon) * q).reshape(c, width, 1, 1).contiguous(), (width, hw, hw), name="conv3")]
    return convs, IdentityShortcut((c, hw, hw))


@pytest.mark.parametrize("epsilon", [1e-4, 1e-8, 1e-10])
def test_near_singular_block(min_side: int, epsilon: float) -> None:
    convs, shortcut = _near_singular(epsilon)
    found = fast.block_extremes(convs, shortcut)
    assert found.residual.sigma_max == pytest.approx(1.0, rel=1e-9)
    assert found.residual.sigma_min == pytest.approx(epsilon, rel=1e-5)
    full = condition_block(convs, shortcut, full_spectra=True)
    quick = condition_block(convs, shortcut)
    assert quick.kappa_linear_residual == pytest.approx(full.kappa_linear_residual, rel=1e-5)
    assert quick.kappa_linear_residual == pytest.approx(1 / epsilon, rel=1e-5)


def test_exactly_singular_block_gives_null_with_the_same_reason(min_side: int) -> None:
    convs, shortcut = _near_singular(0.0)
    quick, full = condition_block(convs, shortcut), condition_block(convs, shortcut, full_spectra=True)
    assert quick.kappa_linear_residual is None and full.kappa_linear_residual is None
    assert quick.kappa_linear_residual_reason == full.kappa_linear_residual_reason
    assert "singular" in quick.kappa_linear_residual_reason


@pytest.mark.parametrize("seed", range(4))
def test_condition_block_equals_full_spectra(min_side: int, seed: int) -> None:
    convs = _bottleneck(16, 6, 8, seed=10 * seed)
    for shortcut in (IdentityShortcut((16, 8, 8)), None):
        quick = condition_block(convs, shortcut, name="b").to_dict()
        full = condition_block(convs, shortcut, name="b", full_spectra=True).to_dict()
        for key in ("kappa_linear_residual", "kappa_linear_plain", "kappa_paper_residual", "kappa_paper_plain"):
            if full[key] is None:
                assert quick[key] is None and quick[f"{key}_reason"] == full[f"{key}_reason"]
            else:
                assert quick[key] == pytest.approx(full[key], rel=1e-6)
        assert quick["lemma1_upper_holds"] == full["lemma1_upper_holds"]
        assert quick["lemma1_lower_holds"] == full["lemma1_lower_holds"]
        assert set(quick["linear_method"]) == set(full["linear_method"])


def test_extremes_match_the_full_spectrum_listing(min_side: int) -> None:
    convs = _bottleneck(10, 4, 8, seed=2)
    projection = _op(10, 10, 1, 8, padding=0, seed=3)
    values = block_singular_values(convs, projection)
    found = fast.block_extremes(convs, projection)
    assert found.residual.sigma_max == pytest.approx(values[0], rel=1e-8)
    assert found.residual.sigma_min == pytest.approx(values[-1], rel=1e-6)


def test_results_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "LANCZOS_MIN_SIDE", 1)
    monkeypatch.setattr(fast, "DENSE_LANCZOS_MIN_SIDE", 1)
    convs = _bottleneck(12, 4, 8, seed=5)
    one = fast.block_extremes(convs, IdentityShortcut((12, 8, 8)))
    monkeypatch.setattr(fast, "worker_count", lambda: 3)
    three = fast.block_extremes(convs, IdentityShortcut((12, 8, 8)))
    assert three.residual.sigma_min == pytest.approx(one.residual.sigma_min, rel=1e-9)
    assert three.residual.sigma_max == pytest.approx(one.residual.sigma_max, rel=1e-9)


# ---------------------------------------------------------------- the Lanczos solver


def _apply(matrices: torch.Tensor):
    return lambda x: (matrices @ x.unsqueeze(-1)).squeeze(-1)


def test_lanczos_matches_eigvalsh_and_its_residual_bound_holds() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 30, 30, dtype=torch.complex128, generator=g)
    gram = a @ a.mH
    run = largest_eigenvalues(_apply(gram), torch.randn(6, 30, dtype=torch.complex128, generator=g))
    exact = torch.linalg.eigvalsh(gram)[:, -1]
    assert bool(run.converged.all())
    assert torch.all(run.value <= exact * (1 + 1e-12))  # a Ritz value never exceeds lambda_max
    assert torch.all((exact - run.value).abs() <= run.residual + 1e-12 * exact)
    torch.testing.assert_close(run.value, exact, rtol=1e-8, atol=0)


def test_lanczos_exact_on_low_rank_and_zero_operators() -> None:
    v = torch.randn(2, 20, 1, dtype=D, generator=torch.Generator().manual_seed(2))
    rank_one = v @ v.mT
    rank_one[1] = 0.0
    run = largest_eigenvalues(_apply(rank_one), torch.ones(2, 20, dtype=D))
    assert bool(run.converged.all())
    assert run.value[0].item() == pytest.approx((v[0] ** 2).sum().item(), rel=1e-12)
    assert run.value[1].item() == 0.0
    assert run.steps <= 5


def test_lanczos_reports_non_convergence() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 200, 200, dtype=D, generator=g)
    run = largest_eigenvalues(_apply(a @ a.mT), torch.randn(1, 200, dtype=D, generator=g),
                              tol=1e-15, max_dim=3, restarts=0, check_every=1)
    assert not bool(run.converged.any())
    assert math.isfinite(run.value.item()) and run.residual.item() > 0


# ---------------------------------------------------------------- a whole bottleneck network


@pytest.mark.slow
def test_whole_bottleneck_network_fast_equals_full_spectra(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision ResNet-50 layout (narrow, 32 px): every block, Lanczos forced, against the full spectra."""
    from types import SimpleNamespace

    from torchvision.models.resnet import Bottleneck, ResNet

    from auditor.tasks.condition import condition
    from auditor.models.anatomy import analyze_anatomy

    class Narrow(Bottleneck):  # ResNet-50's blocks with 1x instead of 4x output channels (64..512, not 256..2048):
        expansion = 1          # the same structure (width 8..64 below them), a quarter of the sides

    torch.manual_seed(0)
    model = ResNet(Narrow, [2, 1, 1, 1], width_per_group=8).eval()
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # folding must matter, as in a trained network
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
    subject = SimpleNamespace(loaded=SimpleNamespace(model=model), anatomy=analyze_anatomy(model, (3, 32, 32)))
    monkeypatch.setattr(fast, "LANCZOS_MIN_SIDE", 1)
    monkeypatch.setattr(fast, "DENSE_LANCZOS_MIN_SIDE", 1)
    quick, full = condition(subject), condition(subject, full_spectra=True)
    assert len(quick.blocks) == 5
    methods = " ".join(m for b in quick.blocks for m in b.methods.values())
    assert "woodbury-lanczos" in methods and "structural-zero" in methods
    for a, b in zip(quick.blocks, full.blocks):
        for key in ("kappa_linear_residual", "kappa_linear_plain", "kappa_paper_residual", "kappa_paper_plain"):
            x, y = getattr(a, key), getattr(b, key)
            assert (x is None) == (y is None), (a.name, key)
            if y is None:
                assert a.reasons[key] == b.reasons[key]
            else:
                assert x == pytest.approx(y, rel=1e-6), (a.name, key)
        assert (a.lemma1_upper_holds, a.lemma1_lower_holds) == (b.lemma1_upper_holds, b.lemma1_lower_holds)
        assert a.sigma_linear_plain[0] == pytest.approx(b.sigma_linear_plain[0], rel=1e-7)


def test_lanczos_returns_its_ritz_vector() -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 20, 20, dtype=torch.complex128, generator=g)
    b = a.mH @ a
    run = largest_eigenvalues(lambda x: (b @ x.unsqueeze(-1)).squeeze(-1), torch.randn(3, 20, dtype=torch.complex128,
                                                                                      generator=g))
    v = run.vector
    assert torch.allclose(torch.linalg.vector_norm(v, dim=1), torch.ones(3, dtype=torch.float64))
    gap = torch.linalg.vector_norm((b @ v.unsqueeze(-1)).squeeze(-1) - run.value[:, None] * v, dim=1)
    assert torch.allclose(gap, run.residual, rtol=1e-6, atol=1e-10 * float(run.value.max()))


@pytest.mark.parametrize("seed", [0, 1])
def test_single_precision_warm_start_changes_nothing(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 warm start only moves the float64 run's starting vector: same extremes."""
    monkeypatch.setattr(fast, "LANCZOS_MIN_SIDE", 1)
    monkeypatch.setattr(fast, "DENSE_LANCZOS_MIN_SIDE", 1)
    convs = _bottleneck(12, 4, 6, bn=True, seed=seed)
    shortcut = IdentityShortcut((12, 6, 6))
    warm = fast.block_extremes(convs, shortcut)
    monkeypatch.setattr(fast, "WARM_START_STEPS", 0)
    cold = fast.block_extremes(convs, shortcut)
    for a, b in ((warm.plain, cold.plain), (warm.residual, cold.residual)):
        assert a.sigma_max == pytest.approx(b.sigma_max, rel=1e-9)
        assert a.sigma_min == pytest.approx(b.sigma_min, rel=1e-6)


def test_warm_start_keeps_the_random_start_where_single_precision_breaks_down() -> None:
    start = torch.randn(3, 5, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))

    calls = []

    def apply(x: torch.Tensor) -> torch.Tensor:  # row 1 blows up in single precision (a singular K(u))
        calls.append(1)
        out = x * torch.arange(1, 6, dtype=x.real.dtype)
        if len(calls) > 2:
            out[1] = float("nan")
        return out

    warm, _ = fast._warm_start(apply, start)
    assert bool(torch.isfinite(torch.view_as_real(warm)).all())
    assert warm.dtype == torch.complex128
    # the broken row starts where it would have (its random vector, to single precision)
    direction = start[1] / torch.linalg.vector_norm(start[1])
    assert float(torch.linalg.vector_norm(warm[1] / torch.linalg.vector_norm(warm[1]) - direction)) < 1e-6


def _batch(seed: int, count: int = 5, n: int = 24) -> torch.Tensor:
    """Hermitian PSD matrices with spread-out top eigenvalues (count, n, n)."""
    a = torch.randn(count, n, n, dtype=torch.complex128, generator=torch.Generator().manual_seed(seed))
    return a.mH @ a * torch.arange(1, count + 1, dtype=D)[:, None, None]


def test_lanczos_row_results_do_not_depend_on_the_batch() -> None:
    """A converged row is frozen: alone or among others, with or without restriction, the same Ritz pair."""
    b = _batch(11)
    start = torch.randn(5, 24, dtype=torch.complex128, generator=torch.Generator().manual_seed(12))
    together = largest_eigenvalues(_apply(b), start)
    restricted = largest_eigenvalues(_apply(b), start, restrict=lambda rows: _apply(b[rows]))
    for i in range(5):
        alone = largest_eigenvalues(_apply(b[i:i + 1]), start[i:i + 1])
        for run in (together, restricted):
            assert run.value[i].item() == pytest.approx(alone.value.item(), rel=1e-13)
            assert run.residual[i].item() == pytest.approx(alone.residual.item(), rel=1e-6, abs=1e-12)
            assert bool(run.converged[i]) and bool(alone.converged[0])
            torch.testing.assert_close(run.vector[i], alone.vector[0], rtol=0, atol=1e-10)


def test_lanczos_restricts_the_operator_to_the_rows_still_running() -> None:
    """Rows that converge early stop costing products: ``restrict`` gets ever fewer rows."""
    b = _batch(13, count=8)
    b[:4] = torch.diag_embed(torch.arange(1.0, 25.0, dtype=D)).to(b.dtype)  # converge at once from e_24
    start = torch.randn(8, 24, dtype=torch.complex128, generator=torch.Generator().manual_seed(14))
    start[:4] = 0
    start[:4, -1] = 1
    seen: list[int] = []

    def restrict(rows: torch.Tensor):
        seen.append(len(rows))
        return _apply(b[rows])

    run = largest_eigenvalues(_apply(b), start, restrict=restrict)
    assert seen and seen[0] == 4 and all(x <= 4 for x in seen)
    torch.testing.assert_close(run.value, torch.linalg.eigvalsh(b)[:, -1], rtol=1e-8, atol=0)


def test_candidates_keep_every_row_whose_top_may_be_the_largest() -> None:
    """Rows are ruled out only when rho + residual (double precision) is below the best rho."""
    b = torch.zeros(3, 4, 4, dtype=torch.complex128)
    b[0] = torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.1])).to(b.dtype)   # exact top vector: rho 2
    b[1] = torch.diag(torch.tensor([1.5, 1.0, 0.5, 0.1])).to(b.dtype)   # exact top vector, below: ruled out
    b[2] = torch.diag(torch.tensor([10.0, 1.0, 0.5, 0.1])).to(b.dtype)  # a poor vector: rho < 2, top 10
    vectors = torch.zeros(3, 4, dtype=torch.complex128)
    vectors[0, 0] = vectors[1, 0] = 1
    vectors[2, 0], vectors[2, 1] = 0.2, 1.0
    y = vectors[2] / torch.linalg.vector_norm(vectors[2])
    assert float((y.conj() @ b[2] @ y).real) < 2  # the poor vector's Rayleigh quotient alone would rule it out
    assert fast._candidates(_apply(b), vectors).tolist() == [0, 2]


def test_frequencies_are_pruned_and_the_extremes_do_not_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """The double-precision runs see fewer frequencies than the single-precision ones; same extremes."""
    monkeypatch.setattr(fast, "LANCZOS_MIN_SIDE", 1)
    monkeypatch.setattr(fast, "DENSE_LANCZOS_MIN_SIDE", 1)
    sizes: dict[torch.dtype, list[int]] = {torch.complex64: [], torch.complex128: []}
    original = fast.largest_eigenvalues

    def spy(apply, start, **options):
        sizes[start.dtype].append(len(start))
        return original(apply, start, **options)

    monkeypatch.setattr(fast, "largest_eigenvalues", spy)
    convs = _bottleneck(12, 4, 8, bn=True, seed=3)
    found = _check(convs, IdentityShortcut((12, 8, 8)))
    assert "woodbury-lanczos" in found.residual.method
    assert sum(sizes[torch.complex128]) < sum(sizes[torch.complex64])


def test_triangular_end_cores_keep_every_singular_value() -> None:
    # QR cores of the plain branch's 1x1 ends (the Lanczos path) against the SVD cores
    # (the full spectrum's): all singular values at every frequency, and the dropped zeros
    from auditor.analysis.block_algebra import reduce_block
    from auditor.analysis.frequencies import half_plane

    block = reduce_block(_bottleneck(12, 4, 6, seed=5), IdentityShortcut((12, 6, 6)), reduce=False)
    triangular, svd = fast._with_compressed_ends(block, triangular=True), fast._with_compressed_ends(block)
    assert [w.shape for w in triangular.plain_weights] == [w.shape for w in svd.plain_weights]
    assert triangular.plain_weights[0].shape[:2] == (4, 4) and triangular.plain_weights[-1].shape[:2] == (4, 4)
    np.testing.assert_array_equal(triangular.extra_plain, svd.extra_plain)
    u, v, _ = half_plane(*block.grid)
    expected = fast._dense(svd, False, u, v)
    np.testing.assert_allclose(fast._dense(triangular, False, u, v), expected, rtol=1e-12, atol=1e-12 * expected.max())


# ---------------------------------------------------------------- dense-lanczos: formed matrices, no structure


def _dense_lanczos_chunk(matrices: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> fast._ChunkResult:
    """The dense-Lanczos chunk on given per-frequency matrices (frequency ``u`` = its index)."""
    monkeypatch.setattr(fast, "block_matrices", lambda block, residual, u, v, depthwise=False: matrices[u])
    index = np.arange(len(matrices))
    return fast._chunk_dense_lanczos(None, True, index, index, 0, torch.device("cpu"))


def _with_values(values: np.ndarray, seed: int) -> np.ndarray:
    """Random complex U diag(values) V^H."""
    rng = np.random.default_rng(seed)
    n = len(values)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)))
    return (u * values) @ v.conj().T


@pytest.mark.parametrize("kappa", [1e2, 1e6, 1e10])
def test_dense_lanczos_matches_svd_of_the_frequency_matrices(kappa: float, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    n = 40
    # random frequencies, one of them with condition number kappa (spread-out values, the largest elsewhere)
    matrices = [rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)) for _ in range(5)]
    matrices.insert(2, _with_values(np.geomspace(1.0, 1.0 / kappa, n), seed=2))
    matrices = np.stack(matrices)
    values = np.linalg.svd(matrices, compute_uv=False)
    found = _dense_lanczos_chunk(matrices, monkeypatch)
    assert found.top == pytest.approx(values[:, 0].max(), rel=1e-7)
    assert found.bottom == pytest.approx(values[:, -1].min(), rel=1e-6)
    assert found.top_method == found.bottom_method == "dense-lanczos"


def test_dense_lanczos_singular_frequencies_fall_back_to_exact_extremes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    n = 30
    matrices = rng.standard_normal((4, n, n)) + 1j * rng.standard_normal((4, n, n))
    matrices[1, :, 5] = 0  # an exactly singular frequency: its LU fails
    found = _dense_lanczos_chunk(matrices, monkeypatch)
    values = np.linalg.svd(matrices, compute_uv=False)
    assert found.top == pytest.approx(values[:, 0].max(), rel=1e-7)
    assert found.bottom == pytest.approx(0.0, abs=1e-12 * found.top)
    assert found.bottom_method == "dense-lanczos+dense"
    # rank deficient in exact arithmetic only (the LU succeeds): sigma_min at rounding level
    matrices[1] = _with_values(np.r_[np.ones(n - 1), 0.0], seed=4)
    found = _dense_lanczos_chunk(matrices, monkeypatch)
    assert found.bottom <= 1e-12 * found.top


def test_dense_lanczos_rows_that_do_not_converge_go_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    matrices = rng.standard_normal((3, 50, 50)) + 1j * rng.standard_normal((3, 50, 50))
    values = np.linalg.svd(matrices, compute_uv=False)
    original = fast.largest_eigenvalues
    # one step, no restart: nothing converges, every candidate frequency is computed exactly
    monkeypatch.setattr(fast, "WARM_START_STEPS", 0)
    monkeypatch.setattr(fast, "largest_eigenvalues",
                        lambda apply, start, **kw: original(apply, start, **{**kw, "max_dim": 1, "restarts": 0}))
    found = _dense_lanczos_chunk(matrices, monkeypatch)
    assert found.top == pytest.approx(values[:, 0].max(), rel=1e-12)
    assert found.bottom == pytest.approx(values[:, -1].min(), rel=1e-10)
    assert found.top_method == found.bottom_method == "dense-lanczos+dense"


def _convnext_like(c: int, hw: int, seed: int, scale: float = 1.0) -> list[ConvOperator]:
    """A depthwise 7x7 kernel, a 1x1 expansion to 4c and a 1x1 projection back (ConvNeXt's block)."""
    g = torch.Generator().manual_seed(seed)
    depthwise = ConvOperator(torch.randn(c, 1, 7, 7, generator=g, dtype=D), (c, hw, hw), padding=(3, 3), groups=c,
                             name="dw")
    expand = _op(4 * c, c, 1, hw, padding=0, seed=seed + 1)
    project = ConvOperator(scale * torch.randn(c, 4 * c, 1, 1, generator=g, dtype=D) / c, (4 * c, hw, hw),
                           name="pw2")
    return [depthwise, expand, project]


@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_dense_lanczos_on_a_depthwise_block_against_the_dense_operator(scale: float,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "LANCZOS_MIN_SIDE", 6)
    monkeypatch.setattr(fast, "DENSE_LANCZOS_MIN_SIDE", 6)
    convs = _convnext_like(6, 7, seed=3, scale=scale)
    found = _check(convs, IdentityShortcut((6, 7, 7)))
    assert found.plain.method.startswith("dense-lanczos") and found.residual.method.startswith("dense-lanczos")
    # and the full spectra (the dense path) agree
    full = condition_block(convs, IdentityShortcut((6, 7, 7)), full_spectra=True)
    quick = condition_block(convs, IdentityShortcut((6, 7, 7)))
    assert quick.kappa_linear_residual == pytest.approx(full.kappa_linear_residual, rel=1e-6)
    assert quick.kappa_linear_plain == pytest.approx(full.kappa_linear_plain, rel=1e-6)


def test_depthwise_chain_matrices_equal_the_folded_ones() -> None:
    from auditor.analysis.block_algebra import block_matrices, depthwise_chain, reduce_block
    from auditor.analysis.frequencies import half_plane

    # the depthwise kernel first (ConvNeXt), and last
    for convs in (_convnext_like(5, 6, seed=1), [_op(5, 5, 1, 6, padding=0, seed=2), _convnext_like(5, 6, seed=4)[0]]):
        block = reduce_block(convs, IdentityShortcut((5, 6, 6)))
        assert depthwise_chain(block.weights, block.paddings, block.grid) is not None
        u, v, _ = half_plane(*block.grid)
        for residual in (False, True):
            folded = block_matrices(block, residual, u, v)
            scaled = block_matrices(block, residual, u, v, depthwise=True)
            np.testing.assert_allclose(scaled, folded, rtol=0, atol=1e-12 * np.abs(folded).max())


def test_small_blocks_keep_the_full_spectrum_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    # below LANCZOS_MIN_SIDE the dense path is the full spectrum's own single pass, to the bit
    convs = _convnext_like(6, 7, seed=3)
    found = fast.block_extremes(convs, IdentityShortcut((6, 7, 7)))
    assert found.plain.method == found.residual.method == "dense"


@pytest.mark.parametrize("order", ["depthwise-first", "depthwise-last"])
@pytest.mark.parametrize("zero_symbol", [False, True])
def test_scaled_plain_branch_against_the_dense_operator(order: str, zero_symbol: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # P(u) = L diag(d(u)) or diag(d(u)) L: one LU of L; a channel whose depthwise symbol vanishes at
    # u = 0 (taps summing to zero) makes that frequency singular, and it falls back to its exact extremes
    monkeypatch.setattr(fast, "LANCZOS_MIN_SIDE", 6)
    monkeypatch.setattr(fast, "DENSE_LANCZOS_MIN_SIDE", 6)
    c, hw = 6, 7
    depthwise = _convnext_like(c, hw, seed=5)[0]
    if zero_symbol:
        weight = depthwise.weight.clone()
        weight[2] = 0.0
        weight[2, 0, 1, 2], weight[2, 0, 4, 5] = 1.0, -1.0  # d_2(0) = 0 exactly
        depthwise = ConvOperator(weight, (c, hw, hw), padding=(3, 3), groups=c, name="dw")
    pointwise = _op(c, c, 1, hw, padding=0, seed=6)
    convs = [depthwise, pointwise] if order == "depthwise-first" else [pointwise, depthwise]
    found = _check(convs, IdentityShortcut((c, hw, hw)), atol_scale=1e-12)
    assert "dense-lanczos" in found.plain.method
    if zero_symbol:
        assert "dense-lanczos+dense" in found.plain.method and found.plain.sigma_min < 1e-12 * found.plain.sigma_max
