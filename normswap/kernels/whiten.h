/* IterNorm's training step for groups of 16 channels of a contiguous (N, C, L) array,
 * forward and backward (included by rows.c, after newton.h).
 *
 * Group g holds channels 16 g .. 16 g + 15; its m = N L positions are the columns of a
 * 16 x m matrix X (column p = n L + l is x[n, 16 g + j, l], j = 0 .. 15). Per group, with
 * V = X - mu (the formulas of normswap.norms.whitening._GroupWhitenFn):
 *
 *   ns_whiten_forward   mu = rowmean(X) (rounded to T), Sigma = V V^T / m + eps I,
 *                       W = newton(Sigma) (newton.h), W' = diag(gamma) W, y = W' V + beta
 *   ns_whiten_backward  dW' = dy V^T, dbeta = rowsum(dy), dgamma = rowsum(dW' * W),
 *                       dSigma = newton_backward(Sigma, diag(gamma) dW'),
 *                       S = (dSigma + dSigma^T) / m,  dx = W'^T dy + S V - W'^T mean(dy)
 *
 * (dx = dV - mean(dV) with dV = W'^T dy + S V and mean(V) = 0.) Five passes over the data:
 * the means, V V^T and y forward, dy V^T and dx backward.
 *
 * The columns are taken 1 KiB of each row at a time (256 float / 128 double positions,
 * across samples when L is small) into a buffer in cache, centred on the way; the
 * products run on vectors of 64 bytes (16 float / 8 double positions) in 4 x 4 tiles
 * (smaller vectors and tiles without AVX-512, see below), the sums of products in T for at
 * most WH_FLUSH chunks, then added into double lanes (the lanes are added at the end).
 * Where a pass reads more than stays in cache, the next chunk's cache lines are requested a
 * few at a time between the tiles of this chunk's products (wh_ahead), so that the reads
 * overlap the arithmetic.
 * PyTorch's path (bmm) reads a centred copy and writes and reads each product's output in
 * passes of their own, and calls about 60 operators per layer and step. Groups are split
 * between OpenMP threads; a group's sums are added in one order, so results do not depend
 * on the thread count.
 */
#include <string.h>

#define WH_D 16          /* channels per group */
/* The products' shapes, sized to the vector registers: with AVX-512 (32 of 64 bytes), tiles of
 * 4 x 4 vectors; otherwise (AVX2's 16 of 32 bytes; where 64-byte vectors and 4 x 4 tiles
 * took 32 registers for the sums alone and spilled: IterNorm at 9-11x nn.BatchNorm2d on an
 * AVX2 machine) vectors of 32 bytes, 2 x 4 tiles of sums of products and 4 x 2 tiles of
 * outputs, and the channels-last sums of products 4 rows at a time. */
#if defined(__AVX512F__)
#define WH_VEC_BYTES 64
#define WH_CROSS_ROWS 4  /* sums of products: a's rows per tile ... */
#define WH_CROSS_COLS 4  /* ... by b's rows */
#define WH_OUT_ROWS 4    /* outputs: rows per tile ... */
#define WH_OUT_VECS 4    /* ... by vectors of positions */
#define WCL_ROWS 16      /* channels last: rows of sums of products at a time */
#else
#define WH_VEC_BYTES 32
#define WH_CROSS_ROWS 2
#define WH_CROSS_COLS 4
#define WH_OUT_ROWS 4
#define WH_OUT_VECS 2
#define WCL_ROWS 4
#endif
#define WH_ROW_BYTES 1024 /* of each row of a chunk */
#define WH_FLUSH 8       /* chunks summed in T before the sums go into double */
#define WH_AHEAD_LINES 1024 /* the next chunk's lines requested during a chunk's products, at most */
#define WH_AHEAD_MIN_BYTES (2 << 20) /* ... where a pass reads and writes more than this (less stays
                                       in cache between passes: requests there only cost time) */
#define WCL_SLAB 512     /* channels last: positions per unit of work between threads ... */
#define WCL_MAX_SLABS 1024 /* ... at most this many (their partial sums are kept) */
#define WCL_FLUSH 64     /* channels last: positions whose sums are added in T */

#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

#define WH_T float
#define WH_SUF f32
#include "whiten_impl.h"
#undef WH_T
#undef WH_SUF

#define WH_T double
#define WH_SUF f64
#include "whiten_impl.h"
#undef WH_T
#undef WH_SUF

#pragma GCC pop_options
