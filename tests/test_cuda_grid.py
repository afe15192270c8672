"""Launch shapes of CUDA kernels that spread small problems over more threads
(csrc/cuda/reparameterize_kl.cu: free_bits_grid, draw_lanes_shift), computed on the host: checked
on any machine whose build has the CUDA kernels, GPU or not. The kernels themselves are checked on
a GPU (tests/test_cuda.py: values against float64 math and the CPU, both settings of the spread
switch, poisoned outputs, bits over runs); the last tests here check that its cases reach the
launch shapes they are there for.

The columns kernel gives each block a tile of positions and the whole batch, a lane of the block
adding every 128 / TW-th sample one after another. A tall batch of few positions then ran on a
couple of blocks: (65536, 20) on 2 blocks whose lanes added 2048 samples each. The split kernel
deals the batch out to more blocks.
"""
import math

import pytest

import fastelbo

# The (shape, reduction, free_bits, num_samples) cases that test_reparameterize_kl_cuda_matches_cpu
# runs on a GPU: imported, so that the checks at the end follow any change to the list.
from test_cuda import CASES as CUDA_CASES

pytestmark = pytest.mark.skipif(
    not fastelbo._C.built_with_cuda,
    reason="fastelbo was built without its CUDA kernels (FASTELBO_CUDA=0 or no nvcc at build time)",
)

THREADS = 128          # kThreads, csrc/cuda/cuda_common.cuh: the columns kernels' block
MAX_BLOCKS = 132 * 8   # kMaxBlocks: one wave of 8 blocks on each of the H100's / H200's 132 SMs
WAVE_THREADS = MAX_BLOCKS * THREADS  # one wave of 128-thread blocks

SHAPES = [(B, D) for B in (1, 2, 31, 128, 129, 1000, 4096, 65536, 2**22)
          for D in (1, 3, 4, 20, 37, 256, 1000, 4096, 16389)]


@pytest.fixture
def spread_switch_on():
    previous = fastelbo._C._set_cuda_spread(True)
    yield
    fastelbo._C._set_cuda_spread(previous)


def lanes_and_rows(grid, batch):
    """Lanes per block, and the most items (a sample's share of its draws) one lane adds."""
    lanes = THREADS // grid["col_windows"]
    return lanes, math.ceil(batch * grid["draw_lanes"] / (grid["row_splits"] * lanes))


@pytest.mark.parametrize("num_samples", [1, 8])
@pytest.mark.parametrize("batch,per_sample", SHAPES, ids=[f"{b}x{d}" for b, d in SHAPES])
def test_free_bits_grid_covers_every_position_and_sample(spread_switch_on, batch, per_sample, num_samples):
    """The tiles cover the positions with no empty tile, the grid fits one wave, and every split
    of the batch's items (B x the lanes sharing a sample's draws) has items (split r's lanes start
    at item r * lanes); the lanes per sample are a power of two, at most the draws and 32, and
    within a wave with the samples' windows."""
    grid = fastelbo._C._cuda_free_bits_grid(batch, per_sample, num_samples)
    tw, tiles, splits, q = grid["col_windows"], grid["col_tiles"], grid["row_splits"], grid["draw_lanes"]
    windows = math.ceil(per_sample / 4)
    assert tw in (1, 2, 4, 8, 16, 32), grid
    assert (tiles - 1) * tw < windows <= tiles * tw, grid
    assert 1 <= grid["blocks"] <= MAX_BLOCKS, grid
    assert q in (1, 2, 4, 8, 16, 32) and q <= num_samples, grid
    assert q == 1 or batch * windows * q <= WAVE_THREADS, grid
    lanes, _ = lanes_and_rows(grid, batch)
    if splits == 1:
        assert grid["blocks"] == min(tiles, MAX_BLOCKS), grid
    else:
        assert grid["blocks"] == tiles * splits, grid
        assert (splits - 1) * lanes < batch * q, grid


