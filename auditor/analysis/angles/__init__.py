"""Median principal angles between class activations at one stage (Definition 1).

For a stage, every sample's activation is flattened to a vector ``u_i``. The
*intra* angle of class ``c`` is the median, over pairs ``i < j`` of class ``c``,
of ``arccos(cos(u_i, u_j))``; the *inter* angle of classes ``c`` and ``d`` is
the median over every ``i`` in ``c`` and ``j`` in ``d``. Results are in degrees.

Algorithm (:func:`median_angles`)
---------------------------------
The cosines come from Gram matrices of the unit-normalised rows, computed in
float64 tiles with one torch GEMM per tile: a *panel* of ``block_rows`` rows is
held in memory and the rows after it are streamed in tiles of at most 256 rows,
so only the upper triangle of the Gram matrix is computed (the waste is the
diagonal 256-row tiles, about ``256 / N`` of the work) and the source is read
about ``(1 + N / block_rows) / 2`` times (once more with ``center`` or
``max_pairs``, once more with ``subspace_k``), always in sample order, a few
MiB at a time (an HDF5 dataset chunked by sample reads at page-cache speed).

Why float64: a float32 GEMM over ``D ~ 1e5`` features has cosine errors of
about ``1e-7 .. 1e-6``; on ReLU activations with ``D = 102400`` the medians
from a float32 Gram were off by up to ``3e-5`` degrees (bench/bench_angles.py),
from a float64 Gram by ``6e-14``. The medians are specified to ``1e-6``
degrees, so the medians are those of float64 cosines.

Float32 products, exact medians (:mod:`.exact`, ``products="float32"``, and
``"auto"`` for float32 / float16 stages of at least 1e9 multiply-adds): float32
rows are exact in float32, so their Gram tiles are float32 GEMMs over chunks of
1024 features summed in float64, each cosine known to a rigorous bound ``e``
(Higham's ``gamma_1024 = 6.1e-5``); only the pairs whose angle interval
straddles a median's bracket are recomputed in float64, and the medians are the
float64 path's (to the last bit where the same operations give the pair at the
median; about 1e-14 degrees otherwise). The rows are held as float32 (twice
the rows of float64 in the same memory: a 300-image ResNet-50 stage is one
panel, read once) and their float64 norms taken in the same pass as the read.
Too many ambiguous pairs (over 1 % of a stage's, at least 4,096) or norms
outside ``[1e-12, 1e18]``: that stage is computed again in float64.

``arccos`` is ill-conditioned near 0 and 180 degrees, so every pair with
``|cos| > 0.9999`` (closer than about 0.81 degrees to 0 or 180) is recomputed
from the two unit vectors as ``2 * atan2(||a - b||, ||a + b||)``, which is
accurate to a few ulps at every angle.

Medians are exact (all pairs) unless ``max_pairs`` is given. The median of an
even count is the mean of the two middle values (numpy's convention).

Memory: the rows held at once, at most ``_ROW_BYTES`` (1 GiB) whatever the
number of samples (:mod:`.tiling`): ``8 * D * (block_rows + min(block_rows,
256))`` bytes of float64 unit rows while that fits (every CIFAR-sized stage);
wider rows (ResNet-50's first stages at 224 px: 802,816 features) are held as
read (the store's float32 or float16) in a panel and a tile sized to that
budget, and made float64 a block of columns at a time (two buffers of 32 MiB)
just before each GEMM, so a Gram tile is a sum of float64 GEMMs over column
blocks (the same cosines to rounding, about 1e-14 degrees). Plus 8 bytes per
pair kept for the exact medians (``N * (N - 1) / 2`` pairs in all when every
pair is kept: 16 MB for 2,000 samples, 100 MB for 5,000; bounded by
``max_pairs`` per class pair otherwise; 16 with float32 products, the pair's id
beside its cosine), plus, with ``subspace_k``, ``8 *
sum_c n_c ** 2`` bytes of class Gram matrices and ``8 * n_classes * D *
subspace_k`` bytes of principal directions. Nothing of size ``N * D`` is ever
held, so the features may live on disk; the price of a bounded panel is the
reads: the rows after each panel are read once per panel, about ``N ** 2 /
(2 * panel_rows)`` row reads in all. Only a row's first read goes through
HDF5's filters (its Fletcher-32 checksum checked); a row read again (the next
panels, the repaired pairs) comes raw from the file when its chunk is the row
and its only filter the checksum (:class:`.source.RowSource`): the bytes
checked the first time, by ``os.preadv`` at their chunks' offsets on a few
threads, at about 11 GB/s from the page cache instead of 2.3.
Float32 rows read again keep the norms of their first read.

The package, one job a module: :mod:`.compute` (the entry points),
:mod:`.source` (the input, checked and read in order), :mod:`.rows` (rows
centred and normalised, their validity), :mod:`.tiling` (panels and tiles),
:mod:`.pairs` (which pairs are kept, the pool of their angles),
:mod:`.kernels` (norms, GEMMs, accurate angles), :mod:`.products` (Gram tiles
of whole, blocked or float32 rows), :mod:`.exact` (float32 products, their
bound, the exact medians), :mod:`.gram` (the passes),
:mod:`.subspaces` (class subspaces), :mod:`.result` (:class:`StageAngles`).

References
----------
.. [1] "Understanding ResNet from a Discrete Dynamical System Perspective",
   ICLR 2022 submission, Definition 1 (median principal angle) and Sec. 4.4.
"""

from __future__ import annotations

from .compute import median_angles, median_angles_h5, products_of
from .gram import Share
from .result import StageAngles

__all__ = ["Share", "StageAngles", "median_angles", "median_angles_h5", "products_of"]
