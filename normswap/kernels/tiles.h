/* Small transposes in registers (included by rows.c), for kernels that compute several
 * rows side by side, value j of each row in one vector, all through ns_transpose_SUF (below):
 * DN along rows (divisive.h: dn_gather, dn_scatter), and the short top-k rows of rows_impl.h
 * (lanes_of_: their candidates, their subsets' extremes, the backward's means). (Their
 * whole-row lanes, where the candidates do not apply, copy value by value: tiles measured no
 * faster there.)
 *
 * ns_tile_SUF(src, ld_src, dst, ld_dst): an NS_TILE_SUF x NS_TILE_SUF block transposed, row
 * k of the source (k * ld_src from src) into column k of the destination (rows ld_dst
 * apart): 8 x 8 floats or 4 x 4 doubles in AVX registers (24 / 8 shuffles; the scalar copy
 * it replaced stored one value at a time). NS_TILED_(n, SUF) says how many of a row's n
 * values go by tiles (0 without AVX: ns_transpose_SUF copies value by value). NS_PREFETCH(c):
 * fetch the line at c into the cache. */
#if defined(__AVX__)
#include <immintrin.h>
#define NS_PREFETCH(c) _mm_prefetch((c), _MM_HINT_T0)
#define NS_TILE_f32 8
#define NS_TILE_f64 4
#define NS_TILE_OF_(SUF_) NS_TILE_##SUF_   /* (SUF_ expanded first: NS_TILED_(n, SUF) works too) */
#define NS_TILED_(n, SUF_) ((n) / NS_TILE_OF_(SUF_) * NS_TILE_OF_(SUF_))
static inline __attribute__((always_inline)) void ns_tile_f32(const float *src, int64_t ld_src,
                                                              float *dst, int64_t ld_dst) {
    __m256 r[8], t[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(src + k * ld_src);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(dst + k * ld_dst, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(dst + (k + 4) * ld_dst, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
}
static inline __attribute__((always_inline)) void ns_tile_f64(const double *src, int64_t ld_src,
                                                              double *dst, int64_t ld_dst) {
    __m256d r[4], t[4];
    for (int k = 0; k < 4; k++) r[k] = _mm256_loadu_pd(src + k * ld_src);
    for (int k = 0; k < 4; k += 2) {
        t[k] = _mm256_unpacklo_pd(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_pd(r[k], r[k + 1]);
    }
    for (int k = 0; k < 2; k++) {
        _mm256_storeu_pd(dst + k * ld_dst, _mm256_permute2f128_pd(t[k], t[k + 2], 0x20));
        _mm256_storeu_pd(dst + (k + 2) * ld_dst, _mm256_permute2f128_pd(t[k], t[k + 2], 0x31));
    }
}
#else
#define NS_PREFETCH(c) ((void)(c))
#define NS_TILE_f32 1
#define NS_TILE_f64 1
#define NS_TILED_(n, SUF_) 0
#define ns_tile_f32(src, ld_src, dst, ld_dst) ((void)0)
#define ns_tile_f64(src, ld_src, dst, ld_dst) ((void)0)
#endif

/* ns_transpose_SUF(src, ld_src, dst, ld_dst, rows, cols): dst[j * ld_dst + i] = src[i *
 * ld_src + j] for i < rows, j < cols; whole tiles by ns_tile_SUF, the rest value by value.
 * Rows side by side (a group of rows into lanes, rows = lanes, cols = values) and back
 * (rows = values, cols = lanes). Inlined, so that a caller's constant lane count reaches the
 * loops; the rows left of the tiles are not walked when no column lies right of them (on
 * rows of 64 floats that empty walk made DN's kernel 1.07-1.16x slower). */
#define NS_TRANSPOSE(T_, SUF_)                                                                      \
static inline __attribute__((always_inline)) void ns_transpose_##SUF_(                              \
        const T_ *restrict src, int64_t ld_src, T_ *restrict dst, int64_t ld_dst, int64_t rows,     \
        int64_t cols) {                                                                             \
    const int64_t rt = NS_TILED_(rows, SUF_), ct = NS_TILED_(cols, SUF_);                           \
    for (int64_t i0 = 0; i0 < rt; i0 += NS_TILE_##SUF_)                                             \
        for (int64_t j0 = 0; j0 < ct; j0 += NS_TILE_##SUF_)                                         \
            ns_tile_##SUF_(src + i0 * ld_src + j0, ld_src, dst + j0 * ld_dst + i0, ld_dst);         \
    for (int64_t i = ct < cols ? 0 : rt; i < rows; i++)   /* (right of the tiles, then below) */    \
        for (int64_t j = i < rt ? ct : 0; j < cols; j++) dst[j * ld_dst + i] = src[i * ld_src + j]; \
}
NS_TRANSPOSE(float, f32)
NS_TRANSPOSE(double, f64)
#undef NS_TRANSPOSE