@pytest.mark.parametrize("batch,per_sample", [(65536, 20), (2**22, 1), (2**20, 4), (4096, 20), (1000, 37)])
def test_tall_batches_are_split(spread_switch_on, batch, per_sample):
    """A tall batch of few positions gets many blocks, each lane adding a few dozen samples at most
    (unsplit: (65536, 20) on 2 blocks, 2048 samples per lane; (2^22, 1) on 1 block, 32768)."""
    grid = fastelbo._C._cuda_free_bits_grid(batch, per_sample)
    _, rows = lanes_and_rows(grid, batch)
    unsplit_rows = math.ceil(batch / (THREADS // grid["col_windows"]))
    assert grid["row_splits"] > 1, grid
    assert grid["blocks"] >= min(8 * grid["col_tiles"], MAX_BLOCKS // 2), grid
    assert rows <= max(4, unsplit_rows // 8), (grid, rows)


@pytest.mark.parametrize("batch,per_sample", [(128, 20), (64, 4096), (8, 196608), (1, 1), (128, 1000)])
def test_small_batches_keep_one_pass(spread_switch_on, batch, per_sample):
    """Where each lane adds at most 4 samples anyway (mnist's (128, 20): 32 lanes), or the positions
    alone fill the grid, the columns kernel runs as before: no split, no second pass."""
    grid = fastelbo._C._cuda_free_bits_grid(batch, per_sample)
    assert grid["row_splits"] == 1, grid


def test_split_switch_turns_the_split_off(spread_switch_on):
    """FASTELBO_CUDA_SPREAD=0 (_set_cuda_spread(False)): every shape runs as the
    columns kernel alone, with the same tiles."""
    for batch, per_sample in SHAPES:
        on = fastelbo._C._cuda_free_bits_grid(batch, per_sample)
        fastelbo._C._set_cuda_spread(False)
        try:
            off = fastelbo._C._cuda_free_bits_grid(batch, per_sample)
        finally:
            fastelbo._C._set_cuda_spread(True)
        assert off["row_splits"] == 1 and off["col_windows"] == on["col_windows"], (batch, per_sample, off)
        assert off["blocks"] == min(off["col_tiles"], MAX_BLOCKS), off


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="B >= 1, D >= 1 and num_samples >= 1"):
        fastelbo._C._cuda_free_bits_grid(0, 20)
    with pytest.raises(ValueError, match="num_samples >= 1"):
        fastelbo._C._cuda_free_bits_grid(1, 20, 0)


# ---- the sample+KL kernels' draws over lanes (num_samples > 1) ----------------------------------



@pytest.mark.parametrize("numel", [1, 4, 2560, 8192, 65536, 2**17, 2**20])
@pytest.mark.parametrize("num_samples", [1, 2, 3, 8, 50, 1000])
def test_draw_lanes_stay_within_the_draws_and_one_wave(spread_switch_on, numel, num_samples):
    """A power of two, at most the draws and a warp, and the chunks times the lanes within one
    wave; one lane for a single draw."""
    lanes = fastelbo._C._cuda_draw_lanes(numel, num_samples)
    chunks = math.ceil(numel / 4)
    assert lanes in (1, 2, 4, 8, 16, 32), lanes
    assert lanes <= num_samples and (lanes == 1 or chunks * lanes <= WAVE_THREADS), lanes
    if num_samples == 1:
        assert lanes == 1


def test_small_latents_spread_many_draws(spread_switch_on):
    """mnist's latent (128 x 20 = 640 chunks) with 50 draws gets 32 lanes per chunk (about 2 draws
    each, not 50 in a row); a latent that fills a wave by itself keeps one lane."""
    assert fastelbo._C._cuda_draw_lanes(128 * 20, 50) == 32
    assert fastelbo._C._cuda_draw_lanes(128 * 20, 3) == 2
    assert fastelbo._C._cuda_draw_lanes(4 * WAVE_THREADS, 50) == 1


def test_spread_switch_turns_the_draw_lanes_off(spread_switch_on):
    fastelbo._C._set_cuda_spread(False)
    try:
        assert fastelbo._C._cuda_draw_lanes(128 * 20, 50) == 1
    finally:
        fastelbo._C._set_cuda_spread(True)


def test_bad_draw_lane_arguments_are_refused():
    with pytest.raises(ValueError, match="num_samples >= 1"):
        fastelbo._C._cuda_draw_lanes(10, 0)


def test_validate_reaches_every_sample_and_kl_launch_shape(spread_switch_on):
    """`fastelbo validate` on a GPU runs the free-bits forward's split kernel (a tall batch) and
    its unsplit columns kernel, and K = 3 both in the draws over lanes and in the plain kernels
    (a latent that fills a wave by itself), so a user's validate run checks each of them."""
    from fastelbo import validate

    assert any(k == 3 and fb > 0 for _, _, fb, k in validate.CASES)
    shapes = [(shape[0], math.prod(shape[1:])) for shape in validate.SHAPES]
    splits = {fastelbo._C._cuda_free_bits_grid(b, d)["row_splits"] for b, d in shapes}
    assert 1 in splits and max(splits) > 1, splits
    lanes = {fastelbo._C._cuda_draw_lanes(b * d, 3) for b, d in shapes}
    assert 1 in lanes and max(lanes) > 1, lanes
    rng_splits = {fastelbo._C._cuda_free_bits_grid(shape[0], math.prod(shape[1:]))["row_splits"]
                  for shape in validate.RNG_BACKWARD_SHAPES}
    assert 1 in rng_splits and max(rng_splits) > 1, rng_splits


SHORT_ROW_CASES = [(B, D, K) for B in (1, 3, 128, 20000, 2**21) for D in (1, 3, 4, 20, 29, 64, 65, 1000)
                   for K in (1, 2, 3, 7, 50)]


@pytest.mark.parametrize("batch,per_sample,num_samples", SHORT_ROW_CASES,
                         ids=[f"{b}x{d}-K{k}" for b, d, k in SHORT_ROW_CASES])
def test_short_rows_lanes_fit_a_warp_and_a_wave(spread_switch_on, batch, per_sample, num_samples):
    """reduction "none": samples of at most 16 windows of 4 get a power of two >= their windows of
    lanes (longer ones the rows kernel: 0); the window's draws are shared by a power of two of
    lanes, at most the draws, with a sample's lanes within a warp and all of them within a wave;
    one draw keeps one lane."""
    got = fastelbo._C._cuda_short_rows_lanes(batch, per_sample, num_samples)
    g, q = got["window_lanes"], got["draw_lanes"]
    windows = math.ceil(per_sample / 4)
    if windows > 16:
        assert got == {"window_lanes": 0, "draw_lanes": 1}
        return
    assert g in (1, 2, 4, 8, 16) and g >= windows and (g == 1 or g < 2 * windows), got
    assert q in (1, 2, 4, 8, 16, 32) and q <= num_samples and g * q <= 32, got
    assert q == 1 or batch * g * q <= WAVE_THREADS, got


def test_short_samples_share_many_draws():
    """mnist's latent (128 x 20: 5 windows, 8 lanes) with 50 draws: 4 lanes per window (a warp per
    sample); a tall batch that fills a wave keeps one lane per window; the spread switch off, no
    short-rows kernel at all."""
    previous = fastelbo._C._set_cuda_spread(True)
    try:
        assert fastelbo._C._cuda_short_rows_lanes(128, 20, 50) == {"window_lanes": 8, "draw_lanes": 4}
        assert fastelbo._C._cuda_short_rows_lanes(20000, 3, 8) == {"window_lanes": 1, "draw_lanes": 4}
        assert fastelbo._C._cuda_short_rows_lanes(2**21, 3, 8)["draw_lanes"] == 1
        assert fastelbo._C._cuda_short_rows_lanes(128, 20, 1)["draw_lanes"] == 1
        fastelbo._C._set_cuda_spread(False)
        assert fastelbo._C._cuda_short_rows_lanes(128, 20, 50) == {"window_lanes": 0, "draw_lanes": 1}
    finally:
        fastelbo._C._set_cuda_spread(previous)


def test_free_bits_with_many_draws_share_them_over_lanes(spread_switch_on):
    """mnist's latent with free bits and 50 draws: each lane drew 4 samples' 50 draws one after
    another (200 chains); now 32 lanes share a sample's draws and the batch's items are split
    over 64 blocks: 4 items of at most 2 draws per lane. One draw keeps the grid it had."""
    grid = fastelbo._C._cuda_free_bits_grid(128, 20, 50)
    assert grid["draw_lanes"] == 32 and grid["blocks"] == 64, grid
    _, items = lanes_and_rows(grid, 128)
    assert items * math.ceil(50 / grid["draw_lanes"]) <= 8, (grid, items)
    one = fastelbo._C._cuda_free_bits_grid(128, 20, 1)
    assert one == fastelbo._C._cuda_free_bits_grid(128, 20) and one["draw_lanes"] == 1
    assert one["row_splits"] == 1, one


# ---- the launch shapes that tests/test_cuda.py's CPU-vs-CUDA cases reach ------------------------

def test_cuda_cases_take_the_draws_over_lanes(spread_switch_on):
    """Some of CUDA_CASES spread their draws over lanes (forward and backward: 32 lanes, and
    fewer for a ragged last chunk; for "none" on short samples, 4 lanes per window), so
    test_reparameterize_kl_cuda_matches_cpu checks the draws kernels on a GPU."""
    lanes = {(shape, k): fastelbo._C._cuda_draw_lanes(shape[0] * shape[1], k)
             for shape, reduction, free_bits, k in CUDA_CASES if reduction != "none" and free_bits == 0}
    assert max(lanes.values()) == 32 and any(1 < v < 32 for v in lanes.values()), lanes
    window_lanes = [fastelbo._C._cuda_short_rows_lanes(*shape, k)["draw_lanes"]
                    for shape, reduction, _, k in CUDA_CASES if reduction == "none" and k > 2]
    assert window_lanes and min(window_lanes) == 4, window_lanes


def test_cuda_free_bits_cases_take_both_columns_kernels(spread_switch_on):
    """The free-bits ones of CUDA_CASES run the columns kernel alone (small batches) and the split
    kernel (tall batches), and the draws over lanes, so a GPU run checks each against the CPU."""
    grids = [fastelbo._C._cuda_free_bits_grid(shape[0], shape[1], k)
             for shape, _, free_bits, k in CUDA_CASES if free_bits > 0]
    splits = [grid["row_splits"] for grid in grids]
    assert min(splits) == 1 and max(splits) > 1, splits
    assert max(grid["draw_lanes"] for grid in grids) == 32, grids
